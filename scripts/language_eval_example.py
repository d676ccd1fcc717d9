"""Reproduce the README's ``eval-language`` example and its plot (CPU, offline, a few minutes).

Trains three tiny pi0 policies with ``lerobot-train`` on the synthetic language-conditioned
dataset (stock ``pi0``; ``apt_pi0`` Stage 1; ``apt_pi0`` Stage 2 promoted from that Stage 1), then
runs ``apt-plugins eval-language --compare`` on them and copies the comparison plot to
``docs/images/language_eval_compare.png``. Tiny models (the demo's sizes): the numbers show the
mechanics of the evaluator, not the paper's result.

Usage: ``.venv/bin/python scripts/language_eval_example.py [--workdir runs/language_eval] [--steps 300]``
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _bin(name: str) -> str:
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="runs/language_eval")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--frames", type=int, default=24)
    args = parser.parse_args()

    from apt_plugins.lerobot.data import make_synthetic_dataset
    from apt_plugins_lerobot_pi.testing import write_tiny_plugin, write_tokenizer_fixture

    ws = Path(args.workdir).resolve()
    ws.mkdir(parents=True, exist_ok=True)
    if not (ws / "data" / "meta" / "info.json").exists():
        make_synthetic_dataset(ws / "data", episodes_per_task=6, frames_per_episode=24)
    write_tokenizer_fixture(ws / "hub")
    plugin = write_tiny_plugin(ws / "plugins")
    env = {**os.environ, "HF_HUB_CACHE": str(ws / "hub"), "HF_HUB_OFFLINE": "1", "HF_LEROBOT_HOME": str(ws / "home"),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ws / "plugins"), os.environ.get("PYTHONPATH")])),
           "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}
    common = [
        f"--env.discover_packages_path={plugin}", "--policy.device=cpu", "--policy.push_to_hub=false",
        "--policy.chunk_size=4", "--policy.n_action_steps=4", "--policy.max_state_dim=8", "--policy.max_action_dim=8",
        "--policy.image_resolution=[28,28]", "--policy.tokenizer_max_length=16", "--policy.optimizer_lr=2e-3",
        "--policy.scheduler_decay_lr=2e-4", "--policy.scheduler_warmup_steps=10", "--dataset.repo_id=local/apt_demo",
        f"--dataset.root={ws / 'data'}", "--batch_size=8", f"--steps={args.steps}", "--num_workers=0",
        f"--save_freq={args.steps}", f"--log_freq={max(1, args.steps // 10)}", "--wandb.enable=false",
    ]
    ckpt = {name: ws / name / "checkpoints" / "last" / "pretrained_model" for name in ("pi0", "apt_stage1", "apt_stage2")}
    runs = [
        ("pi0", ["--policy.type=pi0"]),
        ("apt_stage1", ["--policy.type=apt_pi0", "--policy.apt.stage=1"]),
        ("apt_stage2", ["--policy.type=apt_pi0", "--policy.apt.stage=2",
                        f"--policy.pretrained_path={ckpt['apt_stage1']}"]),
    ]
    for name, extra in runs:
        if (ckpt[name] / "model.safetensors").exists():
            continue
        shutil.rmtree(ws / name, ignore_errors=True)
        print(f"-- lerobot-train {name}", flush=True)
        with open(ws / f"{name}.log", "w") as log:
            subprocess.run([_bin("lerobot-train"), *common, *extra, f"--output_dir={ws / name}"], env=env,
                           stdout=log, stderr=subprocess.STDOUT, check=True)
    command = [_bin("apt-plugins"), "eval-language", f"--policy.path={ckpt['pi0']}", "--compare",
               str(ckpt["apt_stage1"]), str(ckpt["apt_stage2"]), "--dataset.repo_id=local/apt_demo",
               f"--dataset.root={ws / 'data'}", f"--frames={args.frames}", f"--output_dir={ws / 'eval'}",
               f"--import={plugin}"]
    print("-- " + " ".join(command), flush=True)
    subprocess.run(command, env=env, check=True)
    images = ROOT / "docs" / "images"
    images.mkdir(parents=True, exist_ok=True)
    shutil.copy(ws / "eval" / "compare_divergence.png", images / "language_eval_compare.png")
    print(f"copied the plot to {images / 'language_eval_compare.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
