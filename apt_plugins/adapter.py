"""The adapter contract: what an architecture adapter must provide.

An adapter teaches apt-plugins one host architecture (LeRobot pi0, GR00T N1.7, ...). It never
modifies the host's classes: it swaps the class of existing module *instances* for subclasses,
adds new modules, and describes the host's parameter layout. The core does the rest (freezing,
LoRA, optimizer groups, strict checkpoints, the conformance suite).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:  # pragma: no cover
    from .config import AptConfig
    from .testing.kit import ConformanceKit

__all__ = ["Adapter", "VLM_GROUPS", "GROUPS"]

#: Parameter groups of the VLM. Stage 1 freezes them all; Stage 2 trains them per ``vlm_mode``.
VLM_GROUPS: tuple[str, ...] = ("vision_tower", "projector", "language_model")
#: Every group an adapter's :meth:`Adapter.module_groups` may name. ``unused`` is for parameters the
#: host keeps but never uses on the action path (a dead ``lm_head``); they stay frozen.
GROUPS: tuple[str, ...] = (*VLM_GROUPS, "action_expert", "fusion", "unused")


class Adapter:
    """Base class of an architecture adapter.

    Required class attributes (checked when the adapter is registered):

    - ``name``: lowercase snake_case, unique (``lerobot_pi0``).
    - ``host``: the host distribution whose version is checked (``lerobot``).
    - ``supported_host_versions``: a PEP 440 specifier (``==0.6.1``).
    - ``description``: one line for ``apt-plugins list``.

    Optional: ``policy_types`` (the host type names it handles, e.g. ``("pi0",)``),
    ``apt_policy_types`` (the APT types it registers with the host, e.g. ``("apt_pi0",)``, paired
    with ``policy_types`` by position), ``host_modules`` (modules to import so the host knows those
    types, e.g. LeRobot ``configuration_apt_pi0`` modules).

    Required methods: :meth:`matches`, :meth:`module_groups`, :meth:`inject`. Everything APT adds to a
    model must have a module path containing ``.apt_`` (the parameter prefix), so APT tensors can
    be found by name in state dicts, optimizer groups and manifests.
    """

    name: ClassVar[str]
    host: ClassVar[str]
    supported_host_versions: ClassVar[str]
    description: ClassVar[str] = ""
    policy_types: ClassVar[tuple[str, ...]] = ()
    apt_policy_types: ClassVar[tuple[str, ...]] = ()
    host_modules: ClassVar[tuple[str, ...]] = ()
    parameter_prefix: ClassVar[str] = "apt_"

    # ----------------------------------------------------------------------------- required
    def matches(self, policy: Any) -> bool:
        """Return True if this adapter handles ``policy`` (a host policy or model instance)."""
        raise NotImplementedError

    def module_groups(self, policy: Any) -> dict[str, list[str]]:
        """Map each group in :data:`GROUPS` to module-path prefixes (relative to ``policy``).

        Every parameter of the prepared policy must fall under exactly one prefix (the longest
        match wins); the core refuses to prepare a stage otherwise, so nothing trains or freezes by
        accident.
        """
        raise NotImplementedError

    def inject(self, policy: Any, config: AptConfig) -> None:
        """Install the stage on ``policy`` in place.

        Stage 1: language masking on every attention path that reaches the action/state tokens,
        the VLM prefix computed without autograd when it is frozen. Stage 2: additionally the gated
        fusion layers (zero-initialised output when ``config.fusion_zero_init``), under module
        paths containing ``.apt_``. Must be idempotent for the same config and raise
        :class:`~apt_plugins.errors.AptConfigError` for settings the host cannot honour.
        """
        raise NotImplementedError

    # ----------------------------------------------------------------------------- optional
    def lora_targets(self, policy: Any, config: AptConfig) -> tuple[str, list[str] | str]:
        """Return ``(module path of the VLM language model, targets)`` for LoRA.

        Targets are module-name suffixes (a list) or a regex over full module names (a str), as peft's
        ``target_modules`` accepts them. ``config.lora_targets`` overrides them when set.
        """
        raise NotImplementedError(f"adapter {self.name!r} does not support vlm_mode='lora'")

    def masking_summary(self, policy: Any, config: AptConfig) -> str:
        """One human-readable line describing the language masking in force."""
        return "language masked from the action path" if config.masks_language_in_inherited_layers else (
            "language visible to inherited layers"
        )

    def fusion_prefixes(self, policy: Any) -> list[str]:
        """State-dict prefixes of the Stage-2 fusion layers: the only tensors a promotion may add."""
        return [p + "." for p in self.module_groups(policy).get("fusion", [])]

    def bind_inputs(self, policy: Any, batch: dict[str, Any]) -> Any:
        """Context manager that hands the model per-call inputs beyond the host's own arguments.

        The host calls its model with a fixed signature; pi0.5 also needs the task-token mask from the
        batch. Default: nothing to bind.
        """
        import contextlib

        return contextlib.nullcontext()

    def normalize_state_dict(self, policy: Any, state_dict: dict[str, Any]) -> dict[str, Any]:
        """Map a checkpoint's tensor names onto ``policy``'s (the host's own legacy renames). Default: as is."""
        return state_dict

    def rewrite_processor_config(
        self, filename: str, data: dict[str, Any], config: AptConfig
    ) -> tuple[dict[str, Any], list[str]]:
        """Turn a host's saved processor pipeline config into this adapter's APT one.

        Called with the parsed JSON of each processor file of a host checkpoint
        (``policy_preprocessor.json``, ``policy_postprocessor.json`` for LeRobot) when the checkpoint
        is retrofitted or loaded into an APT type with ``--policy.pretrained_path``. Return the new
        config and one human-readable line per change (printed to the user); return ``data`` and
        ``[]`` when it needs nothing, which includes a config that is already the APT one (the
        method must be idempotent). Never modify ``data`` in place. Default: nothing to change (the
        host's processors already emit what the APT model reads).

        :param filename: the processor file's name, e.g. ``"policy_preprocessor.json"``.
        :param data: its parsed content (``{"name": ..., "steps": [{"registry_name": ..., ...}]}``).
        :param config: the APT configuration the processors will serve.
        """
        return data, []

    def seeded_noise(self, policy: Any, seeds: list[int]) -> Any:
        """Context manager under which a training forward draws each batch row's randomness from its own seed.

        Row ``i`` of the batch gets its flow noise, flow time (and any other training-time draw,
        e.g. a state dropout) from generators seeded by ``seeds[i]`` (the sample's dataset index), so
        the loss of a sample does not depend on which process or batch it lands in. Used by the
        DeepSpeed entry point's ``--ds.deterministic_noise`` (1- vs N-process loss trajectories).
        Default: replace ``policy.model.sample_noise(shape, device)`` and
        ``sample_time(bsize, device)`` (LeRobot's pi0, pi0.5 and SmolVLA draw through these).

        :raises AdapterError: the policy draws its noise some other way and the adapter does not
            override this method.
        """
        import contextlib

        import torch

        from .errors import AdapterError

        model = getattr(policy, "model", None)
        if model is None or not hasattr(model, "sample_noise") or not hasattr(model, "sample_time"):
            raise AdapterError(
                f"adapter {self.name!r}: {type(policy).__name__} draws its training noise without "
                "model.sample_noise/sample_time, so per-sample seeded noise (--ds.deterministic_noise) "
                "needs the adapter to override Adapter.seeded_noise."
            )

        def rows(fn):
            return torch.cat([fn(torch.Generator().manual_seed(1_000_003 * s + 17)) for s in seeds])

        def sample_noise(shape, device):
            return rows(lambda g: torch.randn((1, *shape[1:]), generator=g)).to(device)

        def sample_time(bsize, device):
            return rows(lambda g: torch.rand(1, generator=g) * 0.998 + 0.001).to(device)

        @contextlib.contextmanager
        def patched():
            model.__dict__["sample_noise"], model.__dict__["sample_time"] = sample_noise, sample_time
            try:
                yield
            finally:
                model.__dict__.pop("sample_noise", None)
                model.__dict__.pop("sample_time", None)

        return patched()

    def retrofit_processors(self, directory: Any, config: AptConfig) -> None:
        """Adapt the host processor files copied into a retrofitted checkpoint, beyond what
        :meth:`rewrite_processor_config` does (which retrofit applies first). Default: nothing more."""

    def probe_batch(self, policy: Any, variant: str = "original", seed: int = 0) -> dict[str, Any]:
        """A model-ready batch (after the host's preprocessing) sized for ``policy``'s config.

        ``variant`` changes only the instruction: ``"original"``, ``"swapped"`` (other words, same
        length), ``"empty"`` (no instruction tokens) or ``"shuffled"`` (same words, permuted). Used by
        retrofit and verify when no dataset is given.
        """
        raise NotImplementedError(f"adapter {self.name!r} provides no probe batch")

    def gate_values(self, policy: Any) -> dict[str, Any]:
        """Return ``{layer name: sigmoid(gate) tensor}`` for each fusion layer (empty in Stage 1)."""
        return {}

    def host_version(self) -> str | None:
        """The installed version of :attr:`host`, or None when it is not installed."""
        from importlib import metadata

        try:
            return metadata.version(self.host)
        except metadata.PackageNotFoundError:
            return None

    def check_host_version(self) -> None:
        """Raise :class:`~apt_plugins.errors.HostVersionError` if the host version is unsupported."""
        from packaging.specifiers import SpecifierSet

        from .errors import HostVersionError

        installed = self.host_version()
        if installed is None or installed not in SpecifierSet(self.supported_host_versions):
            raise HostVersionError(self.name, self.host, installed, self.supported_host_versions)

    def conformance_kit(self) -> ConformanceKit | None:
        """Return the kit that builds tiny real host instances for the conformance suite.

        An adapter without a kit is reported as *untested* by the suite (a failing check, not a
        skip), so every in-tree adapter ships one.
        """
        return None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {getattr(self, 'name', '?')!r}>"
