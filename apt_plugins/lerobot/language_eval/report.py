"""The language report: one policy's numbers, as a console table, a JSON file and plots.

The JSON layout is versioned (:data:`SCHEMA_VERSION`) and documented field by field in
``docs/language_eval.md``; :meth:`LanguageReport.to_dict` is exactly what :meth:`write_json` writes.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["SCHEMA_VERSION", "LanguageReport", "format_comparison", "write_json_atomic"]

SCHEMA_VERSION = 1


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}g}" if abs(value) < 1e-3 and value != 0 else f"{value:.{digits}f}"


def write_json_atomic(path: str | Path, data: Any) -> Path:
    """Write ``data`` as JSON to ``path`` through a temporary file, so a failure leaves no partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


@dataclass
class LanguageReport:
    """What ``evaluate_language`` measured for one policy (fields: ``docs/language_eval.md``)."""

    schema_version: int
    policy: dict[str, Any]
    dataset: dict[str, Any]
    settings: dict[str, Any]
    summary: dict[str, Any]
    per_variant: dict[str, dict[str, Any]]
    per_task: dict[str, dict[str, Any]]
    skipped: dict[str, str] = field(default_factory=dict)
    frames: list[dict[str, Any]] = field(default_factory=list)

    @property
    def name(self) -> str:
        """The policy's name in tables and plots."""
        return str(self.policy.get("name"))

    @property
    def index(self) -> float | None:
        """The instruction-following index (``summary.instruction_following_index``)."""
        return self.summary.get("instruction_following_index")

    def divergence(self, variant: str) -> float | None:
        """Mean normalised action divergence under ``variant`` (``None`` if it was not run)."""
        return self.per_variant.get(variant, {}).get("divergence_mean")

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready report (schema in ``docs/language_eval.md``)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LanguageReport:
        """Rebuild a report from :meth:`to_dict` output (a JSON file read back)."""
        return cls(**data)

    def write_json(self, path: str | Path) -> Path:
        """Write the report as JSON (atomically: no partial file on failure)."""
        return write_json_atomic(path, self.to_dict())

    def format_table(self) -> str:
        """The console table: one row per variant, then per task, then the headline numbers."""
        lines = [f"policy {self.name} ({self.policy.get('type')}) on {self.dataset.get('repo_id')}: "
                 f"{self.settings.get('frames')} frames, seed {self.settings.get('seed')}, "
                 f"device {self.settings.get('device')}"]
        head = f"{'variant':<12} {'frames':>6} {'tokens changed':>14} {'divergence':>10} {'max':>8} " \
               f"{'err(orig)':>9} {'err(swap)':>9}"
        lines += ["", head, "-" * len(head)]
        for variant, row in self.per_variant.items():
            lines.append(f"{variant:<12} {row['frames']:>6} {row['tokens_changed']:>14} "
                         f"{_fmt(row['divergence_mean']):>10} {_fmt(row['divergence_max']):>8} "
                         f"{_fmt(row['gt_error_mean']):>9} {_fmt(row['gt_error_swap_mean']):>9}")
        for variant, why in self.skipped.items():
            lines.append(f"{variant:<12} skipped: {why}")
        variants = [v for v in self.per_variant if v != "original"]
        if self.per_task and variants:
            width = max(len(t) for t in self.per_task)
            head = f"{'task':<{width}} " + " ".join(f"{v:>10}" for v in variants) + f" {'follow':>7}"
            lines += ["", "divergence per task", head, "-" * len(head)]
            for task, row in self.per_task.items():
                lines.append(f"{task:<{width}} " + " ".join(f"{_fmt(row['divergence_mean'].get(v)):>10}" for v in variants)
                             + f" {_fmt(row.get('follow_index')):>7}")
        s = self.summary
        lines += ["", f"instruction-following index: {_fmt(s.get('instruction_following_index'))}   "
                  f"sensitivity: {_fmt(s.get('sensitivity'))}   paraphrase divergence: "
                  f"{_fmt(s.get('paraphrase_divergence'))}   noise check (original re-run): {_fmt(s.get('noise_check'))}"]
        return "\n".join(lines)

    def save_plots(self, directory: str | Path, prefix: str = "language") -> list[Path]:
        """Write ``<prefix>_divergence.png`` (bars per variant) and ``<prefix>_heatmap.png`` (task x variant)."""
        from .plots import plot_divergence_bars, plot_task_heatmap

        directory = Path(directory)
        return [plot_divergence_bars([self], directory / f"{prefix}_divergence.png"),
                plot_task_heatmap(self, directory / f"{prefix}_heatmap.png")]


def format_comparison(reports: list[LanguageReport]) -> str:
    """Several policies in one table: divergence per variant, index, sensitivity, paraphrase divergence."""
    variants = [v for v in dict.fromkeys(v for r in reports for v in r.per_variant) if v != "original"]
    width = max([len("policy"), *(len(r.name) for r in reports)])
    head = f"{'policy':<{width}} {'type':<12} " + " ".join(f"{v:>10}" for v in variants) + \
           f" {'index':>7} {'sensitivity':>11}"
    lines = [head, "-" * len(head)]
    for r in reports:
        lines.append(f"{r.name:<{width}} {str(r.policy.get('type')):<12} "
                     + " ".join(f"{_fmt(r.divergence(v)):>10}" for v in variants)
                     + f" {_fmt(r.index):>7} {_fmt(r.summary.get('sensitivity')):>11}")
    lines.append("(divergence: mean normalised action change from the original instruction; index: "
                 "instruction-following index, see docs/language_eval.md)")
    return "\n".join(lines)
