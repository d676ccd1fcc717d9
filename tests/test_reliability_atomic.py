"""apt_plugins.atomic: the all-or-nothing write protocol and the clean-up of dead writers' temporaries."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from apt_plugins import IncompleteCheckpointError
from apt_plugins.atomic import (
    INCOMPLETE_MARKER,
    assert_complete,
    atomic_directory,
    atomic_files,
    remove_stale_temporaries,
    temporaries,
    temporary_name,
)


def test_a_failed_block_leaves_nothing(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_directory(target) as staging:
            (staging / "a.txt").write_text("half")
            raise RuntimeError("boom")
    assert not target.exists() and temporaries(tmp_path) == []


def test_a_directory_appears_whole_and_replaces_an_empty_one(tmp_path):
    target = tmp_path / "out"
    target.mkdir()  # what LeRobot's save_pretrained does before the policy writes
    with atomic_directory(target) as staging:
        (staging / "a.txt").write_text("a")
        assert not (target / "a.txt").exists()
    assert (target / "a.txt").read_text() == "a" and temporaries(tmp_path) == []
    with pytest.raises(FileExistsError):
        with atomic_directory(target):
            pass


def test_files_move_into_an_existing_directory_and_keep_the_others(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("keep")
    (target / "a.txt").write_text("old")
    with atomic_files(target) as staging:
        (staging / "a.txt").write_text("new")
    assert (target / "a.txt").read_text() == "new" and (target / "keep.txt").read_text() == "keep"
    assert not (target / INCOMPLETE_MARKER).exists() and temporaries(tmp_path) == []
    assert_complete(target)


def test_only_temporaries_of_dead_processes_on_this_host_are_removed(tmp_path):
    target = tmp_path / "out"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)  # exited: its pid is free (reuse within this test is vanishingly unlikely)
    mine = temporary_name(target)
    host = mine.name.split(".apt-tmp-")[1].split("-")[0]
    stale = tmp_path / f".out.apt-tmp-{host}-{dead_pid}-deadbeef"
    other_host = tmp_path / f".out.apt-tmp-otherhost-{dead_pid}-deadbeef"
    live = tmp_path / f".out.apt-tmp-{host}-{os.getppid()}-cafef00d"
    for path in (mine, stale, other_host, live):
        path.mkdir()
    assert remove_stale_temporaries(tmp_path) == [stale]
    assert {p.name for p in temporaries(tmp_path)} == {mine.name, other_host.name, live.name}


def test_leftovers_are_refused(tmp_path):
    marked = tmp_path / "ckpt"
    marked.mkdir()
    (marked / INCOMPLETE_MARKER).write_text("")
    with pytest.raises(IncompleteCheckpointError, match=r"It holds \.apt_incomplete: the save into it was interrupted"):
        assert_complete(marked)
    with pytest.raises(IncompleteCheckpointError, match="temporary directory of a write that did not finish"):
        assert_complete(temporary_name(tmp_path / "ckpt"))
