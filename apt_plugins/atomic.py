"""All-or-nothing directory writes: stage in a temporary sibling, fsync, rename into place.

Every checkpoint directory apt-plugins writes (``save_pretrained`` of an APT policy, ``apt-plugins
retrofit``, the DeepSpeed step checkpoints) goes through this module, so that a process killed at
any instant leaves either the complete result or none of it:

- :func:`atomic_directory` builds a new directory under a temporary sibling name and renames it
  onto the target (a rename within one filesystem is atomic on POSIX). A killed writer leaves only
  the hidden temporary sibling, which the next write in the same parent removes.
- :func:`atomic_files` adds files to a directory that already holds others (LeRobot creates the
  ``pretrained_model`` directory, and writes its own files into it, around the policy's save). The
  files are staged in a temporary sibling first; while they are moved in, an incomplete marker
  (:data:`INCOMPLETE_MARKER`) lies in the directory, and loaders refuse a directory that has one
  (:func:`assert_complete`).

Temporary names carry the host name and process id (``.<name>.apt-tmp-<host>-<pid>-<random>``), so
a later writer removes only leftovers of processes that are dead on *this* host, never the
temporaries of a live writer or of another node on a shared filesystem.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

from .errors import IncompleteCheckpointError

__all__ = [
    "INCOMPLETE_MARKER",
    "TEMP_TAG",
    "assert_complete",
    "atomic_directory",
    "atomic_files",
    "fsync_directory",
    "fsync_tree",
    "remove_stale_temporaries",
    "temporaries",
    "temporary_name",
]

#: present in a directory while files are being moved into it; loaders refuse such a directory
INCOMPLETE_MARKER = ".apt_incomplete"
#: part of every temporary sibling's name
TEMP_TAG = ".apt-tmp-"


def _host() -> str:
    # '-' separates the name's fields; a hostname may contain it, so replace it.
    return socket.gethostname().replace("-", "_") or "localhost"


def temporary_name(target: str | Path) -> Path:
    """A fresh temporary sibling path for ``target`` (not created)."""
    target = Path(target)
    return target.parent / f".{target.name}{TEMP_TAG}{_host()}-{os.getpid()}-{secrets.token_hex(4)}"


def temporaries(parent: str | Path) -> list[Path]:
    """The temporary siblings (of any writer, live or dead) directly under ``parent``."""
    parent = Path(parent)
    if not parent.is_dir():
        return []
    return sorted(p for p in parent.iterdir() if p.name.startswith(".") and TEMP_TAG in p.name)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temporaries(parent: str | Path) -> list[Path]:
    """Remove temporary siblings left under ``parent`` by dead processes of this host; return them."""
    removed = []
    host = _host()
    for path in temporaries(parent):
        fields = path.name.rsplit(TEMP_TAG, 1)[1].split("-")
        if len(fields) != 3 or fields[0] != host or not fields[1].isdigit():
            continue
        pid = int(fields[1])
        if pid == os.getpid() or _pid_alive(pid):
            continue
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def fsync_directory(path: str | Path) -> None:
    """fsync a directory entry table, so a rename or a new file in it survives a power loss."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on directories; the rename is still atomic
        pass
    finally:
        os.close(fd)


def fsync_tree(root: str | Path) -> None:
    """fsync every file and directory under ``root`` (files first, so directories record final sizes)."""
    root = Path(root)
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            path = os.path.join(dirpath, name)
            if os.path.islink(path):
                continue
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        fsync_directory(dirpath)


@contextlib.contextmanager
def atomic_directory(target: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary directory that becomes ``target`` when the block succeeds.

    ``target`` must not exist or be an empty directory (LeRobot's ``save_pretrained`` creates it
    empty before the policy writes). On an exception the temporary directory is removed and
    ``target`` is left as it was.

    :raises FileExistsError: ``target`` exists and is not empty.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target.parent)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise FileExistsError(f"{target} exists and is not empty")
    tmp = temporary_name(target)
    tmp.mkdir()
    try:
        yield tmp
        tmp.chmod(0o755)
        fsync_tree(tmp)
        if target.is_dir():
            target.rmdir()  # killed between here and the rename: target is absent, never partial
        os.rename(tmp, target)
        fsync_directory(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_files(directory: str | Path) -> Iterator[Path]:
    """Yield a staging directory whose files are moved into ``directory`` when the block succeeds.

    While the files are moved, :data:`INCOMPLETE_MARKER` lies in ``directory``; it is removed after
    the last file is in place. Files already in ``directory`` under other names are kept.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(directory.parent)
    staging = temporary_name(directory)
    staging.mkdir()
    try:
        yield staging
        fsync_tree(staging)
        marker = directory / INCOMPLETE_MARKER
        with open(marker, "w") as handle:
            handle.write("an apt-plugins write into this directory did not finish; do not load it\n")
            handle.flush()
            os.fsync(handle.fileno())
        fsync_directory(directory)
        for path in sorted(staging.iterdir()):
            os.replace(path, directory / path.name)
        fsync_directory(directory)
        marker.unlink()
        fsync_directory(directory)
        staging.rmdir()
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def assert_complete(directory: str | Path) -> None:
    """Refuse a directory that an interrupted apt-plugins write left behind.

    :raises IncompleteCheckpointError: the directory holds :data:`INCOMPLETE_MARKER`, or is itself a
        temporary sibling.
    """
    directory = Path(directory)
    if TEMP_TAG in directory.name:
        raise IncompleteCheckpointError(
            str(directory), "This is the temporary directory of a write that did not finish; "
            "load the directory without the '.apt-tmp-' part, or save again.")
    if (directory / INCOMPLETE_MARKER).exists():
        raise IncompleteCheckpointError(
            str(directory), f"It holds {INCOMPLETE_MARKER}: the save into it was interrupted. Use the previous "
            "checkpoint (for lerobot-train: checkpoints/last) or save again.")
