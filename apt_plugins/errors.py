"""The one error taxonomy of apt-plugins.

Every error says *who* (field, adapter, checkpoint), *what* (the value that was wrong) and *how to
fix it*, in that order. Catch :class:`AptError` to catch them all.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = [
    "AptError",
    "AptConfigError",
    "AdapterError",
    "AdapterValidationError",
    "UnknownAdapterError",
    "NoAdapterFoundError",
    "HostVersionError",
    "CheckpointMismatchError",
    "IncompleteCheckpointError",
    "LanguageMaskError",
    "PrefixCacheError",
    "NoLanguageInputError",
    "InstructionNotDeliveredError",
    "PluginHookError",
]


class AptError(Exception):
    """Base class of every error raised by apt-plugins."""


class AptConfigError(AptError):
    """An APT configuration value is invalid.

    Deliberately not a ValueError: config parsers such as draccus wrap ValueErrors in their own
    generic message, which would hide the field, the value and the fix.

    :param field: dotted path of the offending field (``apt.stage``).
    :param value: the value that was given.
    :param fix: what to do instead (allowed values, or the option to change).
    """

    def __init__(self, field: str, value: object, fix: str):
        self.field = field
        self.value = value
        self.fix = fix
        super().__init__(f"invalid APT config: {field}={value!r}. {fix}")


class AdapterError(AptError):
    """Base class for adapter lookup and validation problems."""


class AdapterValidationError(AdapterError):
    """An adapter failed validation when it was registered.

    :param adapter: the adapter name (or class name when the name itself is missing).
    :param message: what is wrong and how to fix it.
    """

    def __init__(self, adapter: str, message: str):
        self.adapter = adapter
        super().__init__(f"adapter {adapter!r} is invalid: {message}")


class UnknownAdapterError(AdapterError, KeyError):
    """No adapter is registered under the requested name."""

    def __init__(self, name: str, known: Iterable[str], suggestion: str | None = None):
        self.name = name
        self.known = sorted(known)
        hint = f" Did you mean {suggestion!r}?" if suggestion else ""
        super().__init__(
            f"unknown adapter {name!r}.{hint} Known adapters: {', '.join(self.known) or '(none)'}. "
            "Run `apt-plugins list` to see what is installed and what failed to load."
        )

    def __str__(self) -> str:  # KeyError would otherwise repr() the message
        return self.args[0]


class NoAdapterFoundError(AdapterError):
    """No registered adapter accepts the given host policy or model."""

    def __init__(self, obj: object, known: Iterable[str]):
        self.obj_type = f"{type(obj).__module__}.{type(obj).__qualname__}"
        super().__init__(
            f"no APT adapter accepts a {self.obj_type}. Registered adapters: "
            f"{', '.join(sorted(known)) or '(none)'}. Install the adapter for this host "
            "(see `apt-plugins list`) or write one (CONTRIBUTING.md, 'Add an adapter')."
        )


class HostVersionError(AptError):
    """The installed host library version is outside the adapter's supported range."""

    def __init__(self, adapter: str, host: str, installed: str | None, supported: str):
        self.adapter = adapter
        self.host = host
        self.installed = installed
        self.supported = supported
        have = f"version {installed} is installed" if installed else "it is not installed"
        super().__init__(
            f"adapter {adapter!r} supports {host} {supported}, but {have}. "
            f"Install a supported version: pip install '{host}{supported}'."
        )


class CheckpointMismatchError(AptError):
    """A checkpoint does not match the model it is loaded into.

    Missing and unexpected tensors are grouped by module, and the likely cause is stated.

    :param source: the checkpoint path.
    :param missing: parameter names the model expects but the checkpoint lacks.
    :param unexpected: tensor names in the checkpoint the model does not have.
    :param cause: the most likely reason and its fix.
    """

    def __init__(
        self,
        source: str,
        missing: Iterable[str] = (),
        unexpected: Iterable[str] = (),
        cause: str = "",
        mismatched: Iterable[str] = (),
    ):
        self.source = str(source)
        self.missing = sorted(missing)
        self.unexpected = sorted(unexpected)
        self.mismatched = sorted(mismatched)
        self.cause = cause
        lines = [f"checkpoint {self.source} does not match the model; nothing was loaded."]
        for title, keys in (
            ("missing from the checkpoint", self.missing),
            ("unexpected in the checkpoint", self.unexpected),
            ("shape mismatch", self.mismatched),
        ):
            if keys:
                lines.append(f"  {title} ({len(keys)} tensors):")
                lines.extend(f"    {group}: {n} tensors, e.g. {ex}" for group, n, ex in group_keys(keys))
        if cause:
            lines.append(f"  likely cause: {cause}")
        super().__init__("\n".join(lines))


