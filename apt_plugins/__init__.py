"""apt-plugins: APT (Action-expert PreTraining) for the VLA policies you already train.

Public API (everything an adapter or a user needs; in-tree adapters use nothing else):

- configuration: :class:`AptConfig`, :class:`AptSettings`
- plugins: :data:`hookimpl`, :class:`Adapter`, :func:`get_plugin_manager`, :data:`GROUPS`
- stages: :func:`prepare_stage`, :func:`param_groups`, :func:`apt_state`, :func:`gate_statistics`
- checkpoints: :func:`load_state_dict_strict`, :func:`read_manifest`, :func:`write_manifest`,
  :func:`fingerprint`
- training speed: :class:`PrefixCache` (the ``apt.prefix_cache`` store), :func:`content_key` (its entry keys)
- modules (torch, imported lazily): :class:`GatedCrossAttention`, :class:`SigmoidGate`,
  :class:`RMSNorm`, :func:`block_language`;
  token compaction for bit-exact Stage 1: :func:`visible_first`, :func:`gather_tokens`, :func:`gather_mask`
- errors: :class:`AptError` and its subclasses.

``import apt_plugins`` does not import torch, lerobot or deepspeed.
"""

from __future__ import annotations

from typing import Any

from .adapter import GROUPS, VLM_GROUPS, Adapter
from .checkpoint import LoadReport, explain_mismatch, fingerprint, load_state_dict_strict, read_manifest, write_manifest
from .config import AptConfig, AptSettings
from .errors import (
    AdapterError,
    AdapterValidationError,
    AptConfigError,
    AptError,
    CheckpointMismatchError,
    HostVersionError,
    IncompleteCheckpointError,
    LanguageMaskError,
    NoAdapterFoundError,
    PluginHookError,
    PrefixCacheError,
    UnknownAdapterError,
)
from .hookspecs import hookimpl
from .manager import get_plugin_manager
from .stages import StageReport, apt_state, prepare_stage

__all__ = [
    "Adapter",
    "AdapterError",
    "AdapterValidationError",
    "AptConfig",
    "AptConfigError",
    "AptError",
    "AptSettings",
    "CheckpointMismatchError",
    "GROUPS",
    "GatedCrossAttention",
    "HostVersionError",
    "IncompleteCheckpointError",
    "LanguageMaskError",
    "LoadReport",
    "NoAdapterFoundError",
    "PluginHookError",
    "PrefixCache",
    "PrefixCacheError",
    "RMSNorm",
    "SigmoidGate",
    "StageReport",
    "UnknownAdapterError",
    "VLM_GROUPS",
    "__version__",
    "apt_state",
    "explain_mismatch",
    "block_language",
    "content_key",
    "fingerprint",
    "gather_mask",
    "gather_tokens",
    "gate_statistics",
    "get_plugin_manager",
    "hookimpl",
    "load_state_dict_strict",
    "param_groups",
    "prepare_stage",
    "read_manifest",
    "visible_first",
    "write_manifest",
]

_LAZY = {
    "GatedCrossAttention": "gating",
    "SigmoidGate": "gating",
    "RMSNorm": "gating",
    "block_language": "masks",
    "gather_mask": "masks",
    "gather_tokens": "masks",
    "visible_first": "masks",
    "PrefixCache": "prefix_cache",
    "content_key": "prefix_cache",
}


def __getattr__(name: str) -> Any:
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("apt-plugins")
        except PackageNotFoundError:  # running from a source tree
            return "0+unknown"
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'apt_plugins' has no attribute {name!r}")


def param_groups(policy: Any, base_lr: float, weight_decay: float) -> list[dict[str, Any]]:
    """Optimizer parameter groups for a prepared policy (hook ``apt_param_groups``).

    Only trainable parameters appear, in named non-empty groups with their own ``lr`` and
    ``weight_decay``; pass the result straight to ``torch.optim.AdamW``.
    """
    state = apt_state(policy)
    if state is None:
        raise AptError("param_groups() needs a prepared policy: call apt_plugins.prepare_stage(policy, config) first.")
    return get_plugin_manager().hook.apt_param_groups(
        policy=policy, adapter=state.adapter, config=state.config, base_lr=base_lr, weight_decay=weight_decay
    )


def gate_statistics(policy: Any) -> dict[str, float]:
    """``apt/gate_mean/<layer>`` and ``apt/gate_std/<layer>`` for every fusion layer (empty in Stage 1)."""
    state = apt_state(policy)
    if state is None:
        return {}
    stats: dict[str, float] = {}
    for layer, value in state.adapter.gate_values(policy).items():
        v = value.detach().float()
        stats[f"apt/gate_mean/{layer}"] = float(v.mean())
        stats[f"apt/gate_std/{layer}"] = float(v.std()) if v.numel() > 1 else 0.0
    return stats
