"""openpi-layout checkpoints with the APT manifest: save, strict load, promotion, retrofit.

openpi's PyTorch trainer writes ``<step>/model.safetensors`` (``safetensors.torch.save_model``)
next to ``optimizer.pt``, ``metadata.pt`` and ``assets/``. An APT checkpoint is the same directory
plus ``apt_manifest.json`` (stage, APT config, fusion tensors, parent) and ``config.json``
(``{"apt": ..., "model": <Pi0Config fields>}``), so openpi's own tools still read its weights.
Loading is strict: every tensor must be accounted for before anything is loaded; a Stage-1
checkpoint loaded with a Stage-2 config carries everything over and adds only the fusion layers.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import apt_plugins
from apt_plugins import (
    AptConfig,
    CheckpointMismatchError,
    apt_state,
    explain_mismatch,
    get_plugin_manager,
    load_state_dict_strict,
    prepare_stage,
    read_manifest,
    write_manifest,
)

logger = logging.getLogger("apt_plugins")

__all__ = ["save_checkpoint", "load_checkpoint", "write_apt_files", "apt_manifest", "model_config_from",
           "retrofit_checkpoint", "load_into", "WEIGHTS_NAME", "CONFIG_NAME"]

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


def _adapter_name(model: Any) -> str:
    return "openpi_pi05" if getattr(model, "pi05", False) else "openpi_pi0"


def apt_manifest(model: Any) -> dict[str, Any]:
    """What ``apt_manifest.json`` records: stage, config, APT tensors and their provenance."""
    state = apt_state(model)
    report = getattr(model, "apt_load_report", None)
    return {
        "format": 1,
        "apt_plugins_version": apt_plugins.__version__,
        "adapter": state.adapter.name,
        "host": {"name": state.adapter.host, "version": state.adapter.host_version()},
        "policy_type": state.adapter.name,
        "stage": state.config.stage,
        "apt_config": state.config.model_dump(mode="json"),
        "apt_tensors": {k: list(v.shape) for k, v in model.state_dict().items() if ".apt_" in k},
        "fresh_at_last_load": list(report.fresh) if report is not None else [],
        "parent": getattr(model, "apt_parent", None),
    }


def write_apt_files(model: Any, directory: str | Path, frozen_checked: int = 0) -> dict[str, Any] | None:
    """Write ``config.json`` (and, for a prepared model, ``apt_manifest.json``) next to the weights.

    Returns the manifest, or None for a stock model. Calls the ``apt_checkpoint_saved`` hook.

    :param frozen_checked: number of frozen tensors verified unchanged (``apt.check_frozen``), recorded.
    """
    directory = Path(directory)
    state = apt_state(model)
    config = {"model": dataclasses.asdict(model.config) if dataclasses.is_dataclass(model.config) else {}}
    if state is not None:
        config["apt"] = state.config.model_dump(mode="json")
    tmp = directory / (CONFIG_NAME + ".tmp")
    tmp.write_text(json.dumps(config, indent=2, sort_keys=True, default=str) + "\n")
    tmp.replace(directory / CONFIG_NAME)
    if state is None:
        return None
    manifest = apt_manifest(model)
    if frozen_checked:
        manifest["frozen_check"] = {"tensors": frozen_checked, "unchanged": True}
    write_manifest(directory, manifest)
    get_plugin_manager().hook.apt_checkpoint_saved(policy=model, path=str(directory), manifest=manifest)
    return manifest


def save_checkpoint(model: Any, directory: str | Path) -> Path:
    """Write ``model.safetensors`` exactly as openpi's trainer does, plus the APT files."""
    import safetensors.torch

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_model(model, str(directory / WEIGHTS_NAME))
    write_apt_files(model, directory)
    return directory


