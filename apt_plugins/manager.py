"""The plugin manager: loads built-in and third-party plugins from one entry-point group.

In-tree adapters are found exactly like external ones, through the ``apt_plugins.adapters``
entry-point group. A plugin that fails to import, or whose adapters fail validation, is recorded
under its name (see ``apt-plugins list``) and does not stop the others.

Environment variables:

- ``APT_PLUGINS_BLOCK``: comma-separated plugin names never to load (e.g. ``lerobot_pi``).
- ``APT_PLUGINS_DISABLE_AUTOLOAD=1``: load no entry points at all (tests register plugins by hand).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import pluggy

from . import defaults, hookspecs
from .adapter import Adapter
from .errors import AdapterError
from .registry import AdapterRegistry

__all__ = [
    "ENTRY_POINT_GROUP",
    "BLOCK_ENV",
    "AUTOLOAD_ENV",
    "PluginManager",
    "get_plugin_manager",
    "reset_plugin_manager",
]

ENTRY_POINT_GROUP = "apt_plugins.adapters"
BLOCK_ENV = "APT_PLUGINS_BLOCK"
AUTOLOAD_ENV = "APT_PLUGINS_DISABLE_AUTOLOAD"


@dataclass
class PluginInfo:
    """What ``apt-plugins list`` shows for one plugin."""

    name: str
    source: str  # "builtin", "entry point <dist> <version>", "registered"
    adapters: list[str] = field(default_factory=list)
    hooks: list[str] = field(default_factory=list)
    error: str | None = None
    blocked: bool = False


class PluginManager:
    """Typed facade over :class:`pluggy.PluginManager`; host code never calls ``pm.hook`` directly."""

    def __init__(self, autoload: bool = True) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        self.pm.add_hookspecs(hookspecs)
        self.registry = AdapterRegistry()
        self.plugins: dict[str, PluginInfo] = {}
        blocked = os.environ.get(BLOCK_ENV, "")
        self.blocked = {b.strip() for b in blocked.split(",") if b.strip()}
        for name in self.blocked:
            self.pm.set_blocked(name)
        self.register_plugin(defaults, name="apt_plugins.defaults", source="builtin")
        if autoload and os.environ.get(AUTOLOAD_ENV, "") not in ("1", "true", "yes"):
            self._load_entry_points()

    # --------------------------------------------------------------------------- loading
    def _load_entry_points(self) -> None:
        def order(ep: Any) -> tuple[bool, str]:
            # apt-plugins' own adapters first: a third-party plugin sorting earlier must not be able
            # to take an in-tree adapter's name (it gets the duplicate-name error instead).
            dist = getattr(ep, "dist", None)
            return (getattr(dist, "name", None) != "apt-plugins", ep.name)

        for ep in sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=order):
            if ep.name in self.plugins:
                continue
            dist = getattr(ep, "dist", None)
            source = f"entry point ({dist.name} {dist.version})" if dist else "entry point"
            if ep.name in self.blocked:
                self.plugins[ep.name] = PluginInfo(ep.name, source, blocked=True)
                continue
            try:
                plugin = ep.load()
            # SystemExit too: a plugin calling sys.exit() at import must not end `apt-plugins list`.
            except (Exception, SystemExit) as exc:  # a broken plugin must not break the others
                self.plugins[ep.name] = PluginInfo(ep.name, source, error=f"import failed: {_describe(exc)}")
                continue
            self.register_plugin(plugin, name=ep.name, source=source)

    def register_plugin(self, plugin: Any, name: str | None = None, source: str = "registered") -> str | None:
        """Register a plugin object or module and let it register its adapters now.

        Returns the plugin name, or None if it is blocked.
        """
        name = name or getattr(plugin, "__name__", None) or repr(plugin)
        if self.pm.is_blocked(name):
            self.plugins[name] = PluginInfo(name, source, blocked=True)
            return None
        if name in self.plugins or self.pm.get_plugin(name) is not None:
            # Never replace the record (and adapters) of the plugin that holds the name already.
            raise AdapterError(f"a plugin named {name!r} is already registered ({self.plugins[name].source}); "
                               "choose another plugin name.")
        info = PluginInfo(name, source)
        try:
            self.pm.register(plugin, name=name)
            # Validate this plugin's hooks now (an ``apt_*`` impl without a spec is a typo), so one
            # broken plugin is reported under its name instead of failing the whole manager.
            self.pm.check_pending()
        except Exception as exc:
            if self.pm.get_plugin(name) is not None:
                self.pm.unregister(name=name)
            info.error = f"registration failed: {_describe(exc)}"
            self.plugins[name] = info
            return name
        self.plugins[name] = info
        info.hooks = sorted(h.name for h in self.pm.get_hookcallers(plugin) or [])
        _guard_hookimpls(self.pm, plugin, name)
        impl = next((i for i in self.pm.hook.apt_register_adapters.get_hookimpls() if i.plugin_name == name), None)
        if impl is not None:

            def register(adapter: type[Adapter] | Adapter) -> None:
                # One invalid adapter is recorded and skipped; the plugin's other adapters still register.
                try:
                    info.adapters.append(self.registry.register(adapter, plugin=name).name)
                except AdapterError as exc:
                    problem = f"apt_register_adapters failed: {_describe(exc)}"
                    info.error = f"{info.error}; {problem}" if info.error else problem

            try:
                impl.function(register=register)
            except (Exception, SystemExit) as exc:
                failure = f"apt_register_adapters failed: {_describe(exc)}"
                info.error = f"{info.error}; {failure}" if info.error else failure
        return name

    def unregister_plugin(self, name: str) -> None:
        """Unregister a plugin and the adapters it registered."""
        info = self.plugins.pop(name, None)
        if info:
            for adapter in info.adapters:
                self.registry.unregister(adapter)
        plugin = self.pm.get_plugin(name)
        if plugin is not None:
            self.pm.unregister(plugin)

    # --------------------------------------------------------------------------- facade
    def select_adapter(self, policy: Any) -> Adapter:
        """The adapter for ``policy`` (hook ``apt_select_adapter``); raises NoAdapterFoundError."""
        from .errors import NoAdapterFoundError

        adapter = self.pm.hook.apt_select_adapter(policy=policy, registry=self.registry)
        if adapter is None:
            raise NoAdapterFoundError(policy, self.registry.names())
        return adapter

    def get_adapter(self, name: str) -> Adapter:
        """The adapter registered as ``name`` (UnknownAdapterError with a suggestion otherwise)."""
        return self.registry.get(name)

    @property
    def hook(self) -> Any:
        """The raw pluggy hook relay, for the few places that broadcast events."""
        return self.pm.hook


def _check_adapter(value: Any) -> str | None:
    return None if value is None or isinstance(value, Adapter) else "an Adapter instance or None"


def _check_param_groups(value: Any) -> str | None:
    ok = value is None or (isinstance(value, list) and all(isinstance(g, dict) and "params" in g for g in value))
    return None if ok else "None or a list of dicts, each with a 'params' key"


# What the firstresult hooks must return: the first non-None result is used as is, so a wrong
# type would otherwise surface far away (inside the optimizer or the policy) without the plugin's name.
_RESULT_CHECKS = {"apt_select_adapter": _check_adapter, "apt_param_groups": _check_param_groups}


def _guard_hookimpls(pm: pluggy.PluginManager, plugin: Any, name: str) -> None:
    """Make each hook implementation of ``plugin`` name the plugin when it raises or returns a wrong type.

    AptErrors pass through unchanged: raising one is how a hook refuses a setting, and its message
    already says what and how to fix. Any other exception becomes :class:`PluginHookError`.
    """
    from .errors import AptError, PluginHookError

    for caller in pm.get_hookcallers(plugin) or []:
        if caller.name == "apt_register_adapters":  # its failures are recorded at registration
            continue
        check = _RESULT_CHECKS.get(caller.name)
        for impl in caller.get_hookimpls():
            if impl.plugin_name != name or impl.hookwrapper or impl.wrapper:
                continue
            impl.function = _guarded(impl.function, name, caller.name, check, AptError, PluginHookError)


def _guarded(function: Any, plugin: str, hook: str, check: Any, passthrough: type, error: type) -> Any:
    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            result = function(*args, **kwargs)
        except passthrough:
            raise
        except Exception as exc:
            raise error(plugin, hook, f"raised {_describe(exc)}") from exc
        problem = check(result) if check else None
        if problem:
            raise error(plugin, hook, f"returned {type(result).__name__} {result!r:.80}, expected {problem}")
        return result

    call.__wrapped__ = function
    return call


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".splitlines()[0]


_manager: PluginManager | None = None
_lock = threading.Lock()


def get_plugin_manager() -> PluginManager:
    """The process-wide plugin manager, created (and entry points loaded) on first use."""
    global _manager
    with _lock:
        if _manager is None:
            _manager = PluginManager()
        return _manager


def reset_plugin_manager() -> None:
    """Forget the process-wide manager (tests; after changing the block list)."""
    global _manager
    with _lock:
        _manager = None
