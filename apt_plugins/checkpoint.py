"""Strict, explained checkpoint loading; manifests; tensor fingerprints.

Nothing here loads a tensor before every tensor has been accounted for: a mismatch raises
:class:`~apt_plugins.errors.CheckpointMismatchError` and leaves the model untouched.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import CheckpointMismatchError

__all__ = [
    "MANIFEST_NAME",
    "explain_mismatch",
    "LoadReport",
    "load_state_dict_strict",
    "read_manifest",
    "write_manifest",
    "check_manifest_against_weights",
    "weights_summary",
    "fingerprint",
    "tensor_fingerprint",
]

MANIFEST_NAME = "apt_manifest.json"


@dataclass
class LoadReport:
    """Which tensors came from the checkpoint and which were freshly initialised."""

    source: str
    loaded: list[str] = field(default_factory=list)
    fresh: list[str] = field(default_factory=list)
    source_stage: int | None = None

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly form (used by the checkpoint hooks)."""
        return {"source": self.source, "loaded": self.loaded, "fresh": self.fresh, "source_stage": self.source_stage}

    def summary(self) -> str:
        """Two lines: what was carried over and what is new, grouped by module."""
        from .errors import group_keys

        new = "; ".join(f"{g} ({n})" for g, n, _ in group_keys(self.fresh, depth=3)) or "none"
        return f"carried over {len(self.loaded)} tensors from {self.source}\nnew (fresh) tensors: {len(self.fresh)}: {new}"


