"""Convert pi0/pi0.5 checkpoints between the openpi (PyTorch) and LeRobot layouts, tensor for tensor.

openpi's ``PI0Pytorch`` and LeRobot's ``PI0Pytorch``/``PI05Pytorch`` (LeRobot's port of it) name
their tensors identically, except that LeRobot's policy holds the model as ``model``, and APT puts
the Stage-2 fusion layers at ``paligemma_with_expert.apt_fusion`` in openpi and at
``model.apt_fusion`` in LeRobot. LoRA tensors (``.lora_A.default.weight`` ...) have the same names
on both sides. So a conversion renames keys and never touches a tensor's bytes: openpi -> LeRobot
-> openpi gives back the same tensors, bit for bit.

This module is pure safetensors/JSON work (neither openpi nor LeRobot is imported), so it runs in
either environment. The mapping is strict: a tensor outside the known roots, two tensors mapping
to one name, or a config value the other side cannot represent raises a
:class:`~apt_plugins.errors.CheckpointMismatchError` naming it. The output directory is written
atomically (absent or complete).

Layouts:

- openpi: ``model.safetensors`` (``safetensors.torch.save_model``), ``config.json``
  (``{"model": <Pi0Config fields>, "apt": <APT config>}``), ``apt_manifest.json`` for APT, ``assets/``.
- LeRobot: ``model.safetensors``, ``config.json`` (a ``PreTrainedConfig`` with ``type``),
  ``apt_manifest.json`` for APT, the processor files.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import AptError, CheckpointMismatchError

__all__ = ["convert_checkpoint", "ConversionReport", "openpi_to_lerobot_key", "lerobot_to_openpi_key",
           "detect_layout"]

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
MANIFEST = "apt_manifest.json"

#: Top-level modules of openpi's PI0Pytorch (pi0: state_proj, action_time_mlp_*; pi0.5: time_mlp_*).
OPENPI_ROOTS = ("paligemma_with_expert.", "action_in_proj.", "action_out_proj.")
PI0_ROOTS = ("state_proj.", "action_time_mlp_in.", "action_time_mlp_out.")
PI05_ROOTS = ("time_mlp_in.", "time_mlp_out.")
OPENPI_FUSION = "paligemma_with_expert.apt_fusion."
#: openpi ties the VLM's token embedding to its LM head (one tensor; save_model keeps the head's name);
#: LeRobot 0.6.1 holds two tensors (its from_pretrained copies the head into the embedding).
VLM_HEAD = "paligemma_with_expert.paligemma.lm_head.weight"
VLM_EMBED = "paligemma_with_expert.paligemma.model.language_model.embed_tokens.weight"
LEROBOT_FUSION = "model.apt_fusion."

#: Constants openpi's PI0Pytorch hard-codes; a LeRobot config with other values cannot become openpi.
OPENPI_FIXED = {"min_period": 4e-3, "max_period": 4.0, "time_sampling_beta_alpha": 1.5,
                "time_sampling_beta_beta": 1.0, "time_sampling_scale": 0.999, "time_sampling_offset": 0.001}
#: Policy types per (pi05, apt).
LEROBOT_TYPES = {(False, False): "pi0", (True, False): "pi05", (False, True): "apt_pi0", (True, True): "apt_pi05"}


@dataclass
class ConversionReport:
    """What a conversion did: tensors renamed, the files written and what the target still needs."""

    source: str
    out: str
    to: str
    tensors: int = 0
    written: int = 0
    renamed: int = 0
    files: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """A few lines for the command line."""
        lines = [f"converted {self.tensors} tensors ({self.renamed} renamed, none changed; {self.written} written) "
                 f"from {self.source}",
                 f"wrote {self.out} ({self.to} layout: {', '.join(self.files)})"]
        return "\n".join(lines + [f"note: {n}" for n in self.notes])


# ---------------------------------------------------------------------- key maps
def _pi05_from_keys(keys: list[str]) -> bool | None:
    if any(k.removeprefix("model.").startswith(PI05_ROOTS) for k in keys):
        return True
    if any(k.removeprefix("model.").startswith(PI0_ROOTS) for k in keys):
        return False
    return None


def openpi_to_lerobot_key(key: str, pi05: bool, source: str = "<openpi checkpoint>") -> str:
    """The LeRobot name of openpi tensor ``key``.

    :raises CheckpointMismatchError: ``key`` is not a tensor of openpi's pi0 (``pi05=False``) or pi0.5 model.
    """
    roots = OPENPI_ROOTS + (PI05_ROOTS if pi05 else PI0_ROOTS)
    if not key.startswith(roots):
        raise CheckpointMismatchError(
            source, unexpected=[key], cause=f"tensor {key!r} is not part of openpi's {'pi0.5' if pi05 else 'pi0'} "
            f"PI0Pytorch (known roots: {', '.join(r.rstrip('.') for r in roots)}), so it has no LeRobot name. "
            "Convert only checkpoints written by openpi or apt-plugins; remove foreign tensors first.")
    if key.startswith(OPENPI_FUSION):
        return LEROBOT_FUSION + key[len(OPENPI_FUSION):]
    return "model." + key


def lerobot_to_openpi_key(key: str, pi05: bool, source: str = "<LeRobot checkpoint>") -> str:
    """The openpi name of LeRobot tensor ``key`` (inverse of :func:`openpi_to_lerobot_key`).

    :raises CheckpointMismatchError: ``key`` is not a tensor of LeRobot's pi0/pi0.5 ``model``.
    """
    inner = key.removeprefix("model.")
    if key.startswith(LEROBOT_FUSION):
        return OPENPI_FUSION + key[len(LEROBOT_FUSION):]
    roots = OPENPI_ROOTS + (PI05_ROOTS if pi05 else PI0_ROOTS)
    if not key.startswith("model.") or not inner.startswith(roots) or inner.startswith(OPENPI_FUSION):
        raise CheckpointMismatchError(
            source, unexpected=[key], cause=f"tensor {key!r} is not part of LeRobot's {'pi0.5' if pi05 else 'pi0'} "
            f"model (expected model.<{'|'.join(r.rstrip('.') for r in roots)}>... or model.apt_fusion...), so it has "
            "no openpi name. Convert only pi0/pi0.5 checkpoints; remove foreign tensors first.")
    return inner


# ---------------------------------------------------------------------- layouts
def _read_json(path: Path, source: str) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointMismatchError(source, cause=f"{path.name} is not valid JSON ({exc}).") from None
    if not isinstance(data, dict):
        raise CheckpointMismatchError(source, cause=f"{path.name} is not a JSON object.")
    return data


def detect_layout(directory: str | Path) -> str:
    """``"lerobot"`` (config.json with a ``type``) or ``"openpi"`` (model.safetensors, no LeRobot config).

    :raises CheckpointMismatchError: no ``model.safetensors`` in ``directory``.
    """
    directory = Path(directory)
    if not (directory / WEIGHTS).is_file():
        raise CheckpointMismatchError(str(directory), cause=f"no {WEIGHTS} in {directory}: give a LeRobot "
                                      "pretrained_model directory or an openpi checkpoint step directory.")
    config = _read_json(directory / CONFIG, str(directory)) or {}
    return "lerobot" if "type" in config else "openpi"


def _load_tensors(directory: Path) -> tuple[dict[str, Any], dict[str, str] | None]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(directory / WEIGHTS), framework="pt") as handle:
            return {k: handle.get_tensor(k) for k in handle.keys()}, handle.metadata()
    except (SafetensorError, OSError) as exc:
        raise CheckpointMismatchError(str(directory), cause=f"{WEIGHTS} is unreadable ({exc}).") from None


def _map_all(tensors: dict[str, Any], mapper: Any, pi05: bool, source: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for key, tensor in tensors.items():
        new = mapper(key, pi05, source)
        if new in out:
            raise CheckpointMismatchError(source, cause=f"tensors {origin[new]!r} and {key!r} both map to {new!r}; "
                                          "the checkpoint mixes layouts. Convert a checkpoint written by one host.")
        out[new], origin[new] = tensor, key
    return out


def _check(condition: bool, source: str, message: str) -> None:
    if not condition:
        raise CheckpointMismatchError(source, cause=message)


# ---------------------------------------------------------------------- configs
def _lerobot_to_pi0_config(cfg: dict[str, Any], pi05: bool, source: str) -> dict[str, Any]:
    """openpi ``Pi0Config`` fields from a LeRobot pi0/pi05 ``config.json``."""
    for name, value in OPENPI_FIXED.items():
        if name in cfg and abs(float(cfg[name]) - value) > 1e-12:
            raise CheckpointMismatchError(
                source, cause=f"config.json {name}={cfg[name]!r}, but openpi's PI0Pytorch hard-codes {value}; this "
                "policy's flow-matching schedule cannot be expressed in openpi. Convert a policy trained with "
                f"LeRobot's default ({name}={value}).")
    if not pi05 and cfg.get("max_state_dim", cfg.get("max_action_dim")) != cfg.get("max_action_dim"):
        raise CheckpointMismatchError(
            source, cause=f"config.json max_state_dim={cfg.get('max_state_dim')} but max_action_dim="
            f"{cfg.get('max_action_dim')}: openpi's pi0 pads the state to action_dim (state_proj takes action_dim "
            "inputs), so both must be equal.")
    missing = [k for k in ("max_action_dim", "chunk_size", "tokenizer_max_length") if k not in cfg]
    _check(not missing, source, f"config.json lacks {missing}; it is not a complete LeRobot pi0/pi05 config.")
    resolution = list(cfg.get("image_resolution", [224, 224]))
    _check(resolution == [224, 224], source, f"config.json image_resolution={resolution}: openpi's PI0Pytorch "
           "resizes every image to 224x224, so the vision tower of this policy does not fit openpi.")
    return {
        "pi05": pi05, "action_dim": cfg["max_action_dim"], "action_horizon": cfg["chunk_size"],
        "max_token_len": cfg["tokenizer_max_length"], "paligemma_variant": cfg.get("paligemma_variant", "gemma_2b"),
        "action_expert_variant": cfg.get("action_expert_variant", "gemma_300m"), "dtype": cfg.get("dtype", "float32"),
        "discrete_state_input": pi05,
        "pytorch_compile_mode": cfg.get("compile_mode", "max-autotune") if cfg.get("compile_model") else None,
    }


def _pi0_to_lerobot_config(model: dict[str, Any], policy_type: str, apt: dict[str, Any] | None,
                           template: dict[str, Any] | None, source: str) -> dict[str, Any]:
    """A LeRobot ``config.json`` (type ``policy_type``) from openpi ``Pi0Config`` fields."""
    pi05 = bool(model.get("pi05"))
    if pi05 and model.get("discrete_state_input") is False:
        raise CheckpointMismatchError(
            source, cause="Pi0Config(pi05=True, discrete_state_input=False) (e.g. pi05_libero): LeRobot's pi05 always "
            "puts the discretised state in the prompt, so this model's inputs cannot be reproduced in LeRobot.")
    missing = [k for k in ("action_dim", "action_horizon", "max_token_len") if model.get(k) is None]
    _check(not missing, source, f"the Pi0Config lacks {missing}; give the full config (--model-config JSON with "
           "the TrainConfig's model fields, e.g. max_token_len: 48 for pi0, 200 for pi0.5).")
    variants = {}
    for name, default in (("paligemma_variant", "gemma_2b"), ("action_expert_variant", "gemma_300m")):
        # openpi's *_lora variants differ only in JAX LoRA settings; PI0Pytorch sizes them as the base variant.
        variants[name] = str(model.get(name) or default).removesuffix("_lora")
        _check(variants[name] in ("gemma_2b", "gemma_300m"), source, f"Pi0Config {name}={model.get(name)!r}: "
               "LeRobot's pi0/pi05 know only 'gemma_2b' and 'gemma_300m', so this model has no LeRobot config.")
    cfg = dict(template or {})
    cfg.update({
        "type": policy_type, **variants,
        "dtype": model.get("dtype", "bfloat16"),
        "chunk_size": model["action_horizon"], "max_action_dim": model["action_dim"],
        "max_state_dim": model["action_dim"], "tokenizer_max_length": model["max_token_len"],
        "image_resolution": [224, 224], **OPENPI_FIXED,
        "compile_model": model.get("pytorch_compile_mode", "max-autotune") is not None,
    })
    if model.get("pytorch_compile_mode") is not None:
        cfg["compile_mode"] = model.get("pytorch_compile_mode", "max-autotune")
    cfg.setdefault("n_action_steps", model["action_horizon"])
    cfg["n_action_steps"] = min(cfg["n_action_steps"], model["action_horizon"])
    cfg.setdefault("input_features", {})
    cfg.setdefault("output_features", {})
    if apt is not None:
        cfg["apt"] = apt
    else:
        cfg.pop("apt", None)
    return cfg


# ---------------------------------------------------------------------- manifests
def _convert_manifest(manifest: dict[str, Any], to: str, pi05: bool, key_map: dict[str, str],
                      src: Path) -> dict[str, Any]:
    kind = "pi05" if pi05 else "pi0"
    out = dict(manifest)
    if to == "lerobot":
        out.update(adapter=f"lerobot_{kind}", policy_type=f"apt_{kind}", host={"name": "lerobot", "version": None})
    else:
        out.update(adapter=f"openpi_{kind}", policy_type=f"openpi_{kind}", host={"name": "openpi", "version": None})
        out.pop("weights", None)
    out["apt_tensors"] = {key_map[k]: v for k, v in manifest.get("apt_tensors", {}).items() if k in key_map}
    out["fresh_at_last_load"] = [key_map.get(k, k) for k in manifest.get("fresh_at_last_load", [])]
    out["converted_from"] = {"path": str(src), "layout": "openpi" if to == "lerobot" else "lerobot",
                             "adapter": manifest.get("adapter")}
    return out


def _tie_for_openpi(mapped: dict[str, Any], tie: bool, source: str, report: ConversionReport) -> None:
    """LeRobot's separate VLM embedding and LM head -> openpi's one tied tensor (under the head's name)."""
    import torch

    if VLM_EMBED not in mapped or VLM_HEAD not in mapped:
        return
    if torch.equal(mapped[VLM_EMBED], mapped[VLM_HEAD]):
        del mapped[VLM_EMBED]  # the same tensor: openpi's save_model stores it once, as the head
        return
    if not tie:
        raise CheckpointMismatchError(
            source, cause=f"model.{VLM_EMBED} and model.{VLM_HEAD} differ (the VLM was trained in LeRobot; the "
            "head gets no gradient), but openpi ties the VLM's token embedding and LM head into one tensor, so both "
            "cannot be kept. Pass --tie-embeddings to keep the embedding (what pi0/pi0.5 use) as openpi's tied "
            "tensor and drop LeRobot's unused lm_head.")
    mapped[VLM_HEAD] = mapped.pop(VLM_EMBED)
    report.notes.append(f"--tie-embeddings: model.{VLM_HEAD} (differs; unused by pi0/pi0.5) dropped, the embedding "
                        "written as openpi's tied tensor")


# ---------------------------------------------------------------------- entry point
def convert_checkpoint(src: str | Path, out: str | Path, to: str, *, policy_type: str | None = None,
                       lerobot_template: str | Path | None = None,
                       model_config: dict[str, Any] | None = None, tie_embeddings: bool = False) -> ConversionReport:
    """Convert ``src`` (openpi or LeRobot layout, found from its files) into ``out`` in the ``to`` layout.

    Every tensor is renamed (never changed); every tensor of ``src`` is in ``out`` or the call
    raises before anything is written. The APT manifest (stage, config, fusion tensors, parent)
    moves with the weights, with ``converted_from`` added.

    :param to: ``"lerobot"`` or ``"openpi"``.
    :param policy_type: openpi -> LeRobot: the LeRobot type (default ``pi0``/``pi05``, ``apt_pi0``/``apt_pi05``
        for an APT checkpoint); it must agree with the weights.
    :param lerobot_template: openpi -> LeRobot: a LeRobot pretrained_model directory whose ``config.json``
        (features, normalisation, optimizer settings) and processor files are taken over; sizes come
        from the openpi config. Without it, ``config.json`` has no features and no processors are written.
    :param model_config: openpi source: the ``Pi0Config`` fields, for a plain openpi checkpoint without
        ``config.json``.
    :param tie_embeddings: LeRobot -> openpi when LeRobot's VLM ``embed_tokens`` and ``lm_head`` differ
        (the VLM trained in LeRobot; the head gets no gradient): openpi ties the two, so write the
        embedding as openpi's tied tensor and drop LeRobot's ``lm_head`` (unused by pi0/pi0.5).
    :raises CheckpointMismatchError: unknown tensors, inconsistent configs (naming the field), untied
        embeddings without ``tie_embeddings``.
    :raises AptError: bad arguments; ``out`` exists and is not empty.
    """
    from .atomic import atomic_directory

    src, out = Path(src), Path(out)
    if to not in ("lerobot", "openpi"):
        raise AptError(f"convert: --to={to!r}; use --to lerobot or --to openpi.")
    layout = detect_layout(src)
    if layout == to:
        raise AptError(f"convert: {src} is already in the {to} layout (config.json "
                       f"{'has' if to == 'lerobot' else 'has no'} a LeRobot 'type').")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise AptError(f"convert: {out} exists and is not empty; give a new output directory.")
    source = str(src)
    config = _read_json(src / CONFIG, source) or {}
    manifest = _read_json(src / MANIFEST, source)
    tensors, _ = _load_tensors(src)
    report = ConversionReport(source=source, out=str(out), to=to, tensors=len(tensors))
    from_keys = _pi05_from_keys(list(tensors))

    if to == "openpi":
        saved_type = str(config["type"])
        base = saved_type.removeprefix("apt_")
        if base not in ("pi0", "pi05"):
            raise CheckpointMismatchError(source, cause=f"config.json type={saved_type!r}; only pi0, pi05, apt_pi0 "
                                          "and apt_pi05 have an openpi counterpart.")
        pi05 = base == "pi05"
        is_apt = saved_type.startswith("apt_")
        _check(from_keys in (None, pi05), source, f"config.json type={saved_type!r} but the tensors are those of "
               f"{'pi0.5' if from_keys else 'pi0'}.")
        _check(is_apt == (manifest is not None), source, f"config.json type={saved_type!r} "
               f"{'without' if is_apt else 'with'} {MANIFEST}: the checkpoint is incomplete or mixed.")
        mapped = _map_all(tensors, lerobot_to_openpi_key, pi05, source)
        key_map = dict(zip(tensors, mapped, strict=True))
        _tie_for_openpi(mapped, tie_embeddings, source, report)
        new_config: dict[str, Any] = {"model": _lerobot_to_pi0_config(config, pi05, source)}
        if is_apt:
            new_config["apt"] = config.get("apt") or manifest.get("apt_config")
        report.notes.append("openpi's norm stats (assets/<asset_id>/norm_stats.json) are not written: train or serve "
                            "with the openpi TrainConfig whose assets match this data (its config name cannot be "
                            "inferred from a LeRobot checkpoint).")
    else:
        model = dict(model_config or config.get("model") or {})
        if not model:
            raise CheckpointMismatchError(
                source, cause="a plain openpi checkpoint has no config.json with its Pi0Config, so pi0 vs pi0.5, "
                "action_horizon and max_token_len cannot be inferred. Pass --model-config '{\"pi05\": false, "
                "\"action_dim\": 32, \"action_horizon\": 50, \"max_token_len\": 48}' (the fields of the "
                "TrainConfig's model).")
        model.setdefault("pi05", bool(from_keys))
        pi05 = bool(model["pi05"])
        _check(from_keys in (None, pi05), source, f"the Pi0Config says pi05={pi05} but the tensors are those of "
               f"{'pi0.5' if from_keys else 'pi0'}.")
        is_apt = manifest is not None
        default_type = LEROBOT_TYPES[(pi05, is_apt)]
        if policy_type is not None and policy_type != default_type:
            raise AptError(f"convert: --policy-type={policy_type!r}, but {src} is "
                           f"{'an APT' if is_apt else 'a plain'} {'pi0.5' if pi05 else 'pi0'} checkpoint, which is "
                           f"{default_type!r} in LeRobot. Omit --policy-type, or retrofit it first "
                           "(apt-plugins retrofit).")
        template_dir = Path(lerobot_template) if lerobot_template else None
        template = None
        if template_dir is not None:
            template = _read_json(template_dir / CONFIG, str(template_dir))
            if template is None or "type" not in template:
                raise AptError(f"convert: --lerobot-template={template_dir} has no LeRobot config.json (with 'type').")
            if str(template["type"]).removeprefix("apt_") != ("pi05" if pi05 else "pi0"):
                raise AptError(f"convert: --lerobot-template is a {template['type']!r} policy; the checkpoint is "
                               f"{'pi0.5' if pi05 else 'pi0'}.")
        mapped = _map_all(tensors, openpi_to_lerobot_key, pi05, source)
        key_map = dict(zip(tensors, mapped, strict=True))
        head, embed = "model." + VLM_HEAD, "model." + VLM_EMBED
        if (head in mapped) != (embed in mapped):  # openpi's file holds the tied tensor once
            present, absent = (head, embed) if head in mapped else (embed, head)
            mapped[absent] = mapped[present].clone()  # save_file refuses shared storage
            report.notes.append("openpi ties the VLM token embedding and LM head: the one tensor "
                                f"{present} is written under both LeRobot names")
        apt = (config.get("apt") or manifest.get("apt_config")) if is_apt else None
        new_config = _pi0_to_lerobot_config(model, default_type, apt, template, source)
        if template_dir is None:
            report.notes.append("no processors written (no --lerobot-template): lerobot-train builds them from the "
                                "dataset; config.json has no input/output features.")
    report.renamed = sum(k != v for k, v in key_map.items())
    report.written = len(mapped)

    with atomic_directory(out) as tmp:
        from safetensors.torch import save_file

        # contiguous copies only where needed; the bytes are the source's.
        save_file({k: v.contiguous() for k, v in mapped.items()}, str(tmp / WEIGHTS),
                  metadata={"format": "pt"})
        (tmp / CONFIG).write_text(json.dumps(new_config, indent=4, sort_keys=to == "openpi", default=str) + "\n")
        if manifest is not None:
            new_manifest = _convert_manifest(manifest, to, pi05, key_map, src)
            if to == "lerobot":
                from .checkpoint import weights_summary

                new_manifest["weights"] = weights_summary(tmp / WEIGHTS)
            (tmp / MANIFEST).write_text(json.dumps(new_manifest, indent=2, sort_keys=True) + "\n")
        if to == "lerobot" and lerobot_template:
            for path in sorted(Path(lerobot_template).iterdir()):
                if path.is_file() and path.name not in (WEIGHTS, CONFIG, MANIFEST) and (
                        path.name.startswith(("policy_preprocessor", "policy_postprocessor"))):
                    shutil.copy2(path, tmp / path.name)
        if to == "lerobot" and (src / "assets").is_dir():
            report.notes.append(f"{src}/assets (openpi norm stats) not converted; LeRobot normalises in its "
                                "processors.")
        report.files = sorted(p.name for p in tmp.iterdir())
    return report
