"""What makes a LeRobot policy class an APT policy type.

Mixed in *before* the host policy class (``class APTPI0Policy(AptPolicyMixin, PI0Policy)``) with
``adapter_name`` naming the adapter. The host class stays unmodified; the mixin adds: the stage
prepared at construction (and its table logged), strict checkpoint loading with Stage 1 -> Stage 2
promotion, ``apt_manifest.json`` next to the weights, the adapter's optimizer groups, gate
statistics in every training-log line, and the optional frozen-weight proof (``apt.check_frozen``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

import apt_plugins
from apt_plugins import (
    AptConfig,
    AptError,
    CheckpointMismatchError,
    IncompleteCheckpointError,
    apt_state,
    explain_mismatch,
    fingerprint,
    gate_statistics,
    get_plugin_manager,
    load_state_dict_strict,
    param_groups,
    prepare_stage,
    read_manifest,
    write_manifest,
)
from apt_plugins.checkpoint import check_manifest_against_weights, weights_summary

from .processors import restore_pretrained_path, use_apt_processors

logger = logging.getLogger("apt_plugins")

__all__ = ["AptPolicyMixin", "resolve_checkpoint_dir"]

_HUB_KWARGS = ("force_download", "resume_download", "proxies", "token", "cache_dir", "local_files_only", "revision")


class AptPolicyMixin:
    """Turns a LeRobot ``PreTrainedPolicy`` subclass into an APT policy type (see module docstring)."""

    #: name of the registered adapter that prepares this policy
    adapter_name: str

    def __init__(self, config: Any, **kwargs: Any):
        apt = AptConfig.from_settings(config.apt, prefix="policy.apt")
        super().__init__(config, **kwargs)
        self.apt_report = prepare_stage(self, apt, adapter=self.adapter_name)
        self._apt_frozen_fingerprints: dict[str, str] | None = None
        logger.info("%s\n%s", type(self).__name__, self.apt_report.format_table())

    # ------------------------------------------------------------------ config
    @property
    def apt_config(self) -> AptConfig:
        """The validated APT configuration of this policy."""
        return apt_state(self).config

    @property
    def apt_adapter(self) -> Any:
        """The adapter that prepared this policy."""
        return apt_state(self).adapter

    # ------------------------------------------------------------------ LeRobot API
    def forward(self, batch: dict[str, Any], *args: Any, **kwargs: Any):
        restore_pretrained_path(self)  # the processors exist by the first step
        if self.apt_config.check_frozen and self._apt_frozen_fingerprints is None and self.training:
            self._apt_frozen_fingerprints = fingerprint(self, frozen_only=True)
            logger.info("APT check_frozen: fingerprinted %d frozen tensors", len(self._apt_frozen_fingerprints))
        with self.apt_adapter.bind_inputs(self, batch):
            loss, output = super().forward(batch, *args, **kwargs)
        if output is not None:
            output.update(gate_statistics(self))  # LeRobot logs scalar outputs (console and wandb)
        return loss, output

    @torch.no_grad()
    def predict_action_chunk(self, batch: dict[str, Any], **kwargs: Any):
        with self.apt_adapter.bind_inputs(self, batch):
            return super().predict_action_chunk(batch, **kwargs)

    def get_optim_params(self) -> list[dict[str, Any]]:
        """Trainable parameters only, in the adapter's named groups (own lr, no decay on gates/norms)."""
        restore_pretrained_path(self)  # LeRobot builds the optimizer right after the processors
        return param_groups(self, self.config.optimizer_lr, self.config.optimizer_weight_decay)

    def update(self) -> dict[str, float]:
        """Called by LeRobot's training loop after each optimizer step: gate statistics + hook."""
        metrics = gate_statistics(self)
        get_plugin_manager().hook.apt_train_step(policy=self, step=None, metrics=metrics)
        return metrics

    # ------------------------------------------------------------------ frozen-weight proof
    def verify_frozen(self, state_dict: dict[str, Any] | None = None) -> int:
        """Check every fingerprinted frozen tensor; raise :class:`AptError` naming any that changed.

        ``state_dict``: check these (gathered) tensors instead of the module's own, for engines that
        partition parameters (DeepSpeed ZeRO-3). Returns the number of tensors checked (0 when nothing
        was fingerprinted yet).
        """
        from apt_plugins.checkpoint import tensor_fingerprint

        if not self._apt_frozen_fingerprints:
            return 0
        if state_dict is not None:
            now = {n: tensor_fingerprint(state_dict[n]) for n in self._apt_frozen_fingerprints if n in state_dict}
        else:
            now = fingerprint(self, names=self._apt_frozen_fingerprints)
        changed = sorted(n for n, h in self._apt_frozen_fingerprints.items() if now.get(n) != h)
        if changed:
            raise AptError(
                f"APT check_frozen: {len(changed)} frozen tensors changed since training started "
                f"(e.g. {', '.join(changed[:3])}); the checkpoint was not written. Something outside APT "
                "trains or modifies them (an optimizer built from policy.parameters() with weight decay, "
                "a PEFT wrap, a custom hook)."
            )
        return len(self._apt_frozen_fingerprints)

    # ------------------------------------------------------------------ checkpoints
    def _save_pretrained(self, save_directory: Path, state_dict: dict[str, Any] | None = None) -> None:
        from apt_plugins.atomic import atomic_directory, atomic_files

        checked = self.verify_frozen(state_dict) if self.apt_config.check_frozen else 0
        manifest = self.apt_manifest(state_dict)
        if checked:
            manifest["frozen_check"] = {"tensors": checked, "unchanged": True}
            logger.info("APT check_frozen: %d frozen tensors unchanged at this checkpoint", checked)
        save_directory = Path(save_directory)
        # All or nothing (apt_plugins.atomic): a fresh directory is renamed into place whole; into a
        # directory that already holds files, ours move in under an incomplete marker that loaders refuse.
        fresh = not save_directory.exists() or not any(save_directory.iterdir())
        with (atomic_directory if fresh else atomic_files)(save_directory) as staging:
            super()._save_pretrained(staging, state_dict=state_dict)
            manifest["weights"] = weights_summary(staging / "model.safetensors")
            write_manifest(staging, manifest)
        get_plugin_manager().hook.apt_checkpoint_saved(policy=self, path=str(save_directory), manifest=manifest)

    def apt_manifest(self, state_dict: dict[str, Any] | None = None) -> dict[str, Any]:
        """What ``apt_manifest.json`` records: stage, config, APT tensors and their provenance."""
        state = apt_state(self)
        tensors = state_dict if state_dict is not None else self.state_dict()
        report = getattr(self, "apt_load_report", None)
        return {
            "format": 1,
            "apt_plugins_version": apt_plugins.__version__,
            "adapter": state.adapter.name,
            "host": {"name": state.adapter.host, "version": state.adapter.host_version()},
            "policy_type": self.name,
            "stage": state.config.stage,
            "apt_config": state.config.model_dump(),
            "apt_tensors": {k: list(v.shape) for k, v in tensors.items() if ".apt_" in k},
            "fresh_at_last_load": list(report.fresh) if report is not None else [],
            "parent": getattr(self, "apt_parent", None),
        }

    @classmethod
    def from_pretrained(cls, pretrained_name_or_path: str | Path, *, config: Any = None, strict: bool = True,
                        **kwargs: Any):
        """Load strictly: every tensor in the file must be used and every model tensor present.

        The one exception is promotion: a Stage-1 APT checkpoint loaded with a Stage-2 config
        carries every tensor over and initialises only the fusion layers (listed in the report and
        in the next manifest). ``strict=False`` is refused: silent loading is what APT guards against.
        """
        from lerobot.configs.policies import PreTrainedConfig
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        if not strict:
            raise CheckpointMismatchError(
                str(pretrained_name_or_path), cause="APT policies load strictly; strict=False is not supported. "
                "Use `apt-plugins retrofit` to convert a checkpoint explicitly."
            )
        directory = resolve_checkpoint_dir(pretrained_name_or_path, kwargs.get("revision"))
        for key in _HUB_KWARGS:  # the directory is resolved already; the constructor must not see these
            kwargs.pop(key, None)
        manifest = _check_checkpoint_files(cls, directory)
        if config is None:
            config = PreTrainedConfig.from_pretrained(directory)
        policy = cls(config, **kwargs)
        try:
            state_dict = load_file(str(directory / "model.safetensors"))
        except (SafetensorError, OSError) as exc:
            raise CheckpointMismatchError(str(directory), cause=f"model.safetensors is unreadable ({exc}).") from None
        if manifest is not None:
            check_manifest_against_weights(manifest, state_dict, str(directory))
        state_dict = policy.apt_adapter.normalize_state_dict(policy, state_dict)
        source_stage = manifest.get("stage") if manifest else None
        target_stage = policy.apt_config.stage
        promoting = source_stage == 1 and target_stage == 2
        # LoRA tensors are fresh only where LoRA is attached now for the first time.
        source_mode = (manifest or {}).get("apt_config", {}).get("vlm_mode", "frozen")
        new_lora = policy.apt_config.vlm_mode == "lora" and source_mode != "lora"
        report = load_state_dict_strict(
            policy,
            state_dict,
            source=str(directory),
            fresh_prefixes=tuple(policy.apt_adapter.fusion_prefixes(policy)) if promoting else (),
            fresh_substrings=(".lora_",) if new_lora else (),
            explain=lambda missing, unexpected: explain_mismatch(manifest, source_stage, target_stage, missing, unexpected),
        )
        report.source_stage = source_stage
        policy.apt_load_report = report
        _warn_behaviour_changes(manifest, policy.apt_config, directory)
        hook = get_plugin_manager().hook
        if promoting:
            policy.apt_parent = {"path": str(directory), "stage": 1}
            logger.info("APT promotion Stage 1 -> Stage 2\n%s", report.summary())
            hook.apt_stage_promoted(policy=policy, path=str(directory), report=report.as_dict())
        else:
            policy.apt_parent = manifest.get("parent") if manifest else None
        hook.apt_checkpoint_loaded(policy=policy, path=str(directory), report=report.as_dict())
        # A stock checkpoint's processors lack what the APT model reads: LeRobot loads APT ones built from them.
        use_apt_processors(policy, directory, config)
        policy.to(config.device)
        policy.eval()
        return policy


