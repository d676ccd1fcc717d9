"""A per-frame store of frozen-prefix tensors, reused across epochs (``apt.prefix_cache``).

With the VLM frozen and language hidden, the keys/values an action expert reads from the prefix are
a function of the frame's inputs (images, and whatever prompt tokens stay visible) and of the frozen
weights alone. :class:`PrefixCache` stores them per frame under a key made of both, so the VLM runs
once per frame instead of once per epoch. Adapters decide what goes into the key and the entry; this
module only keys, stores, bounds and checks:

- **content keys** (:func:`content_key`): a SHA-256 over exactly the tensors the prefix is computed
  from, so a changed frame can never hit a stale entry;
- **weights namespace** (:meth:`PrefixCache.namespace`): a SHA-256 over the frozen prefix weights,
  recomputed only when a tensor's storage or version counter moves (``load_state_dict``, an in-place
  edit), so changed weights never hit entries of the old ones;
- **augmentation guard** (:meth:`PrefixCache.check_frames`): when the batch carries LeRobot's frame
  ``index``, a frame that comes back with different inputs raises :class:`PrefixCacheError` instead of
  silently filling the cache with one entry per augmented view;
- **storage**: ``memory:<size>`` (an LRU over entry bytes, in this process) or a directory (one file
  per entry, written atomically, shareable across runs with the same weights).

Stored tensors are cast to the storage dtype (bfloat16 by default); ``"model"`` keeps the computed
dtype and is exact. ``import apt_plugins.prefix_cache`` does not import torch.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from .errors import PrefixCacheError

__all__ = ["PrefixCache", "content_key", "parse_memory_budget"]

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_MEMORY_FORM = "'memory:<number><unit>', unit one of KB, MB, GB, KiB, MiB, GiB (e.g. 'memory:8GB')"


def parse_memory_budget(spec: str) -> int:
    """Bytes of a ``memory:<size>`` budget; raises ValueError naming the accepted forms."""
    m = re.fullmatch(r"memory:\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)", spec.strip())
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"prefix_cache={spec!r} is not a memory budget; use {_MEMORY_FORM}, or a directory path")
    size = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if size <= 0:
        raise ValueError(f"prefix_cache={spec!r}: the memory budget must be positive")
    return size


def _tensor_bytes(tensor: Any) -> bytes:
    import torch

    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    if t.dtype == torch.bool:
        t = t.to(torch.uint8)
    return t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def content_key(*parts: Any) -> str:
    """SHA-256 (hex) over ``parts``: tensors (dtype, shape and bytes), strings and numbers, in order."""
    import torch

    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, torch.Tensor):
            h.update(f"T{part.dtype}{tuple(part.shape)}:".encode())
            h.update(_tensor_bytes(part))
        else:
            h.update(f"S{part!r}:".encode())
    return h.hexdigest()


class PrefixCache:
    """Per-frame cache of prefix tensors under a weights namespace (see the module docstring).

    :param location: ``"memory:<size>"`` or a directory path (created on first write).
    :param dtype: storage dtype, ``"bfloat16"``, ``"float16"`` or ``"model"`` (no conversion).
    """

    def __init__(self, location: str, dtype: str = "bfloat16"):
        self.location = location
        self.dtype_name = dtype
        if location.startswith("memory:"):
            try:
                self.budget_bytes: int | None = parse_memory_budget(location)
            except ValueError as exc:
                raise PrefixCacheError(str(exc)) from None
            self.directory: Path | None = None
        else:
            self.budget_bytes = None
            self.directory = Path(location).expanduser()
        self._memory: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._memory_bytes = 0
        self._frames: dict[int, str] = {}
        self._weights_state: tuple | None = None
        self._namespace: str | None = None
        self.hits = self.misses = self.evictions = 0
        self.entry_bytes: list[int] = []  # sizes of the entries written, for the benchmark's per-frame figure

    # ------------------------------------------------------------------ weights
    def namespace(self, tensors: Sequence[Any]) -> str:
        """SHA-256 over ``tensors`` (the frozen weights the prefix depends on), cached.

        Re-hashed only when a tensor's identity, storage or in-place version counter changes, which
        every weight update does (``load_state_dict`` copies in place and bumps the counter).
        Entries of an older namespace are never returned.
        """
        state = tuple((id(t), t.data_ptr(), t._version) for t in tensors)
        if state != self._weights_state:
            h = hashlib.sha256()
            for t in tensors:
                h.update(f"{t.dtype}{tuple(t.shape)}:".encode())
                h.update(_tensor_bytes(t))
            new = h.hexdigest()
            if new != self._namespace:
                self._memory.clear()  # entries of other weights can never hit again
                self._memory_bytes = 0
                self._frames.clear()
            self._namespace, self._weights_state = new, state
        return self._namespace

    # ------------------------------------------------------------------ frames
    def check_frames(self, frames: Iterable[int], keys: Sequence[str]) -> None:
        """Refuse a batch in which a known frame ``index`` arrives with other inputs than before.

        The whole batch is checked before anything is recorded, so a failing batch leaves no trace.
        """
        frames = [int(f) for f in frames]
        for frame, key in zip(frames, keys, strict=True):
            seen = self._frames.get(frame)
            if seen is not None and seen != key:
                raise PrefixCacheError(
                    f"prefix_cache: frame index {frame} came back with different images or visible prompt tokens "
                    "than when it was cached, so its cached prefix would be wrong. Image augmentation "
                    "(lerobot-train --dataset.image_transforms.enable=true) changes the prefix every epoch: turn it "
                    "off, or unset policy.apt.prefix_cache. If two datasets share frame indices, use one cache per "
                    "dataset."
                )
        for frame, key in zip(frames, keys, strict=True):
            self._frames[frame] = key

    # ------------------------------------------------------------------ entries
    def _path(self, namespace: str, key: str) -> Path:
        assert self.directory is not None
        return self.directory / namespace[:32] / key[:2] / f"{key}.pt"

    def get(self, namespace: str, key: str) -> dict[str, Any] | None:
        """The stored entry (a dict of CPU tensors in the storage dtype), or None."""
        full = namespace + key
        entry = self._memory.get(full)
        if entry is not None:
            self._memory.move_to_end(full)
            self.hits += 1
            return entry
        if self.directory is not None:
            path = self._path(namespace, key)
            if path.is_file():
                import torch

                self.hits += 1
                return torch.load(path, map_location="cpu", weights_only=True)
        self.misses += 1
        return None

    def convert(self, entry: dict[str, Any]) -> dict[str, Any]:
        """``entry`` on the CPU in the storage dtype (floating tensors only); boolean masks unchanged."""
        import torch

        target = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(self.dtype_name)
        out = {}
        for name, t in entry.items():
            t = t.detach().to("cpu")
            if target is not None and t.is_floating_point():
                if target == torch.float16 and t.numel() and float(t.abs().max()) > torch.finfo(torch.float16).max:
                    raise PrefixCacheError(
                        f"prefix_cache: a cached {name} value exceeds the float16 range (65504); "
                        "set apt.prefix_cache_dtype='bfloat16' or 'model'."
                    )
                t = t.to(target)
            out[name] = t.contiguous().clone()
        return out

    def put(self, namespace: str, key: str, entry: dict[str, Any]) -> dict[str, Any]:
        """Store ``entry`` (converted to the storage dtype) and return the stored version."""
        stored = self.convert(entry)
        size = sum(t.numel() * t.element_size() for t in stored.values())
        self.entry_bytes.append(size)
        if self.directory is not None:
            import torch

            path = self._path(namespace, key)
            path.parent.mkdir(parents=True, exist_ok=True)
            # Write-then-rename: a concurrent reader (another rank) sees a whole entry or none.
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".pt")
            try:
                with os.fdopen(fd, "wb") as fh:
                    torch.save(stored, fh)
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
            return stored
        assert self.budget_bytes is not None
        full = namespace + key
        if full in self._memory:
            self._memory_bytes -= sum(t.numel() * t.element_size() for t in self._memory.pop(full).values())
        while self._memory and self._memory_bytes + size > self.budget_bytes:
            _, old = self._memory.popitem(last=False)
            self._memory_bytes -= sum(t.numel() * t.element_size() for t in old.values())
            self.evictions += 1
        if size <= self.budget_bytes:
            self._memory[full] = stored
            self._memory_bytes += size
        return stored

    @property
    def memory_bytes(self) -> int:
        """Bytes held in memory (memory mode)."""
        return self._memory_bytes

    def stats(self) -> dict[str, Any]:
        """Hits, misses, evictions, entries in memory and the mean entry size (bytes per frame)."""
        mean = sum(self.entry_bytes) / len(self.entry_bytes) if self.entry_bytes else 0.0
        return dict(hits=self.hits, misses=self.misses, evictions=self.evictions, entries=len(self._memory),
                    memory_bytes=self._memory_bytes, bytes_per_frame=mean, location=self.location,
                    dtype=self.dtype_name)
