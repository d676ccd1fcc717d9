"""What an adapter supplies so the conformance suite can exercise it on real host classes."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from ..config import AptConfig


@runtime_checkable
class ConformanceKit(Protocol):
    """Builds tiny *real* host policies (never mocks) and batches for them, offline.

    Returned by :meth:`apt_plugins.Adapter.conformance_kit`. Noise and flow time are fixed by seeding
    torch's global generator, so ``loss``/``actions`` with the same seed are comparable bit for bit.
    """

    adapter_name: str

    def stage_configs(self) -> dict[str, AptConfig]:
        """Named APT configurations to check (at least one Stage 1 and one Stage 2)."""

    def build(self, apt: AptConfig | None, seed: int = 0, **overrides: Any) -> Any:
        """A fresh policy in train mode: the stock host policy when ``apt`` is None."""

    def save(self, policy: Any, path: Path) -> None:
        """Write a checkpoint directory."""

    def load(self, path: Path, apt: AptConfig, **kwargs: Any) -> Any:
        """Load a checkpoint into an APT policy configured with ``apt`` (promotes Stage 1 -> 2)."""

    def make_batch(self, instruction: int = 0, seed: int = 0) -> dict[str, Any]:
        """A training batch; changing ``instruction`` changes only the instruction tokens."""

    def probes(self, batch: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """Named non-language variations of ``batch`` that must change a Stage-1 policy's output."""

    def loss(self, policy: Any, batch: dict[str, Any], seed: int = 0) -> Any:
        """The scalar training loss, noise and time fixed by ``seed``."""

    def actions(self, policy: Any, batch: dict[str, Any], seed: int = 0) -> Any:
        """Sampled actions (``predict_action_chunk`` or equivalent), noise fixed by ``seed``."""

    def perturb_fusion(self, policy: Any, seed: int = 0) -> None:
        """Move the Stage-2 fusion output away from zero."""

    def set_gradient_checkpointing(self, policy: Any, enabled: bool) -> None:
        """Turn the host's gradient checkpointing on or off."""

    # Optional: ``error_cases() -> list[dict]`` with ``{"error": AptError subclass, "match": regex,
    # "trigger": callable}`` entries for adapter-specific documented errors; the documented-errors
    # check raises each one. Not part of the runtime-checkable protocol so kits may omit it.
    #
    # Optional (LeRobot kits): ``cli_workspace(root) -> apt_plugins.testing.cli.CliWorkspace``, the
    # fixtures a subprocess needs to build the tiny policies (hub cache, base model, plugin) and the
    # ``--policy.*`` flags that size them. Every registered LeRobot adapter runs through
    # tests/test_parity_cli.py and tests/test_parity_deepspeed.py with it; a kit without it fails there.
