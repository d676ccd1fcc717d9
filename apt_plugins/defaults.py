"""Built-in hook implementations. They run last, so any plugin can override them."""

from __future__ import annotations

from typing import Any

from .hookspecs import hookimpl


@hookimpl(trylast=True)
def apt_select_adapter(policy: Any, registry: Any) -> Any:
    """First registered adapter whose ``matches(policy)`` is true."""
    return registry.find(policy)


@hookimpl(trylast=True)
def apt_param_groups(policy: Any, adapter: Any, config: Any, base_lr: float, weight_decay: float) -> Any:
    """Only trainable parameters, in named non-empty groups (see the hookspec)."""
    from .stages import apt_state, classify_parameters, default_param_groups

    state = apt_state(policy)
    groups = state.groups if state is not None else classify_parameters(policy, adapter)
    return default_param_groups(policy, config, groups, base_lr, weight_decay)
