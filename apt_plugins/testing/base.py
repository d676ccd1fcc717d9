"""Shared base classes for conformance kits: what every kit would otherwise repeat.

A kit subclasses one of these and writes only what is specific to its host:

- :class:`ConformanceKitBase` (any host): the four standard stage configurations, seeded
  ``loss``/``actions``, ``save`` through ``save_pretrained`` and ``perturb_fusion`` over every
  :class:`~apt_plugins.GatedCrossAttention` in the policy. The subclass supplies ``build``,
  ``load``, ``make_batch``, ``probes`` and ``set_gradient_checkpointing``.
- :class:`LeRobotConformanceKit` (LeRobot hosts): additionally ``policy_config``/``build``/``load``
  from four class paths, tiny config fields and input/output features. The subclass supplies the
  batches, the probes, gradient checkpointing and (optionally) a construction context.

Torch is imported inside the methods, so importing :mod:`apt_plugins.testing` stays cheap.
"""

from __future__ import annotations

import contextlib
from importlib import import_module
from pathlib import Path
from typing import Any

from ..config import AptConfig

__all__ = ["ConformanceKitBase", "LeRobotConformanceKit", "standard_stage_configs"]


def standard_stage_configs() -> dict[str, AptConfig]:
    """Stage 1 and Stage 2 with each ``vlm_mode`` (LoRA at rank 4, small enough for tiny models)."""
    return {
        "stage1": AptConfig(stage=1),
        "stage2_frozen": AptConfig(stage=2),
        "stage2_lora": AptConfig(stage=2, vlm_mode="lora", lora_rank=4, lora_alpha=8),
        "stage2_full": AptConfig(stage=2, vlm_mode="full"),
    }