def _check_checkpoint_files(cls: Any, directory: Path) -> dict[str, Any] | None:
    """Refuse an interrupted, partial or foreign checkpoint before any policy is built; return its manifest."""
    from apt_plugins.atomic import assert_complete

    assert_complete(directory)
    for name in ("config.json", "model.safetensors"):
        if not (directory / name).is_file():
            raise CheckpointMismatchError(str(directory), cause=f"no {name} in {directory}: not a LeRobot "
                                          "pretrained_model directory, or a copy that was cut short.")
    try:
        saved_type = json.loads((directory / "config.json").read_text()).get("type")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as exc:
        raise CheckpointMismatchError(str(directory), cause=f"config.json is corrupt ({exc}).") from None
    manifest = read_manifest(directory)
    adapter = get_plugin_manager().get_adapter(cls.adapter_name)
    stock = dict(zip(adapter.apt_policy_types, adapter.policy_types)).get(cls.name)
    if saved_type not in (cls.name, stock):
        accepted = " or ".join(repr(t) for t in (cls.name, stock) if t)
        raise CheckpointMismatchError(str(directory), cause=f"config.json is for policy type {saved_type!r}, "
                                      f"not {accepted}; load it with its own policy type.")
    if manifest is None and str(saved_type).startswith("apt_"):
        raise IncompleteCheckpointError(str(directory), f"Its config.json says {saved_type!r} but there is no "
                                        "apt_manifest.json next to it: the save or copy was cut short. Use the "
                                        "previous checkpoint or save again.")
    if manifest is not None and manifest.get("policy_type") not in (None, cls.name):
        raise CheckpointMismatchError(str(directory), cause=f"apt_manifest.json is for policy type "
                                      f"{manifest.get('policy_type')!r}, not {cls.name!r}.")
    return manifest


