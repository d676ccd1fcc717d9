"""The adapter registry: validates adapters when they register and explains unknown names."""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterator
from typing import Any

from .adapter import Adapter
from .errors import AdapterValidationError, UnknownAdapterError

__all__ = ["AdapterRegistry"]

_NAME_RE = re.compile(r"^[a-z][a-z0-9]*(_[a-z0-9]+)*$")
_REQUIRED_METHODS = ("matches", "module_groups", "inject")


class AdapterRegistry:
    """Holds the registered adapters by name."""

    def __init__(self) -> None:
        self._adapters: dict[str, Adapter] = {}
        self._owners: dict[str, str] = {}

    def register(self, adapter: type[Adapter] | Adapter, plugin: str = "<direct>") -> Adapter:
        """Validate and register ``adapter`` (a subclass of :class:`Adapter`, or an instance).

        :param plugin: name of the plugin registering it, used in error messages.
        :raises AdapterValidationError: malformed adapter, or the name is already taken.
        """
        cls = adapter if isinstance(adapter, type) else type(adapter)
        label = getattr(adapter, "name", None) or cls.__qualname__
        if not issubclass(cls, Adapter):
            raise AdapterValidationError(str(label), f"{cls.__qualname__} must subclass apt_plugins.Adapter.")
        try:
            instance = adapter() if isinstance(adapter, type) else adapter
        except TypeError as exc:
            raise AdapterValidationError(str(label), f"the adapter class must be constructible without arguments ({exc}).") from None
        for attr in ("name", "host", "supported_host_versions", "description"):
            value = getattr(instance, attr, None)
            if not isinstance(value, str) or not value.strip():
                raise AdapterValidationError(
                    label, f"class attribute {attr!r} must be a non-empty string (got {value!r})."
                )
        if not _NAME_RE.match(instance.name):
            raise AdapterValidationError(
                label, "the name must be lowercase snake_case (letters, digits, single underscores)."
            )
        try:
            from packaging.specifiers import InvalidSpecifier, SpecifierSet

            SpecifierSet(instance.supported_host_versions)
        except InvalidSpecifier:
            raise AdapterValidationError(
                label,
                f"supported_host_versions={instance.supported_host_versions!r} is not a PEP 440 "
                "specifier (e.g. '>=0.6.1,<0.7').",
            ) from None
        missing = [m for m in _REQUIRED_METHODS if getattr(cls, m) is getattr(Adapter, m)]
        if missing:
            raise AdapterValidationError(label, f"must implement {', '.join(missing)}.")
        if not instance.parameter_prefix.startswith("apt_"):
            raise AdapterValidationError(label, "parameter_prefix must start with 'apt_'.")
        if instance.name in self._adapters:
            raise AdapterValidationError(
                label,
                f"the name is already registered by plugin {self._owners[instance.name]!r}; "
                f"plugin {plugin!r} must choose another name.",
            )
        self._adapters[instance.name] = instance
        self._owners[instance.name] = plugin
        return instance

    def unregister(self, name: str) -> None:
        """Remove an adapter (tests and plugin unloading)."""
        self._adapters.pop(name, None)
        self._owners.pop(name, None)

    def get(self, name: str) -> Adapter:
        """Return the adapter called ``name``; raise :class:`UnknownAdapterError` with a suggestion."""
        try:
            return self._adapters[name]
        except KeyError:
            close = difflib.get_close_matches(name, self._adapters, n=1)
            raise UnknownAdapterError(name, self._adapters, close[0] if close else None) from None

    def owner(self, name: str) -> str:
        """The plugin that registered ``name``."""
        return self._owners[name]

    def find(self, policy: Any) -> Adapter | None:
        """The first adapter whose ``matches(policy)`` is true, or None."""
        for adapter in self._adapters.values():
            if adapter.matches(policy):
                return adapter
        return None

    def names(self) -> list[str]:
        """Registered adapter names, in registration order."""
        return list(self._adapters)

    def __iter__(self) -> Iterator[Adapter]:
        return iter(list(self._adapters.values()))

    def __len__(self) -> int:
        return len(self._adapters)

    def __contains__(self, name: object) -> bool:
        return name in self._adapters