class ConformanceKitBase:
    """Host-independent part of a conformance kit (see the module docstring).

    :cvar batch_size: samples per batch built by ``make_batch``.
    :cvar non_observation_keys: batch keys removed before sampling actions (targets, not inputs).
    :cvar perturb_scale: standard deviation of the random fusion output projections set by
        :meth:`perturb_fusion`; large enough that an open layer visibly changes tiny models.
    """

    adapter_name: str
    batch_size: int = 2
    non_observation_keys: tuple[str, ...] = ("action",)
    perturb_scale: float = 0.5

    def __init__(self, adapter_name: str | None = None):
        if adapter_name is not None:
            self.adapter_name = adapter_name

    def stage_configs(self) -> dict[str, AptConfig]:
        """The configurations every check runs on: :func:`standard_stage_configs`."""
        return standard_stage_configs()

    def save(self, policy: Any, path: Path) -> None:
        """Write a checkpoint directory with the host's ``save_pretrained``."""
        policy.save_pretrained(path)

    def loss(self, policy: Any, batch: dict[str, Any], seed: int = 0) -> Any:
        """``policy.forward(batch)``'s loss with noise, flow time (and any dropout draw) fixed by ``seed``."""
        import torch

        torch.manual_seed(seed)
        loss, _ = policy.forward(batch)
        return loss

    def actions(self, policy: Any, batch: dict[str, Any], seed: int = 0) -> Any:
        """``predict_action_chunk`` on the observation part of ``batch``, sampling noise fixed by ``seed``."""
        import torch

        obs = {k: v for k, v in batch.items() if k not in self.non_observation_keys}
        torch.manual_seed(seed)
        policy.reset()
        return policy.predict_action_chunk(obs)

    def fusion_layers(self, policy: Any) -> list[Any]:
        """The policy's fusion layers: every :class:`~apt_plugins.GatedCrossAttention`, in module order."""
        from ..gating import GatedCrossAttention

        return [m for m in policy.modules() if isinstance(m, GatedCrossAttention)]

    def perturb_fusion(self, policy: Any, seed: int = 0) -> None:
        """Open every fusion layer: random output projections, drawn from a generator seeded by ``seed``.

        :raises AssertionError: the policy has no fusion layers (a Stage-1 policy, or fusion layers
            that do not use :class:`~apt_plugins.GatedCrossAttention`: override this method then).
        """
        import torch

        layers = self.fusion_layers(policy)
        assert layers, f"{type(policy).__name__} has no GatedCrossAttention fusion layers to perturb"
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for layer in layers:
                w = layer.o_proj.weight
                w.copy_((torch.randn(w.shape, generator=g) * self.perturb_scale).to(w.dtype))

    # To be supplied by the kit.
    def build(self, apt: AptConfig | None, seed: int = 0, **overrides: Any) -> Any:
        """A fresh policy in train mode: the stock host policy when ``apt`` is None."""
        raise NotImplementedError

    def load(self, path: Path, apt: AptConfig, **kwargs: Any) -> Any:
        """Load a checkpoint into an APT policy configured with ``apt`` (promotes Stage 1 -> 2)."""
        raise NotImplementedError

    def make_batch(self, instruction: int = 0, seed: int = 0) -> dict[str, Any]:
        """A training batch; changing ``instruction`` changes only the instruction tokens."""
        raise NotImplementedError

    def probes(self, batch: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """Named non-language variations of ``batch`` that must change a Stage-1 policy's output."""
        raise NotImplementedError

    def set_gradient_checkpointing(self, policy: Any, enabled: bool) -> None:
        """Turn the host's gradient checkpointing on or off."""
        raise NotImplementedError


class LeRobotConformanceKit(ConformanceKitBase):
    """A kit for a LeRobot-hosted adapter: policies built from config classes at tiny size.

    Set the four class paths (``"module:Name"``, imported on first use so the kit itself is cheap
    to import), ``tiny_fields`` (config fields that shrink the policy) and :meth:`features`;
    override :meth:`construction` when the host needs a context (patches, fixtures) while a policy
    is constructed or loaded.

    :cvar stock_config: the host's config class (``"lerobot.policies.pi0.configuration_pi0:PI0Config"``).
    :cvar stock_policy: the host's policy class.
    :cvar apt_config: the APT config class (the host config plus ``apt: AptSettings``).
    :cvar apt_policy: the APT policy class (``AptPolicyMixin`` + the host policy).
    :cvar tiny_fields: config fields applied to every tiny policy (before ``**overrides``).
    """

    stock_config: str
    stock_policy: str
    apt_config: str
    apt_policy: str
    tiny_fields: dict[str, Any] = {}

    @staticmethod
    def _resolve(path: str) -> Any:
        module, name = path.split(":")
        return getattr(import_module(module), name)

    def features(self) -> tuple[dict, dict]:
        """``(input_features, output_features)`` of the tiny policies."""
        raise NotImplementedError

    def construction(self) -> contextlib.AbstractContextManager:
        """Context in force while a policy is constructed or loaded (default: none)."""
        return contextlib.nullcontext()

    def policy_config(self, apt: AptConfig | None, **overrides: Any) -> Any:
        """The host config at tiny size: stock when ``apt`` is None, else the APT type with ``apt``."""
        inputs, outputs = self.features()
        fields = {**self.tiny_fields, "input_features": inputs, "output_features": outputs, **overrides}
        if apt is None:
            return self._resolve(self.stock_config)(**fields)
        return self._resolve(self.apt_config)(**fields, apt=apt.to_settings())

    def build(self, apt: AptConfig | None, seed: int = 0, **overrides: Any) -> Any:
        """A fresh tiny policy in train mode, weights drawn after ``torch.manual_seed(seed)``."""
        import torch

        config = self.policy_config(apt, **overrides)
        cls = self._resolve(self.stock_policy if apt is None else self.apt_policy)
        torch.manual_seed(seed)
        with self.construction():
            policy = cls(config)
        return policy.train()

    def load(self, path: Path, apt: AptConfig, **kwargs: Any) -> Any:
        """Load a checkpoint into the APT policy type configured with ``apt`` (promotion when 1 -> 2)."""
        cls = self._resolve(self.apt_policy)
        with self.construction():
            return cls.from_pretrained(path, config=self.policy_config(apt), **kwargs)