def model_config_from(directory: str | Path) -> Any:
    """The ``Pi0Config`` saved in a checkpoint's ``config.json``.

    :raises CheckpointMismatchError: no ``config.json`` with a ``model`` entry (a plain openpi
        checkpoint: pass the training config's model instead).
    """
    from openpi.models.pi0_config import Pi0Config

    path = Path(directory) / CONFIG_NAME
    data = json.loads(path.read_text()) if path.is_file() else {}
    if not data.get("model"):
        raise CheckpointMismatchError(
            str(directory), cause="no config.json with the model config (a plain openpi checkpoint); pass the "
            "Pi0Config of its TrainConfig (model_config=..., or the openpi config name on the command line).")
    fields = {f.name for f in dataclasses.fields(Pi0Config)}
    return Pi0Config(**{k: v for k, v in data["model"].items() if k in fields})


def _fusion_prefixes(model: Any) -> tuple[str, ...]:
    return tuple(apt_state(model).adapter.fusion_prefixes(model))


def _explain(manifest: dict[str, Any] | None, source_stage: int | None, target_stage: int):
    def explain(missing: list[str], unexpected: list[str]) -> str:
        if manifest is None and any(".apt_" in k for k in missing):
            return ("this is a plain openpi checkpoint (no apt_manifest.json), so it has no fusion layers. Run "
                    "`apt-plugins retrofit SRC OUT --stage 2 --openpi-config NAME`, or train Stage 1 from it and promote.")
        return explain_mismatch(manifest, source_stage, target_stage, missing, unexpected)

    return explain


def load_checkpoint(directory: str | Path, apt: AptConfig | dict[str, Any], model_config: Any = None, *,
                    build: Callable[[Any], Any] | None = None, strict: bool = True, device: str = "cpu") -> Any:
    """Build an APT ``PI0Pytorch`` configured with ``apt`` and load ``directory`` into it, strictly.

    A Stage-1 checkpoint loaded with a Stage-2 config is a promotion: every tensor carries over
    and only the fusion layers are new (``model.apt_load_report`` lists both). A plain openpi
    checkpoint loads into Stage 1 (every tensor must match) but not into Stage 2 (use retrofit).

    :param model_config: the ``Pi0Config``; default: the checkpoint's ``config.json``.
    :param build: ``Pi0Config -> PI0Pytorch`` (default: openpi's constructor).
    :raises CheckpointMismatchError: missing/unexpected tensors, an unreadable file, or ``strict=False``.
    """
    directory = Path(directory)
    if not strict:
        raise CheckpointMismatchError(
            str(directory), cause="APT models load strictly; strict=False is not supported. Use "
            "`apt-plugins retrofit` to convert a checkpoint explicitly.")
    apt = AptConfig.parse(apt)
    if model_config is None:
        model_config = model_config_from(directory)
    if build is None:
        from openpi.models_pytorch.pi0_pytorch import PI0Pytorch

        build = PI0Pytorch
    state_dict = _read_weights(directory, device)
    model = build(model_config)
    prepare_stage(model, apt, adapter=_adapter_name(model))
    load_into(model, directory, state_dict=state_dict)
    return model.to(device).eval()


def _read_weights(directory: Path, device: str = "cpu") -> dict[str, Any]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights = Path(directory) / WEIGHTS_NAME
    if not weights.is_file():
        raise CheckpointMismatchError(str(directory), cause=f"no {WEIGHTS_NAME} in {directory}.")
    try:
        return load_file(str(weights), device=device)
    except (SafetensorError, OSError) as exc:
        raise CheckpointMismatchError(str(directory), cause=f"{WEIGHTS_NAME} is unreadable ({exc}).") from None


