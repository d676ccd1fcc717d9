"""``apt-plugins demo`` (the README's first command): the whole APT story, offline, on CPU.

1. Write a small synthetic language-conditioned LeRobotDataset (three tasks over shared scenes),
   a tiny tokenizer in a scratch hub cache, and a throw-away plugin that shrinks pi0 to test size.
2. Train Stage 1 with ``lerobot-train --policy.type=apt_pi0 --policy.apt.stage=1`` (frozen-weight
   proof on), then Stage 2 from its checkpoint with ``--policy.pretrained_path`` (automatic,
   strict promotion).
3. Run ``apt-plugins verify`` on both checkpoints, and print the report: trainable/frozen table,
   frozen fingerprints, Stage-1 language invariance, Stage-2 step-0 equality, gates, loss curves;
   plus ``report.png`` with the loss and gate curves.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["run_demo"]

TINY_ARGS = [
    "--policy.device=cpu", "--policy.push_to_hub=false", "--policy.chunk_size=4", "--policy.n_action_steps=4",
    "--policy.max_state_dim=8", "--policy.max_action_dim=8", "--policy.image_resolution=[28,28]",
]
STEP_RE = re.compile(r"step:(\d+)\S* .*?loss:([0-9.]+)")
GATE_RE = re.compile(r"apt/gate_mean/(\d+):([0-9.]+)")


def _say(msg: str = "") -> None:
    print(msg, flush=True)


def _bin(name: str) -> str:
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def _run(cmd: list[str], env: dict[str, str], log: Path, show: re.Pattern | None = None) -> str:
    """Run ``cmd``, stream the interesting lines, keep the whole output in ``log``."""
    lines = []
    with subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if show is not None and show.search(line):
                text = line.rstrip()
                if "step:" in text:  # drop the progress bar and logger prefix sharing the line
                    text = text[text.index("step:"):]
                _say("    " + text[-160:])
        code = proc.wait()
    log.write_text("".join(lines))
    if code != 0:
        tail = "".join(lines[-25:])
        raise RuntimeError(f"command failed ({code}): {' '.join(cmd)}\n--- last lines (full log: {log}) ---\n{tail}")
    return "".join(lines)


def _curve(text: str) -> list[tuple[int, float]]:
    return [(int(m.group(1)), float(m.group(2))) for m in STEP_RE.finditer(text)]


def _gates(text: str) -> dict[int, list[tuple[int, float]]]:
    out: dict[int, list[tuple[int, float]]] = {}
    for line in text.splitlines():
        step = STEP_RE.search(line)
        if not step:
            continue
        for m in GATE_RE.finditer(line):
            out.setdefault(int(m.group(1)), []).append((int(step.group(1)), float(m.group(2))))
    return out


def _plot(path: Path, curves: dict[str, list[tuple[int, float]]], gates: dict[int, list[tuple[int, float]]]) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    offset = 0
    for label, curve in curves.items():
        if curve:
            axes[0].plot([s + offset for s, _ in curve], [v for _, v in curve], label=label)
            offset += curve[-1][0]
    axes[0].set(title="training loss (lerobot-train)", xlabel="step (stage 2 continues stage 1)", ylabel="loss")
    axes[0].legend()
    for layer, values in sorted(gates.items()):
        axes[1].plot([s for s, _ in values], [v for _, v in values], label=f"fusion layer {layer}")
    axes[1].set(title="Stage-2 gates: mean sigmoid(gate)", xlabel="stage-2 step", ylabel="gate")
    if gates:
        axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def run_demo(workdir: str | Path = "runs/demo", steps: int = 300, policy: str = "apt_pi0", fresh: bool = True) -> int:
    """Run the demo in ``workdir``; return 0 when every verified claim holds."""
    from apt_plugins_lerobot_pi.testing import write_tiny_plugin, write_tokenizer_fixture

    from .data import TASKS, make_synthetic_dataset

    start = time.time()
    ws = Path(workdir).resolve()
    if fresh and ws.exists():
        shutil.rmtree(ws)
    ws.mkdir(parents=True, exist_ok=True)
    _say(f"== APT demo in {ws} ({policy}, {steps} steps per stage, CPU, offline)")
    _say("-- 1/5 synthetic dataset: " + ", ".join(repr(t) for t in TASKS) + " over shared scenes")
    if not (ws / "data" / "meta" / "info.json").exists():
        make_synthetic_dataset(ws / "data", episodes_per_task=6, frames_per_episode=24)
    write_tokenizer_fixture(ws / "hub")
    plugin = write_tiny_plugin(ws / "plugins")
    env = {
        **os.environ,
        "HF_HUB_CACHE": str(ws / "hub"),
        "HF_HUB_OFFLINE": "1",
        "HF_LEROBOT_HOME": str(ws / "home"),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ws / "plugins"), os.environ.get("PYTHONPATH")])),
        "WANDB_MODE": "disabled",
        "TOKENIZERS_PARALLELISM": "false",
    }
    common = [
        f"--policy.type={policy}", f"--env.discover_packages_path={plugin}", *TINY_ARGS,
        f"--policy.tokenizer_max_length={32 if policy == 'apt_pi05' else 16}",
        "--policy.optimizer_lr=2e-3", "--policy.scheduler_decay_lr=2e-4", "--policy.scheduler_warmup_steps=10",
        "--dataset.repo_id=local/apt_demo", f"--dataset.root={ws / 'data'}", "--batch_size=8", f"--steps={steps}",
        "--num_workers=0", f"--save_freq={steps}", f"--log_freq={max(1, steps // 10)}", "--wandb.enable=false",
    ]
    show = re.compile(r"step:\d|APT|promotion|carried over|new \(fresh\)|^(group|vision|projector|language|action|fusion|unused|total)")
    stage1 = ws / "stage1"
    stage2 = ws / "stage2"
    texts = {}
    for label, out, extra in (
        ("stage 1", stage1, ["--policy.apt.stage=1", "--policy.apt.check_frozen=true"]),
        ("stage 2", stage2, ["--policy.apt.stage=2", "--policy.apt.check_frozen=true",
                             f"--policy.pretrained_path={stage1 / 'checkpoints/last/pretrained_model'}"]),
    ):
        if out.exists():
            shutil.rmtree(out)
        _say(f"-- {2 if label == 'stage 1' else 3}/5 lerobot-train {label}")
        texts[label] = _run([_bin("lerobot-train"), *common, *extra, f"--output_dir={out}"], env,
                            ws / f"{label.replace(' ', '')}.log", show)

    _say("-- 4/5 apt-plugins verify (the same checks users run on their own checkpoints)")
    ckpt1 = stage1 / "checkpoints/last/pretrained_model"
    ckpt2 = stage2 / "checkpoints/last/pretrained_model"
    data_args = ["--dataset-repo-id=local/apt_demo", f"--dataset-root={ws / 'data'}", f"--import={plugin}"]
    verified = {}
    ok = True
    for label, args in (("stage 1", [str(ckpt1)]), ("stage 2", [str(ckpt2), f"--parent={ckpt1}"])):
        cmd = [_bin("apt-plugins"), "verify", *args, *data_args]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        table = proc.stdout[proc.stdout.find("check "):] if "check " in proc.stdout else proc.stdout + proc.stderr
        verified[label] = table.strip()
        ok &= proc.returncode == 0
        _say(f"   {label}:")
        _say("\n".join("     " + line for line in verified[label].splitlines()))

    _say("-- 5/5 report")
    curves = {label: _curve(text) for label, text in texts.items()}
    gates = _gates(texts["stage 2"])
    frozen_lines = [line.strip() for text in texts.values() for line in text.splitlines() if "unchanged at this checkpoint" in line]
    table = [line for line in texts["stage 2"].splitlines() if re.match(r"^(group|vision|projector|language|action|fusion|unused|total)", line)]
    report = ["# APT demo report", "", f"policy {policy}, {steps} lerobot-train steps per stage, {time.time() - start:.0f} s", "",
              "## Stage-2 parameters (trainable / frozen)", "", "```", *table, "```", "",
              "## Frozen-weight proof (apt.check_frozen)", "", *[f"- {line.split('APT check_frozen: ')[-1]}" for line in frozen_lines], "",
              "## apt-plugins verify", ""]
    for label, text in verified.items():
        report += [f"### {label}", "", "```", text, "```", ""]
    report += ["## Loss (first -> last logged)", ""]
    for label, curve in curves.items():
        if curve:
            report.append(f"- {label}: {curve[0][1]:.3f} (step {curve[0][0]}) -> {curve[-1][1]:.3f} (step {curve[-1][0]})")
    report += ["", "## Gates after Stage 2 (mean sigmoid per fusion layer)", ""]
    report += [f"- layer {layer}: {values[0][1]:.4f} -> {values[-1][1]:.4f}" for layer, values in sorted(gates.items())]
    if _plot(ws / "report.png", curves, gates):
        report += ["", "![loss and gates](report.png)"]
    (ws / "report.md").write_text("\n".join(report) + "\n")
    _say("\n".join(report[6:]))
    _say(f"\n== {'all verified claims hold' if ok else 'SOME CLAIMS FAILED'}; report: {ws / 'report.md'}, plot: {ws / 'report.png'}"
         f" ({time.time() - start:.0f} s)")
    return 0 if ok else 1
