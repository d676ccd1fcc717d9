"""What a kit supplies so end-to-end tests can run an adapter through LeRobot's CLIs, offline.

A LeRobot kit's optional ``cli_workspace(root)`` writes whatever its tiny policies need outside
the process (a tokenizer in a scratch hub cache, a tiny base model, a throw-away plugin that
shrinks the host at construction time) under ``root`` and returns a :class:`CliWorkspace`. The
parity tests (``tests/test_parity_cli.py``, ``tests/test_parity_deepspeed.py``) run every
registered LeRobot adapter whose kit has one through ``lerobot-train``, ``--resume``,
``--policy.path``, ``lerobot-eval``, ``apt-plugins verify`` and the DeepSpeed entry point.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

__all__ = ["CliWorkspace"]


@dataclass
class CliWorkspace:
    """How subprocesses build an adapter's tiny policies (returned by a kit's ``cli_workspace``).

    :param env: environment variables every subprocess needs (``HF_HUB_CACHE`` of the scratch hub,
        ``PYTHONPATH`` holding the plugin), added to the test's own environment.
    :param policy_args: ``--policy.*`` flags that size a fresh ``--policy.type=...`` run tiny (device,
        chunk size, dimensions, base model paths). Not needed with ``--policy.path``: the saved
        config holds them.
    :param plugin: import name of a package that must be imported in every process that constructs
        a policy (loaded with ``--env.discover_packages_path`` and ``apt-plugins ... --import``);
        None when the saved config alone is enough.
    """

    env: dict[str, str]
    policy_args: list[str] = field(default_factory=list)
    plugin: str | None = None

    def environ(self, **extra: str) -> dict[str, str]:
        """The test process's environment, offline, plus :attr:`env` and ``extra``."""
        base = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}
        return {**base, **self.env, **extra}

    def discover_args(self) -> list[str]:
        """``--env.discover_packages_path=<plugin>`` for lerobot-train/lerobot-eval, or nothing."""
        return [f"--env.discover_packages_path={self.plugin}"] if self.plugin else []

    def import_args(self) -> list[str]:
        """``--import=<plugin>`` for ``apt-plugins verify``/``retrofit``, or nothing."""
        return [f"--import={self.plugin}"] if self.plugin else []
