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
        mapped[name] = value
    unexpected = sorted(set(state_dict) - used)
    if missing or unexpected or mismatched:
        cause = explain(missing, unexpected) if explain else ""
        if any(".apt_" in m for m in mismatched):
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


def read_manifest(directory: str | Path) -> dict[str, Any] | None:
    """The APT manifest of a checkpoint directory, or None for a plain host checkpoint."""
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def write_manifest(directory: str | Path, manifest: dict[str, Any]) -> Path:
    """Write ``apt_manifest.json`` atomically (write to a temp file, then rename)."""
    path = Path(directory) / MANIFEST_NAME
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
    return path


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
