"""PNG plots of language reports: divergence bars per variant (one or several policies), task heatmap.

matplotlib (``apt-plugins[demo]``) is imported here only, with the non-interactive Agg backend.
Each file is written to a temporary name and renamed, so a failed plot leaves no partial PNG.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from ...errors import AptConfigError

if TYPE_CHECKING:
    from .report import LanguageReport

__all__ = ["plot_divergence_bars", "plot_task_heatmap"]


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise AptConfigError("plots", "png", "matplotlib is not installed: pip install 'apt-plugins[demo]', "
                             "or pass --no-plots.") from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    try:
        fig.savefig(tmp, dpi=120, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def plot_divergence_bars(reports: list[LanguageReport], path: str | Path) -> Path:
    """Grouped bars: mean normalised action divergence per variant, one bar colour per policy.

    The legend carries each policy's instruction-following index.
    """
    plt = _pyplot()
    variants = [v for v in dict.fromkeys(v for r in reports for v in r.per_variant) if v != "original"]
    width = 0.8 / max(1, len(reports))
    fig, ax = plt.subplots(figsize=(1.4 + 1.2 * len(variants), 3.6))
    for k, report in enumerate(reports):
        values = [report.divergence(v) or 0.0 for v in variants]
        index = report.index
        label = f"{report.name} (index {index:.2f})" if index is not None else report.name
        xs = [i + (k - (len(reports) - 1) / 2) * width for i in range(len(variants))]
        bars = ax.bar(xs, values, width=width * 0.95, label=label)
        # Values on the bars: a policy that ignores the instruction has bars of height 0, which are
        # otherwise invisible.
        ax.bar_label(bars, labels=[f"{v:.2f}" for v in values], fontsize=6, padding=1)
    ax.set_xticks(range(len(variants)))
    ax.set_xticklabels(variants)
    ax.set_ylabel("action divergence\n(RMS, dataset action std units)")
    ax.set_title("How much the instruction moves the actions")
    ax.axhline(0, color="black", linewidth=0.6)
    ax.legend(fontsize=8)
    try:
        return _save(fig, Path(path))
    finally:
        plt.close(fig)


def plot_task_heatmap(report: LanguageReport, path: str | Path) -> Path:
    """Heatmap of mean divergence per original task (rows) and variant (columns), values printed."""
    plt = _pyplot()
    variants = [v for v in report.per_variant if v != "original"]
    tasks = list(report.per_task)
    grid = [[report.per_task[t]["divergence_mean"].get(v) or 0.0 for v in variants] for t in tasks]
    fig, ax = plt.subplots(figsize=(1.6 + 1.1 * len(variants), 1.2 + 0.45 * len(tasks)))
    image = ax.imshow(grid, cmap="viridis", aspect="auto", vmin=0.0)
    ax.set_xticks(range(len(variants)))
    ax.set_xticklabels(variants, rotation=20)
    ax.set_yticks(range(len(tasks)))
    ax.set_yticklabels(tasks)
    top = max((max(row) for row in grid), default=0.0) or 1.0
    for i, row in enumerate(grid):
        for j, value in enumerate(row):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8,
                    color="white" if value < 0.6 * top else "black")
    fig.colorbar(image, ax=ax, label="divergence")
    ax.set_title(f"{report.name}: divergence per task")
    try:
        return _save(fig, Path(path))
    finally:
        plt.close(fig)
