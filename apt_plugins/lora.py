"""Which VLM modules get LoRA: the adapter's (or the user's) targets, minus what the actions never use.

Targets follow peft's ``target_modules`` exactly: a list/tuple of module-name suffixes (a module
matches when its name is the suffix or ends with ``"." + suffix``) or one regex string matched
against the whole module name (``re.fullmatch``), names relative to the language model. The match
itself is peft's own (``check_target_module_exists``), so nothing here re-implements its rules.
Modules under the adapter's ``unused`` group (pi0's last-layer ``q_proj``, LM heads) are dropped:
LoRA there would add tensors that never receive a gradient. peft then gets the explicit list of
module names that remain.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .errors import AptConfigError

__all__ = ["LoraTargets", "resolve_lora_targets"]


@dataclass
class LoraTargets:
    """The resolved LoRA targets of one policy (names relative to :attr:`path`)."""

    path: str
    requested: list[str] | str
    modules: list[str] = field(default_factory=list)
    skipped_unused: list[str] = field(default_factory=list)


def resolve_lora_targets(policy: Any, adapter: Any, config: Any) -> LoraTargets:
    """Resolve ``config.lora_targets`` (or the adapter's default) to the module names LoRA wraps.

    :raises AptConfigError: ``apt.lora_targets`` matches no module of the language model, or only
        modules the action path never uses.
    """
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    path, default = adapter.lora_targets(policy, config)
    requested: list[str] | str = config.lora_targets if config.lora_targets is not None else default
    requested = requested if isinstance(requested, str) else list(requested)
    probe = LoraConfig(target_modules=requested)
    unused = [p for p in adapter.module_groups(policy).get("unused", [])]
    result = LoraTargets(path=path, requested=requested)
    for name, _ in policy.get_submodule(path).named_modules():
        if not name or not check_target_module_exists(probe, name):
            continue
        full = f"{path}.{name}"
        if any(full == p or full.startswith(p + ".") for p in unused):
            result.skipped_unused.append(name)
        else:
            result.modules.append(name)
    if not result.modules:
        field_name = "apt.lora_targets" if config.lora_targets is not None else f"{adapter.name}.lora_targets()"
        what = ("only modules the action path never uses (" + ", ".join(result.skipped_unused[:4]) + ")"
                if result.skipped_unused else f"no module of {path}")
        hint = (" A string is a regex over whole module names (peft semantics): for suffixes write a list, "
                "e.g. [q_proj,v_proj], or a regex such as '.*\\.(q|v)_proj'." if isinstance(requested, str) else
                " List entries are module-name suffixes, e.g. q_proj, self_attn.v_proj.")
        raise AptConfigError(field_name, requested, f"matches {what}.{hint}")
    return result
