"""Preparing a stage on a host policy: inject, attach LoRA, freeze, report.

This is the host-independent half of APT. The adapter says where the VLM, the action expert and
the fusion layers live and installs the masks/modules; this module decides what trains, keeps
frozen modules in eval mode and reports it in a form users can check.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .adapter import GROUPS, VLM_GROUPS, Adapter
from .config import AptConfig
from .errors import AdapterValidationError, AptConfigError

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = [
    "StageReport",
    "AptState",
    "prepare_stage",
    "apt_state",
    "classify_parameters",
    "default_param_groups",
    "freeze_module",
    "is_gate_logit",
]

_STATE_ATTR = "_apt_state"


@dataclass
class GroupCount:
    """Trainable/frozen tensor and element counts of one parameter group."""

    trainable_tensors: int = 0
    trainable_elements: int = 0
    frozen_tensors: int = 0
    frozen_elements: int = 0


@dataclass
class StageReport:
    """What :func:`prepare_stage` did, in a form that can be printed and checked."""

    adapter: str
    stage: int
    vlm_mode: str
    masking: str
    groups: dict[str, GroupCount] = field(default_factory=dict)
    fusion_layers: int = 0

    def format_table(self) -> str:
        """A fixed-width table of trainable and frozen parameters per group, plus the masking."""
        lines = [
            f"APT stage {self.stage} on adapter {self.adapter!r} (vlm_mode={self.vlm_mode})",
            f"{'group':<16}{'trainable':>14}{'frozen':>14}  tensors (trainable/frozen)",
        ]
        total = GroupCount()
        for name in GROUPS:
            c = self.groups.get(name)
            if c is None or (c.trainable_tensors + c.frozen_tensors) == 0:
                continue
            lines.append(
                f"{name:<16}{c.trainable_elements:>14,}{c.frozen_elements:>14,}  "
                f"{c.trainable_tensors}/{c.frozen_tensors}"
            )
            total.trainable_elements += c.trainable_elements
            total.frozen_elements += c.frozen_elements
            total.trainable_tensors += c.trainable_tensors
            total.frozen_tensors += c.frozen_tensors
        lines.append(
            f"{'total':<16}{total.trainable_elements:>14,}{total.frozen_elements:>14,}  "
            f"{total.trainable_tensors}/{total.frozen_tensors}"
        )
        lines.append(f"language masking: {self.masking}")
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return {
            "adapter": self.adapter,
            "stage": self.stage,
            "vlm_mode": self.vlm_mode,
            "masking": self.masking,
            "fusion_layers": self.fusion_layers,
            "groups": {k: vars(v) for k, v in self.groups.items()},
        }


@dataclass
class AptState:
    """Stored on a prepared policy as ``policy._apt_state``."""

    adapter: Adapter
    config: AptConfig
    report: StageReport
    groups: dict[str, str]  # parameter name -> group


def apt_state(policy: Any) -> AptState | None:
    """The APT state of a prepared policy, or None."""
    return policy.__dict__.get(_STATE_ATTR)


def prepare_stage(
    policy: Any, config: AptConfig | dict[str, Any], adapter: Adapter | str | None = None
) -> StageReport:
    """Prepare APT stage ``config.stage`` on ``policy`` in place and return the report.

    Chooses the adapter through the ``apt_select_adapter`` hook unless one is given, checks the host
    version, injects the stage, attaches LoRA for ``vlm_mode='lora'``, sets ``requires_grad`` per
    parameter group (frozen groups are also kept in eval mode), then calls the ``apt_prepare_stage``
    hook. Preparing an already prepared policy with the same config is a no-op; with another config
    it raises :class:`~apt_plugins.errors.AptConfigError` (build a new policy or promote a checkpoint).
    """
    from .manager import get_plugin_manager

    pm = get_plugin_manager()
    config = AptConfig.parse(config)
    if isinstance(adapter, str):
        adapter = pm.get_adapter(adapter)
    adapter = adapter or pm.select_adapter(policy)
    state = apt_state(policy)
    if state is not None:
        if state.config == config and state.adapter.name == adapter.name:
            return state.report
        old, new = state.config.model_dump(), config.model_dump()
        changed = {k: new[k] for k in new if new[k] != old[k]}
        raise AptConfigError(
            "apt",
            changed,
            f"this policy is already prepared for stage {state.config.stage} with "
            f"{ {k: old[k] for k in changed} }; a policy is prepared once. Build a new policy, or save it and "
            "load the checkpoint with the new config (Stage 1 -> Stage 2 promotion).",
        )
    adapter.check_host_version()
    adapter.inject(policy, config)
    if config.vlm_mode == "lora":
        _attach_lora(policy, adapter, config)
    groups = classify_parameters(policy, adapter)
    report = _apply_trainability(policy, adapter, config, groups)
    state = AptState(adapter, config, report, groups)
    policy.__dict__[_STATE_ATTR] = state
    pm.hook.apt_prepare_stage(policy=policy, adapter=adapter, config=config, report=report)
    # A plugin may have added modules: every parameter must still belong to a group (or this raises).
    state.groups = classify_parameters(policy, adapter)
    return report


def classify_parameters(policy: Any, adapter: Adapter) -> dict[str, str]:
    """Map every parameter name of ``policy`` to its group (longest module prefix wins).

    :raises AdapterValidationError: a group name is unknown or a parameter is in no group.
    """
    prefixes: list[tuple[str, str]] = []
    for group, paths in adapter.module_groups(policy).items():
        if group not in GROUPS:
            raise AdapterValidationError(adapter.name, f"module_groups returned unknown group {group!r}; use {GROUPS}.")
        prefixes.extend((p, group) for p in paths)
    prefixes.sort(key=lambda pg: -len(pg[0]))
    result: dict[str, str] = {}
    for name, _ in policy.named_parameters():
        for prefix, group in prefixes:
            if name == prefix or name.startswith(prefix + "."):
                result[name] = group
                break
        else:
            raise AdapterValidationError(
                adapter.name,
                f"parameter {name!r} belongs to no module group; module_groups() must cover every "
                "parameter so nothing trains or freezes by accident.",
            )
    return result


def is_gate_logit(name: str) -> bool:
    """Whether a parameter name is a fusion gate's logit (a :class:`~apt_plugins.SigmoidGate`'s ``logit``)."""
    return name == "gate.logit" or name.endswith(".gate.logit")


def _is_lora(name: str) -> bool:
    return ".lora_" in name


def _trainable(group: str, name: str, config: AptConfig) -> bool:
    if group == "action_expert":
        return True
    if group == "fusion":
        return config.stage == 2
    if group in VLM_GROUPS:
        if config.vlm_mode == "full":
            return True
        return config.vlm_mode == "lora" and _is_lora(name)
    return False


def freeze_module(module: torch.nn.Module) -> None:
    """Put ``module`` in eval mode and keep it there when a parent calls ``.train()``."""
    module.eval()

    def train(self: Any, mode: bool = True) -> Any:  # noqa: ARG001 - frozen modules stay in eval
        return self

    # An instance attribute shadows nn.Module.train, so parents' train() leave it in eval.
    object.__setattr__(module, "train", train.__get__(module))


def _apply_trainability(policy: Any, adapter: Adapter, config: AptConfig, groups: dict[str, str]) -> StageReport:
    counts = {g: GroupCount() for g in GROUPS}
    for name, param in policy.named_parameters():
        group = groups[name]
        trainable = _trainable(group, name, config)
        param.requires_grad_(trainable)
        c = counts[group]
        if trainable:
            c.trainable_tensors += 1
            c.trainable_elements += param.numel()
        else:
            c.frozen_tensors += 1
            c.frozen_elements += param.numel()
    # Every module with nothing trainable stays in eval mode (dropout off, as a frozen VLM should be).
    # Parents come before children in named_modules(), so freezing the top-most one covers the rest.
    frozen: list[str] = []
    for path, module in policy.named_modules():
        if any(path.startswith(f + ".") for f in frozen) or module is policy:
            continue
        params = list(module.parameters())
        if params and not any(p.requires_grad for p in params):
            freeze_module(module)
            frozen.append(path)
    fusion = sum(1 for n in groups if groups[n] == "fusion" and is_gate_logit(n))
    return StageReport(
        adapter=adapter.name,
        stage=config.stage,
        vlm_mode=config.vlm_mode,
        masking=adapter.masking_summary(policy, config),
        groups=counts,
        fusion_layers=fusion,
    )


def _attach_lora(policy: Any, adapter: Adapter, config: AptConfig) -> None:
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise AptConfigError(
            "apt.vlm_mode", "lora", "LoRA needs peft: pip install 'apt-plugins[lerobot]' (or pip install peft)."
        ) from exc
    from .lora import resolve_lora_targets

    # peft's own matching, minus the modules the action path never uses, as explicit names.
    targets = resolve_lora_targets(policy, adapter, config)
    lora = LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.lora_alpha,
        lora_dropout=0.0,
        bias="none",
        target_modules=targets.modules,
    )
    inject_adapter_in_model(lora, policy.get_submodule(targets.path))


def default_param_groups(
    policy: Any, config: AptConfig, groups: dict[str, str], base_lr: float, weight_decay: float
) -> list[dict[str, Any]]:
    """The built-in optimizer grouping (see the ``apt_param_groups`` hook for the rules)."""
    fusion_lr = base_lr * config.fusion_lr_multiplier
    settings = {
        "action_expert": (base_lr, weight_decay),
        "fusion": (fusion_lr, weight_decay),
        # Gate logits get their own rate: at the fusion rate they barely move, because the
        # zero-initialised output projection grows the same scale faster (docs/repro.md).
        "fusion_gate": (fusion_lr * config.gate_lr_multiplier, 0.0),
        "vlm": (base_lr * config.vlm_lr_multiplier, config.vlm_weight_decay),
    }
    buckets: dict[str, list[Any]] = {}
    for name, param in policy.named_parameters():
        if not param.requires_grad:
            continue
        group = groups[name]
        family = "vlm" if group in VLM_GROUPS else group
        if family not in settings:
            raise AdapterValidationError(
                apt_state(policy).adapter.name if apt_state(policy) else type(policy).__name__,
                f"parameter {name!r} in group {group!r} is trainable but has no optimizer group.",
            )
        if family == "fusion" and is_gate_logit(name):
            key = "fusion_gate"
        else:
            key = family if param.ndim >= 2 else f"{family}_no_decay"
        buckets.setdefault(key, []).append(param)
    result = []
    for key, params in buckets.items():
        family = key.removesuffix("_no_decay")
        lr, wd = settings[family]
        result.append({"name": key, "params": params, "lr": lr, "weight_decay": 0.0 if key.endswith("_no_decay") else wd})
    return result