def load_into(model: Any, directory: str | Path, *, state_dict: dict[str, Any] | None = None,
              device: str = "cpu") -> Any:
    """Load ``directory`` strictly into the already prepared APT ``model``; return the load report.

    Promotion (a Stage-1 manifest, a Stage-2 model) may add only the fusion tensors, and a first
    LoRA attachment only ``.lora_`` tensors; anything else missing or unexpected raises before any
    tensor is loaded. Sets ``model.apt_load_report`` and ``model.apt_parent``; calls the
    ``apt_stage_promoted``/``apt_checkpoint_loaded`` hooks.

    :raises CheckpointMismatchError: with the tensors grouped by module and the likely cause.
    """
    directory = Path(directory)
    apt = apt_state(model).config
    if state_dict is None:
        state_dict = _read_weights(directory, device)
    manifest = read_manifest(directory)
    source_stage = manifest.get("stage") if manifest else None
    promoting = source_stage == 1 and apt.stage == 2
    source_mode = (manifest or {}).get("apt_config", {}).get("vlm_mode", "frozen")
    report = load_state_dict_strict(
        model, state_dict, source=str(directory),
        fresh_prefixes=_fusion_prefixes(model) if promoting else (),
        fresh_substrings=(".lora_",) if apt.vlm_mode == "lora" and source_mode != "lora" else (),
        explain=_explain(manifest, source_stage, apt.stage),
    )
    report.source_stage = source_stage
    model.apt_load_report = report
    hook = get_plugin_manager().hook
    if promoting:
        model.apt_parent = {"path": str(directory), "stage": 1}
        logger.info("APT promotion Stage 1 -> Stage 2\n%s", report.summary())
        hook.apt_stage_promoted(policy=model, path=str(directory), report=report.as_dict())
    else:
        model.apt_parent = manifest.get("parent") if manifest else None
    hook.apt_checkpoint_loaded(policy=model, path=str(directory), report=report.as_dict())
    return report


def retrofit_checkpoint(src: str | Path, out: str | Path, apt: AptConfig | dict[str, Any], model_config: Any = None,
                        *, build: Callable[[Any], Any] | None = None, reinit_expert: bool = False) -> Any:
    """Turn a plain openpi PyTorch checkpoint into an APT one (``apt-plugins retrofit`` for openpi).

    Stage 1 carries every tensor over (``reinit_expert`` redraws the action expert, paper default
    for a VLM-only start); Stage 2 adds closed fusion layers, so the result computes the source's
    function exactly when ``apt.inherited_layers_keep_language_mask`` is False. ``assets/`` (norm
    stats) is copied. Nothing is written unless the load succeeded.

    :raises CheckpointMismatchError: the source does not match ``model_config``.
    """
    src, out = Path(src), Path(out)
    apt = AptConfig.parse(apt)
    if (src / "apt_manifest.json").is_file():
        raise CheckpointMismatchError(str(src), cause="already an APT checkpoint; load it (promotion) instead.")
    if model_config is None:
        model_config = model_config_from(src)
    if build is None:
        from openpi.models_pytorch.pi0_pytorch import PI0Pytorch

        build = PI0Pytorch
    state_dict = _read_weights(src)
    model = build(model_config)
    prepare_stage(model, apt, adapter=_adapter_name(model))
    report = load_state_dict_strict(
        model, state_dict, source=str(src),
        fresh_prefixes=_fusion_prefixes(model) if apt.stage == 2 else (),
        fresh_substrings=(".lora_",) if apt.vlm_mode == "lora" else (),
        explain=_explain(None, None, 1),
    )
    if reinit_expert:
        import torch

        groups = apt_state(model).groups
        with torch.no_grad():
            for name, module in model.named_modules():
                own = [n for n, _ in module.named_parameters(recurse=False)]
                # groups has no entry for tied duplicates (the LM head): those are never the expert's.
                if own and hasattr(module, "reset_parameters") and all(
                        groups.get(f"{name}.{n}") == "action_expert" for n in own):
                    module.reset_parameters()
    model.apt_load_report = report
    model.apt_parent = {"path": str(src), "stage": None, "retrofit": True}
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    save_checkpoint(model, tmp)
    if (src / "assets").is_dir():
        shutil.copytree(src / "assets", tmp / "assets")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return model