class IncompleteCheckpointError(CheckpointMismatchError):
    """A checkpoint directory was left by a write that did not finish (a killed save).

    A :class:`CheckpointMismatchError`, so code that catches that catches this too.

    :param source: the checkpoint path.
    :param cause: how the interruption was recognised, and what to use instead.
    """

    def __init__(self, source: str, cause: str):
        super().__init__(source, cause=cause)
        self.args = (f"checkpoint {self.source} is incomplete; nothing was loaded. {cause}",)

    def __str__(self) -> str:
        return self.args[0]


class PluginHookError(AdapterError):
    """A plugin's hook implementation raised, or returned a value of the wrong type.

    :param plugin: the plugin name (as in ``apt-plugins list``).
    :param hook: the hook name.
    :param problem: what went wrong.
    """

    def __init__(self, plugin: str, hook: str, problem: str):
        self.plugin = plugin
        self.hook = hook
        super().__init__(
            f"plugin {plugin!r} failed in hook {hook}: {problem}. Fix or update the plugin, or skip it with "
            f"APT_PLUGINS_BLOCK={plugin}."
        )


class LanguageMaskError(AptError):
    """The language mask APT needs cannot be built from the inputs given."""


class PrefixCacheError(AptError):
    """The prefix cache (``apt.prefix_cache``) cannot give the result it promises for these inputs.

    Raised when a frame comes back with different images than when it was cached (image augmentation
    is on, or the dataset changed), when the VLM is not frozen, or when a stored value does not fit
    the storage dtype. Nothing is cached or returned for the failing batch.
    """


class NoLanguageInputError(AptError):
    """A policy cannot take an instruction: its pre-processor turns no instruction into model inputs.

    :param policy: the policy type or checkpoint.
    :param detail: what was tried (the instructions and the batch keys that stayed the same).
    """

    def __init__(self, policy: str, detail: str):
        self.policy = policy
        super().__init__(
            f"policy {policy} takes no instruction: {detail} Evaluate a language-conditioned policy "
            "(pi0, pi05, smolvla, groot or an apt_* type); for a policy without language input an "
            "instruction-following score has no meaning."
        )


class InstructionNotDeliveredError(AptError):
    """A changed instruction did not reach the policy: the tokens it saw equal the original's.

    :param variant: the instruction variant (``task_swap``, ``paraphrase``, ...).
    :param original: the original instruction.
    :param changed: the changed instruction that should have produced other tokens.
    :param where: where the tokens were read (frame, episode step).
    :param fix: the likely cause and fix.
    """

    def __init__(self, variant: str, original: str, changed: str, where: str, fix: str):
        self.variant, self.original, self.changed = variant, original, changed
        super().__init__(
            f"instruction variant {variant!r} ({where}): the changed instruction {changed!r} never reached the "
            f"policy in place of the original {original!r}. {fix}"
        )


def group_keys(keys: Iterable[str], depth: int = 4) -> list[tuple[str, int, str]]:
    """Group dotted tensor names by their first ``depth`` components, layer indices folded to ``*``.

    Returns ``(group, count, example)`` rows, largest group first.
    """
    groups: dict[str, list[str]] = {}
    for key in keys:
        parts = ["*" if p.isdigit() else p for p in key.split(".")[:-1]]
        groups.setdefault(".".join(parts[:depth]) or "<root>", []).append(key)
    return sorted(((g, len(v), v[0]) for g, v in groups.items()), key=lambda r: (-r[1], r[0]))
