"""Hook specifications: the contract between apt-plugins and its plugins.

Every hook is prefixed ``apt_``. Implement one by decorating a function (or method) of your
plugin with :data:`apt_plugins.hookimpl`; an implementation may accept fewer arguments than the
spec, so specs can gain arguments without breaking plugins. A plugin is a module or object listed
under the ``apt_plugins.adapters`` entry-point group (see CONTRIBUTING.md).

Hooks are grouped by lifecycle: discovery, stage setup, optimisation, checkpoints, training.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:  # pragma: no cover - typing only
    from collections.abc import Callable

    from .adapter import Adapter
    from .config import AptConfig
    from .registry import AdapterRegistry
    from .stages import StageReport

PROJECT_NAME = "apt_plugins"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)
"""Marker to be imported and used in plugins (``@hookimpl def apt_register_adapters(register): ...``)."""


# --------------------------------------------------------------------------------------------------
# Discovery
# --------------------------------------------------------------------------------------------------
@hookspec
def apt_register_adapters(register: Callable[[type[Adapter] | Adapter], None]) -> None:
    """Register this plugin's architecture adapters.

    Called once per plugin when the plugin manager loads it (at the first use of the registry, or
    immediately for a plugin registered later with ``PluginManager.register_plugin``). Errors raised
    here are reported under the plugin's name by ``apt-plugins list`` and do not affect other plugins.

    :param register: call it with each :class:`~apt_plugins.Adapter` subclass (or instance). The
        registry validates the adapter and raises
        :class:`~apt_plugins.errors.AdapterValidationError` if it is malformed or its name is taken.
    """


@hookspec(firstresult=True)
def apt_select_adapter(policy: Any, registry: AdapterRegistry) -> Adapter | None:
    """Choose the adapter for a host policy or model.

    Stops at first non-None result, see firstresult. The built-in implementation runs last and
    returns the first registered adapter whose ``matches(policy)`` is true. Implement this to
    override the choice (for example to pick a generation-specific adapter).

    Called by :func:`apt_plugins.prepare_stage` when it is not told which adapter to use (a bare host
    policy). The APT policy types (``apt_pi0``, ...) name their adapter and do not consult it.

    :param policy: the host object (a LeRobot ``PreTrainedPolicy``, an openpi model, ...).
    :param registry: the adapter registry, to look adapters up by name.
    """


# --------------------------------------------------------------------------------------------------
# Stage setup
# --------------------------------------------------------------------------------------------------
@hookspec
def apt_prepare_stage(policy: Any, adapter: Adapter, config: AptConfig, report: StageReport) -> None:
    """Observe or extend a stage right after it was prepared on ``policy``.

    Called by :func:`apt_plugins.prepare_stage` after the adapter injected the language masks (and,
    in Stage 2, the gated fusion layers), trainability was applied and LoRA was attached. All
    implementations are called. A plugin may register further modules here (and set their
    ``requires_grad``); parameters are re-classified afterwards, so anything it adds must lie under
    one of the adapter's module groups, or preparation fails naming the parameter.

    :param policy: the host policy, already prepared.
    :param adapter: the adapter that prepared it.
    :param config: the validated APT configuration.
    :param report: what was done: parameter groups with trainable/frozen counts and the masking.
    """


# --------------------------------------------------------------------------------------------------
# Optimisation
# --------------------------------------------------------------------------------------------------
@hookspec(firstresult=True)
def apt_param_groups(
    policy: Any, adapter: Adapter, config: AptConfig, base_lr: float, weight_decay: float
) -> list[dict[str, Any]] | None:
    """Build the optimizer parameter groups for a prepared policy.

    Stops at first non-None result, see firstresult. The built-in implementation runs last and
    returns only trainable parameters in non-empty, named groups: the action expert at ``base_lr``,
    the fusion layers at ``base_lr * fusion_lr_multiplier``, their gate logits in ``fusion_gate`` at
    that rate times ``gate_lr_multiplier`` (weight decay 0), the VLM (full or LoRA) at
    ``base_lr * vlm_lr_multiplier`` with ``vlm_weight_decay``; norms and biases (every other
    parameter with fewer than two dimensions) go to ``*_no_decay`` twins with weight decay 0.

    Called by :func:`apt_plugins.param_groups`, which the APT policies' ``get_optim_params`` use.

    :param policy: the prepared host policy.
    :param adapter: its adapter.
    :param config: the validated APT configuration.
    :param base_lr: the optimizer's learning rate (LeRobot: ``optimizer_lr``).
    :param weight_decay: the optimizer's weight decay.
    :return: a list of ``{"name", "params", "lr", "weight_decay"}`` dicts, or None to defer.
    """


# --------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------
@hookspec
def apt_checkpoint_saved(policy: Any, path: str, manifest: dict[str, Any]) -> None:
    """Called after an APT policy wrote a checkpoint directory.

    :param policy: the policy that was saved.
    :param path: the checkpoint directory.
    :param manifest: the ``apt_manifest.json`` content written next to the weights.
    """


@hookspec
def apt_checkpoint_loaded(policy: Any, path: str, report: dict[str, Any]) -> None:
    """Called after a checkpoint was loaded strictly into an APT policy.

    :param policy: the policy that was loaded.
    :param path: the checkpoint directory or file.
    :param report: ``{"source": str, "loaded": [...], "fresh": [...], "source_stage": int | None}``.
    """


@hookspec
def apt_stage_promoted(policy: Any, path: str, report: dict[str, Any]) -> None:
    """Called when a Stage-1 checkpoint was promoted into a Stage-2 policy.

    :param policy: the Stage-2 policy.
    :param path: the Stage-1 checkpoint.
    :param report: as for :func:`apt_checkpoint_loaded`; ``fresh`` lists the new fusion tensors.
    """


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------
@hookspec
def apt_train_step(policy: Any, step: int | None, metrics: dict[str, float]) -> None:
    """Observe a training step (gate and drift logging).

    Called by the APT policies' ``update()``, which LeRobot's training loop calls after every
    optimizer step. ``metrics`` already holds the gate statistics (``apt/gate_mean/<layer>``,
    ``apt/gate_std/<layer>``); implementations may add entries.

    :param policy: the policy being trained.
    :param step: the optimizer step if known, else None.
    :param metrics: a mutable mapping of scalar metrics.
    """
