"""LeRobot integration shared by every LeRobot-hosted adapter (needs ``apt-plugins[lerobot]``).

- :class:`AptPolicyMixin`: what makes a LeRobot policy class an APT policy type (stage prepared at
  construction, strict loading with Stage 1 -> Stage 2 promotion, manifest, optimizer groups,
  gate statistics in the training log, optional frozen-weight proof).
- :func:`register_lerobot_types`: import every adapter's host modules so LeRobot knows the APT
  types (used by the ``lerobot_policy_apt`` shim distribution that LeRobot auto-imports).
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__all__ = ["AptPolicyMixin", "register_lerobot_types", "apt_type_for"]


def register_lerobot_types() -> list[str]:
    """Import the host modules of every registered LeRobot adapter; return the APT types now known."""
    from .. import get_plugin_manager

    types: list[str] = []
    for adapter in get_plugin_manager().registry:
        if adapter.host != "lerobot":
            continue
        for module in adapter.host_modules:
            import_module(module)
        types.extend(adapter.apt_policy_types)
    import_module("apt_plugins.lerobot.env")  # --env.type=apt_blocks for lerobot-eval on the demo task
    return types


def apt_type_for(stock_type: str) -> tuple[Any, str]:
    """The adapter and APT policy type that wrap the stock LeRobot type ``stock_type`` (``pi0``).

    :raises NoAdapterFoundError-like AdapterError: no adapter handles that type.
    """
    from .. import get_plugin_manager
    from ..errors import AdapterError

    known = {}
    for adapter in get_plugin_manager().registry:
        for stock, apt in zip(adapter.policy_types, adapter.apt_policy_types, strict=False):
            known[stock] = (adapter, apt)
            known[apt] = (adapter, apt)
    if stock_type not in known:
        raise AdapterError(
            f"no APT adapter handles LeRobot policy type {stock_type!r}; supported types: "
            f"{', '.join(sorted(k for k in known if not k.startswith('apt_')))}. "
            "Run `apt-plugins list` to see the installed adapters."
        )
    return known[stock_type]


def __getattr__(name: str) -> Any:
    if name == "AptPolicyMixin":
        from .policy import AptPolicyMixin

        return AptPolicyMixin
    raise AttributeError(name)
