"""Aggregate the repro's runs (mean ± std over seeds), plot them and write the Markdown report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["aggregate", "write_report", "SPLIT_LABELS", "ARM_LABELS"]

SPLIT_LABELS = {
    "id": "ID (seen layout + instruction)",
    "task": "task perturbation (other object named)",
    "paraphrase": "paraphrase / synonyms",
    "unseen": "unseen colour/shape combination",
    "newscene": "new layouts",
}
#: one colour per arm in every plot
ARM_COLOURS = {"stock_full": "tab:blue", "stock_expert": "tab:orange", "apt_frozen": "tab:green",
               "apt_lora": "tab:red", "apt_frozen_gate1": "tab:purple"}
ARM_LABELS = {
    "stock_full": "stock pi0, full fine-tune (VLM trains)",
    "stock_expert": "stock pi0, expert only (VLM frozen)",
    "apt_frozen": "APT Stage 1 -> 2, VLM frozen",
    "apt_lora": "APT Stage 1 -> 2, VLM LoRA",
    "apt_frozen_gate1": "APT VLM frozen, gate_lr_multiplier=1 (control)",
}


def _ms(values: list[float]) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def aggregate(runs: list[dict]) -> dict[str, dict]:
    """``{arm: {metric: (mean, std), ..., "seeds": n}}`` over the seeds of each arm."""
    table: dict[str, dict] = {}
    for arm in ARM_LABELS:
        rows = [r for r in runs if r["arm"] == arm]
        if not rows:
            continue
        entry: dict[str, Any] = {"seeds": len(rows)}
        for split in SPLIT_LABELS:
            for metric in ("success", "choice", "action_error"):
                entry[f"{split}.{metric}"] = _ms([r[split][metric] for r in rows])
        for style in ("canonical", "paraphrase"):
            entry[f"grounding.{style}"] = _ms([r["grounding"][style] for r in rows])
        gates = [float(np.mean(r["gates"])) for r in rows if r["gates"]]
        entry["gate_mean"] = _ms(gates)
        entry["gate_range"] = ((min(min(r["gates"]) for r in rows if r["gates"]),
                                max(max(r["gates"]) for r in rows if r["gates"])) if gates else None)
        entry["seconds"] = _ms([r["seconds"] for r in rows])
        table[arm] = entry
    return table


def _fmt(ms: tuple[float, float], digits: int = 2) -> str:
    m, s = ms
    if np.isnan(m):
        return "n/a"
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def _plots(out_dir: Path, summary: dict) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    table = summary["table"]
    arms = [a for a in ARM_LABELS if a in table]
    names = []
    for metric, title in (("success", "success (on the named object)"), ("choice", "choice (nearest object is the named one)")):
        fig, ax = plt.subplots(figsize=(11, 4))
        width = 0.8 / max(1, len(arms))
        for i, arm in enumerate(arms):
            means = [table[arm][f"{s}.{metric}"][0] for s in SPLIT_LABELS]
            stds = [table[arm][f"{s}.{metric}"][1] for s in SPLIT_LABELS]
            ax.bar(np.arange(len(SPLIT_LABELS)) + i * width, means, width, yerr=stds, label=ARM_LABELS[arm], capsize=2,
                   color=ARM_COLOURS[arm])
        ax.set_xticks(np.arange(len(SPLIT_LABELS)) + width * (len(arms) - 1) / 2)
        ax.set_xticklabels(list(SPLIT_LABELS), rotation=0)
        ax.set(ylim=(0, 1), ylabel=metric, title=f"{title}; mean ± std over seeds")
        if metric == "choice":
            ax.axhline(1 / 3, color="grey", lw=0.8, ls="--")
        ax.legend(fontsize=7, loc="upper right")
        fig.tight_layout()
        name = f"repro_{metric}.png"
        fig.savefig(out_dir / name, dpi=100)
        plt.close(fig)
        names.append(name)
    # Curves of seed 0: loss over the whole schedule and the gates of the APT arms.
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for run in summary["runs"]:
        if run["seed"] != 0:
            continue
        xs, ys, gx, gy, offset = [], [], [], [], 0
        for phase, curve in run["curves"].items():
            for step, loss, gates in curve:
                xs.append(step + offset)
                ys.append(loss)
                if gates:
                    gx.append(step + offset)
                    gy.append(float(np.mean(gates)))
            if curve:
                offset += curve[-1][0]
        style = dict(label=ARM_LABELS.get(run["arm"], run["arm"]), color=ARM_COLOURS.get(run["arm"]), lw=1)
        axes[0].plot(xs, ys, **style)
        if gy:
            axes[1].plot(gx, gy, **style)
    axes[0].set(title="training loss, seed 0 (pretraining, then post-training)", xlabel="step", ylabel="loss",
                yscale="log")
    axes[0].legend(fontsize=7)
    axes[1].set(title="mean sigmoid(gate) over fusion layers, seed 0", xlabel="step (Stage 1 steps included)",
                ylabel="gate")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "repro_curves.png", dpi=100)
    plt.close(fig)
    names.append("repro_curves.png")
    return names


def write_report(out_dir: Path, summary: dict, report_name: str = "report.md", image_dir: Path | None = None) -> str:
    """Write the Markdown report (and its PNG plots) into ``out_dir``; return the text."""
    out_dir = Path(out_dir)
    image_dir = Path(image_dir) if image_dir is not None else out_dir
    plots = _plots(image_dir, summary)
    rel = image_dir.relative_to(out_dir) if image_dir != out_dir else Path(".")
    meta, table = summary["meta"], summary["table"]
    cfg = meta["config"]
    lines = [
        f"<!-- generated by apt-plugins repro ({cfg['mode']}); rerun the command below to regenerate -->",
        "",
        "## Results",
        "",
        f"Mode **{cfg['mode']}**, {cfg['seeds']} seed(s), {meta['seconds']:.0f} s on {meta['cores']} CPU cores. "
        f"Command: `{meta['command']}`.",
        "",
        "Success: the target the predicted action chunk heads for lies within 0.12 (about 3 px) of the "
        "named object. Choice: the object nearest that target is the named one (chance about 0.33). "
        "Mean ± std over seeds.",
        "",
        "| arm | " + " | ".join(SPLIT_LABELS[s] + " success / choice" for s in SPLIT_LABELS) + " |",
        "|---|" + "---|" * len(SPLIT_LABELS),
    ]
    for arm, e in table.items():
        cells = [f"{_fmt(e[f'{s}.success'])} / {_fmt(e[f'{s}.choice'])}" for s in SPLIT_LABELS]
        lines.append(f"| {ARM_LABELS[arm]} | " + " | ".join(cells) + " |")
    before = meta["vlm"]["accuracy"]
    lines += [
        "",
        f"VLM drift: grounding accuracy of the VLM's own LM head on fresh scenes (canonical / paraphrase). "
        f"Before any arm: {before['canonical']:.3f} / {before['paraphrase']:.3f}.",
        "",
        "| arm | grounding after (canonical) | grounding after (paraphrase) | mean gate after | gate range | "
        "ID action error | seconds per arm |",
        "|---|---|---|---|---|---|---|",
    ]
    for arm, e in table.items():
        rng = e["gate_range"]
        lines.append(
            f"| {ARM_LABELS[arm]} | {_fmt(e['grounding.canonical'], 3)} | {_fmt(e['grounding.paraphrase'], 3)} | "
            f"{_fmt(e['gate_mean'], 3) if rng else '-'} | {f'{rng[0]:.3f} .. {rng[1]:.3f}' if rng else '-'} | "
            f"{_fmt(e['id.action_error'], 3)} | {_fmt(e['seconds'], 0)} |")
    lines += ["", *(f"![{p}]({(rel / p).as_posix()})" for p in plots), ""]
    s = meta["settings"]
    lines += [
        "Run settings: "
        f"{cfg['pretrain_layouts']} pretraining layouts, {cfg['posttrain_layouts']} post-training layouts "
        f"({cfg['second_instruction']:.0%} with a second instruction, {cfg['posttrain_episodes']} episodes each), "
        f"{cfg['eval_episodes']} episodes per evaluation split; frames used {meta['frames']}; "
        f"VLM grounding pretraining {cfg['vlm_steps']} steps ({meta['vlm'].get('seconds', '?')} s); "
        f"{s['pretrain_steps']} pretraining + {s['posttrain_steps']} post-training steps per arm, batch "
        f"{s['batch_size']}, lr {s['lr']} (cosine to {s['decay_lr']}, warmup {s['warmup_steps']}), LoRA rank "
        f"{s['lora_rank']}; model {meta['size']}.",
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()) + ".",
        "",
    ]
    text = "\n".join(lines)
    (out_dir / report_name).write_text(text)
    return text