# Settings that change the function without changing any tensor: a silent change on reload would
# alter a trained policy's behaviour, so it is reported.
_BEHAVIOUR_FIELDS = ("fusion_source_layers", "fusion_context", "inherited_layers_keep_language_mask",
                     "language_mask_scope")


def _warn_behaviour_changes(manifest: dict[str, Any] | None, config: AptConfig, directory: Path) -> None:
    saved = (manifest or {}).get("apt_config")
    if not saved or manifest.get("stage") != config.stage:
        return
    now = config.model_dump(mode="json")
    changed = {k: (saved.get(k), now[k]) for k in _BEHAVIOUR_FIELDS if k in saved and saved[k] != now[k]}
    if changed:
        logger.warning(
            "APT: loading %s with settings that change its function (checkpoint -> now): %s. "
            "If this is not intended, use the checkpoint's apt settings (--policy.path keeps them).",
            directory, ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items()),
        )


def resolve_checkpoint_dir(name_or_path: str | Path, revision: str | None = None) -> Path:
    """A local checkpoint directory, or a repo id already in the local hub cache (never downloads)."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(name_or_path), local_files_only=True, revision=revision))
    except Exception as exc:
        raise CheckpointMismatchError(
            str(name_or_path),
            cause=f"not a checkpoint directory and not in the local hub cache ({type(exc).__name__}). "
            "Download it first (hf download ...) or pass a local directory.",
        ) from None
