"""APT processors built from a host checkpoint's own processor config.

``lerobot-train --policy.type=apt_pi05 --policy.pretrained_path=<plain pi05 checkpoint>`` builds the
policy through :class:`~apt_plugins.lerobot.AptPolicyMixin` and then loads the processors from the
same path. A stock checkpoint's processors lack what the APT model reads (pi0.5: the task-token
mask), so the first batch would fail. When the APT policy is loaded from such a checkpoint, the
adapter rewrites each processor config (:meth:`apt_plugins.Adapter.rewrite_processor_config`), the
change is printed, and ``config.pretrained_path`` points LeRobot at a *view* of the checkpoint
(links to its files, the rewritten configs written next to them) until the processors are built.
The checkpoint itself is never modified; the run's own checkpoints then hold the APT processors.
"""

from __future__ import annotations

import atexit
import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from apt_plugins import AptConfig, CheckpointMismatchError

logger = logging.getLogger("apt_plugins")

__all__ = ["PROCESSOR_FILES", "apt_processor_configs", "rewrite_processor_files", "use_apt_processors",
           "restore_pretrained_path"]

#: The processor pipeline configs of a LeRobot ``pretrained_model`` directory.
PROCESSOR_FILES = ("policy_preprocessor.json", "policy_postprocessor.json")

_ORIGINAL_PATH = "_apt_original_pretrained_path"


def apt_processor_configs(adapter: Any, directory: str | Path, config: AptConfig) -> tuple[dict[str, dict], list[str]]:
    """The processor configs of ``directory`` that the adapter changes, and the change lines.

    Returns ``({filename: new config}, ["<filename>: <change>", ...])``; both empty when the
    processors are already what the APT model needs (or the directory has none).

    :raises CheckpointMismatchError: a processor file is not valid JSON.
    """
    directory = Path(directory)
    rewritten: dict[str, dict] = {}
    changes: list[str] = []
    for name in PROCESSOR_FILES:
        path = directory / name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointMismatchError(str(directory), cause=f"{name} is corrupt ({exc}).") from None
        new, lines = adapter.rewrite_processor_config(name, data, config)
        if lines:
            rewritten[name] = new
            changes.extend(f"{name}: {line}" for line in lines)
    return rewritten, changes


def rewrite_processor_files(adapter: Any, directory: str | Path, config: AptConfig) -> list[str]:
    """Apply the adapter's processor rewrite to the files in ``directory`` in place (retrofit's copy)."""
    rewritten, changes = apt_processor_configs(adapter, directory, config)
    for name, data in rewritten.items():
        (Path(directory) / name).write_text(json.dumps(data, indent=2))
    return changes


def use_apt_processors(policy: Any, directory: Path, config: Any) -> list[str]:
    """Point ``config.pretrained_path`` at a view of ``directory`` with APT processors, if it needs one.

    Only when ``config.pretrained_path`` is set (LeRobot then loads the processors from it). The
    view is a temporary directory of symlinks to ``directory``'s files plus the rewritten processor
    configs; it lives until the process exits. :func:`restore_pretrained_path` puts the user's path
    back once the processors are built, so ``train_config.json`` records the real source. Returns
    the change lines (empty: nothing was done).
    """
    if getattr(config, "pretrained_path", None) is None:
        return []
    rewritten, changes = apt_processor_configs(policy.apt_adapter, directory, policy.apt_config)
    if not changes:
        return []
    view = Path(tempfile.mkdtemp(prefix="apt_processors_"))
    atexit.register(shutil.rmtree, view, True)
    for entry in directory.iterdir():
        if entry.name not in rewritten:
            (view / entry.name).symlink_to(entry.resolve())
    for name, data in rewritten.items():
        (view / name).write_text(json.dumps(data, indent=2))
    original = config.pretrained_path
    setattr(policy, _ORIGINAL_PATH, original)
    config.pretrained_path = view if isinstance(original, Path) else str(view)
    logger.info(
        "APT processors: %s holds %s processors without the APT steps; using APT processors built from "
        "them (the checkpoint is not modified; this run's checkpoints save the APT processors):\n  %s",
        directory, policy.apt_adapter.policy_types[0] if policy.apt_adapter.policy_types else "host",
        "\n  ".join(changes),
    )
    return changes


def restore_pretrained_path(policy: Any) -> None:
    """Undo :func:`use_apt_processors`' redirect (called once the processors exist: optimizer, first step)."""
    original = policy.__dict__.pop(_ORIGINAL_PATH, None)
    if original is not None:
        policy.config.pretrained_path = original