def _aliases(model: Any) -> dict[str, list[str]]:
    """Names that share storage in ``model.state_dict()`` (tied weights), so files may hold one."""
    by_ptr: dict[tuple[int, tuple[int, ...]], list[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if tensor.device.type == "meta" or tensor.numel() == 0:
            continue
        by_ptr.setdefault((tensor.data_ptr(), tuple(tensor.shape)), []).append(name)
    return {n: names for names in by_ptr.values() if len(names) > 1 for n in names}


def load_state_dict_strict(
    model: Any,
    state_dict: dict[str, Any],
    *,
    source: str,
    fresh_prefixes: Iterable[str] = (),
    fresh_substrings: Iterable[str] = (),
    explain: Callable[[list[str], list[str]], str] | None = None,
) -> LoadReport:
    """Load ``state_dict`` into ``model`` only if every tensor is accounted for.

    A model tensor may be absent from the file only if its name starts with one of
    ``fresh_prefixes`` (the Stage-2 fusion layers during promotion) or contains one of
    ``fresh_substrings`` (``.lora_`` when LoRA is attached for the first time). LoRA-wrapped
    modules accept the plain key (``q_proj.weight`` for ``q_proj.base_layer.weight``).

    :param explain: ``(missing, unexpected) -> likely cause`` for the error message.
    :raises CheckpointMismatchError: with missing/unexpected/mismatched tensors grouped by module.
    """
    import torch

    expected = model.state_dict()
    aliases = _aliases(model)
    fresh_prefixes = tuple(fresh_prefixes)
    fresh_substrings = tuple(fresh_substrings)
    mapped: dict[str, Any] = {}
    missing: list[str] = []
    fresh: list[str] = []
    mismatched: list[str] = []
    used: set[str] = set()
    for name, tensor in expected.items():
        candidates = [name, name.replace(".base_layer.", ".")] + [a for a in aliases.get(name, []) if a != name]
        key = next((c for c in candidates if c in state_dict), None)
        if key is None:
            is_fresh = name.startswith(fresh_prefixes) or any(sub in name for sub in fresh_substrings)
            (fresh if is_fresh else missing).append(name)
            continue
        used.add(key)
        value = state_dict[key]
        if tuple(value.shape) != tuple(tensor.shape):
            mismatched.append(f"{name} (checkpoint {tuple(value.shape)} vs model {tuple(tensor.shape)})")
            continue
        if _dtype_kind(value.dtype) != _dtype_kind(tensor.dtype):
            # A float precision change is a cast LeRobot itself makes (fp32 master weights into a bf16
            # policy); a float tensor stored as integers (or the reverse) is a corrupt or foreign file.
            mismatched.append(f"{name} (checkpoint dtype {value.dtype} vs model {tensor.dtype})")
            continue
        mapped[name] = value
    unexpected = sorted(set(state_dict) - used)
    if missing or unexpected or mismatched:
        cause = explain(missing, unexpected) if explain else ""
        if any(" dtype " in m for m in mismatched):
            cause = ("a tensor is stored with another kind of dtype than the model's (a float tensor as integers, "
                     "or the reverse): the file is corrupt or was converted by a tool. Re-save it from the model.")
        elif any(".apt_" in m for m in mismatched):
            cause = ("the fusion layers have other shapes than in the checkpoint: an APT setting that shapes them "
                     "differs (gate_granularity, or the expert width/depth). Load with the checkpoint's apt settings "
                     "(its config.json).")
        raise CheckpointMismatchError(source, missing, unexpected, cause, mismatched)
    with torch.no_grad():
        result = model.load_state_dict(mapped, strict=False)
    leftover = [k for k in result.missing_keys if k not in fresh]
    if leftover or result.unexpected_keys:  # defensive: load_state_dict must agree with the plan
        raise CheckpointMismatchError(source, leftover, result.unexpected_keys, "internal key mapping error")
    return LoadReport(source=source, loaded=sorted(mapped), fresh=sorted(fresh))


def _dtype_kind(dtype: Any) -> str:
    if dtype.is_complex:
        return "complex"
    if dtype.is_floating_point:
        return "float"
    return "bool" if str(dtype) == "torch.bool" else "integer"


def read_manifest(directory: str | Path) -> dict[str, Any] | None:
    """The APT manifest of a checkpoint directory, or None for a plain host checkpoint.

    :raises CheckpointMismatchError: the manifest is not a JSON object.
    """
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointMismatchError(str(directory), cause=f"{MANIFEST_NAME} is corrupt ({exc}). Restore it from "
                                      "the run that wrote the checkpoint, or save the checkpoint again.") from None
    if not isinstance(manifest, dict):
        raise CheckpointMismatchError(str(directory), cause=f"{MANIFEST_NAME} is not a JSON object.")
    return manifest


def write_manifest(directory: str | Path, manifest: dict[str, Any]) -> Path:
    """Write ``apt_manifest.json`` atomically (write to a temp file, fsync, then rename)."""
    import os

    path = Path(directory) / MANIFEST_NAME
    tmp = path.with_suffix(".json.tmp")
    with open(tmp, "w") as handle:
        handle.write(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    tmp.replace(path)
    return path


def weights_summary(path: str | Path) -> dict[str, Any]:
    """Tensor count and count per dtype of a safetensors file, read from its header only."""
    from safetensors import safe_open

    dtypes: dict[str, int] = {}
    with safe_open(str(path), framework="pt") as handle:
        for key in handle.keys():
            dtype = str(handle.get_slice(key).get_dtype()).lower()
            dtypes[dtype] = dtypes.get(dtype, 0) + 1
    return {"tensors": sum(dtypes.values()), "dtypes": dict(sorted(dtypes.items()))}


_SAFETENSORS_DTYPES = {"float32": "f32", "float16": "f16", "bfloat16": "bf16", "float64": "f64", "int64": "i64",
                       "int32": "i32", "int16": "i16", "int8": "i8", "uint8": "u8", "bool": "bool"}


def check_manifest_against_weights(manifest: dict[str, Any], state_dict: dict[str, Any], source: str) -> None:
    """Refuse weights whose APT tensors (names, shapes) disagree with their manifest.

    The manifest is written from the very state dict that is saved, so a disagreement means one of
    the two files was replaced, renamed into or edited after the save.

    :raises CheckpointMismatchError: naming the tensors that disagree.
    """
    declared = manifest.get("apt_tensors")
    if not isinstance(declared, dict):
        raise CheckpointMismatchError(source, cause=f"{MANIFEST_NAME} has no 'apt_tensors' table; it was not "
                                      "written by apt-plugins or is damaged.")
    present = {k: list(v.shape) for k, v in state_dict.items() if ".apt_" in k}
    missing = sorted(k for k in declared if k not in present)
    unexpected = sorted(k for k in present if k not in declared)
    reshaped = sorted(f"{k} (manifest {tuple(declared[k])} vs file {tuple(present[k])})"
                      for k in declared if k in present and list(declared[k]) != present[k])
    recorded = manifest.get("weights")
    if isinstance(recorded, dict) and not (missing or unexpected or reshaped):
        found: dict[str, int] = {}
        for value in state_dict.values():
            name = str(value.dtype).removeprefix("torch.")
            found[_SAFETENSORS_DTYPES.get(name, name)] = found.get(_SAFETENSORS_DTYPES.get(name, name), 0) + 1
        if dict(sorted(found.items())) != recorded.get("dtypes") or len(state_dict) != recorded.get("tensors"):
            raise CheckpointMismatchError(
                source, cause=f"model.safetensors holds {len(state_dict)} tensors with dtypes "
                f"{dict(sorted(found.items()))}, but {MANIFEST_NAME} recorded {recorded.get('tensors')} tensors "
                f"with {recorded.get('dtypes')}: the weights were converted or replaced after the save. "
                "Use the pair written together (save the checkpoint again).")
    if missing or unexpected or reshaped:
        raise CheckpointMismatchError(
            source, missing, unexpected,
            cause=f"{MANIFEST_NAME} (stage {manifest.get('stage')}) disagrees with model.safetensors: one of them "
            "was replaced or edited after the save. Use the pair written together (save the checkpoint again).",
            mismatched=reshaped,
        )


def tensor_fingerprint(tensor: Any) -> str:
    """SHA-256 of a tensor's dtype, shape and raw bytes (bit-exact identity)."""
    import torch

    t = tensor.detach().cpu().contiguous()
    h = hashlib.sha256(f"{t.dtype}:{tuple(t.shape)}:".encode())
    if t.numel():
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def fingerprint(model: Any, names: Iterable[str] | None = None, frozen_only: bool = False) -> dict[str, str]:
    """Fingerprints of ``model``'s parameters (all, the given names, or only the frozen ones)."""
    wanted = set(names) if names is not None else None
    out = {}
    for name, param in model.named_parameters():
        if wanted is not None and name not in wanted:
            continue
        if frozen_only and param.requires_grad:
            continue
        out[name] = tensor_fingerprint(param)
    return out


def explain_mismatch(
    manifest: dict[str, Any] | None, source_stage: int | None, target_stage: int, missing: list[str], unexpected: list[str]
) -> str:
    """The likely cause of a checkpoint/model mismatch, from the APT tensors involved (``.apt_`` names)."""
    apt_missing = any(".apt_" in k for k in missing)
    apt_unexpected = any(".apt_" in k for k in unexpected)
    if manifest is None and apt_missing:
        return (
            "this is a plain LeRobot checkpoint (no apt_manifest.json), so it has no fusion layers. "
            "Run `apt-plugins retrofit SRC OUT --stage 2`, or train Stage 1 from it and promote."
        )
    if apt_unexpected and target_stage == 1:
        return "this is a Stage-2 checkpoint; load it with apt.stage=2."
    if apt_missing and source_stage == 2:
        return "the checkpoint's fusion layers do not match this config (fusion settings or layer count differ)."
    if any(".lora_" in k for k in unexpected):
        return "the checkpoint was trained with vlm_mode='lora'; load it with the same vlm_mode."
    return (
        "the checkpoint comes from a differently sized or different policy (compare chunk_size, max_state_dim, "
        "max_action_dim and the model variants in its config.json with yours)."
    )
