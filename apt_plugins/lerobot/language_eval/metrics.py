"""Metrics of the language evaluator: normalised action distances and the instruction-following index.

All distances are in units of the dataset's action scale (the per-dimension standard deviation of
``action`` in the dataset statistics), so dimensions measured in metres, radians and gripper units
weigh the same and numbers compare across datasets. Definitions: ``docs/language_eval.md``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

__all__ = ["action_scale", "normalised_rms", "follow_score", "mean_or_none", "aggregate"]


def action_scale(std: Any, floor: float = 1e-3) -> np.ndarray:
    """Per-dimension action scale: the dataset's std, floored at ``floor`` x its largest entry.

    The floor keeps a constant dimension (std 0, e.g. an unused joint) from turning a rounding
    difference into an infinite distance.
    """
    std = np.asarray(std, dtype=np.float64).reshape(-1)
    top = float(std.max()) if std.size else 1.0
    return np.maximum(std, max(top * floor, 1e-8))


def normalised_rms(a: np.ndarray, b: np.ndarray, scale: np.ndarray, valid: np.ndarray | None = None) -> float:
    """Root mean square of ``(a - b) / scale`` over the valid steps of an action chunk ``(T, D)``."""
    diff = (np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)) / scale
    if valid is not None and valid.any():
        diff = diff[valid]
    return float(np.sqrt(np.mean(diff ** 2)))


def follow_score(original: np.ndarray, swapped: np.ndarray, gt_original: np.ndarray, gt_swapped: np.ndarray,
                 scale: np.ndarray, valid: np.ndarray | None = None, min_gap: float = 1e-6) -> float | None:
    """How far the actions moved towards the swapped task's ground truth, in units of the task gap.

    ``<a_swap - a_orig, g_swap - g_orig> / |g_swap - g_orig|^2`` on scaled actions: 1 when the
    action moves exactly from the original task's ground truth to the swapped task's, 0 when it
    does not move, negative when it moves away. ``None`` when the two ground truths coincide.
    """
    shift = (np.asarray(swapped, np.float64) - np.asarray(original, np.float64)) / scale
    gap = (np.asarray(gt_swapped, np.float64) - np.asarray(gt_original, np.float64)) / scale
    if valid is not None and valid.any():
        shift, gap = shift[valid], gap[valid]
    denominator = float((gap ** 2).sum())
    if denominator < min_gap:
        return None
    return float((shift * gap).sum() / denominator)


def mean_or_none(values: Iterable[float | None]) -> float | None:
    """The mean of the values that are not ``None`` (``None`` if there are none)."""
    kept = [v for v in values if v is not None]
    return float(np.mean(kept)) if kept else None


def aggregate(frames: list[dict[str, Any]], variants: Iterable[str]) -> tuple[dict, dict]:
    """Per-variant and per-task summaries of the per-frame records (see ``docs/language_eval.md``)."""
    variants = list(variants)
    per_variant: dict[str, dict[str, Any]] = {}
    for variant in variants:
        rows = [f for f in frames if variant in f["divergence"]]
        div = [f["divergence"][variant] for f in rows]
        per_variant[variant] = {
            "frames": len(rows),
            "divergence_mean": mean_or_none(div),
            "divergence_max": float(max(div)) if div else None,
            "gt_error_mean": mean_or_none(f["gt_error"][variant] for f in rows),
            "gt_error_swap_mean": mean_or_none(f["gt_error_swap"].get(variant) for f in rows),
            "tokens_changed": sum(bool(f["tokens_changed"][variant]) for f in rows),
        }
    per_task: dict[str, dict[str, Any]] = {}
    for task in sorted({f["task"] for f in frames}):
        rows = [f for f in frames if f["task"] == task]
        per_task[task] = {
            "frames": len(rows),
            "divergence_mean": {v: mean_or_none(f["divergence"].get(v) for f in rows) for v in variants},
            "gt_error_mean": mean_or_none(f["gt_error"].get("original") for f in rows),
            "follow_index": mean_or_none(f.get("follow") for f in rows),
        }
    return per_variant, per_task
