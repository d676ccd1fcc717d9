#!/usr/bin/env python
"""APT vs stock openpi PyTorch (``PI0Pytorch``, pi0 and pi0.5): training step time, peak memory, inference.

Run from the repository root in the openpi environment (CPU; nothing is downloaded)::

    HF_HUB_OFFLINE=1 .venv-openpi/bin/python benchmarks/bench_openpi.py               # pi0 and pi0.5, mid-size
    HF_HUB_OFFLINE=1 .venv-openpi/bin/python benchmarks/bench_openpi.py --policies pi0 --steps 4
    HF_HUB_OFFLINE=1 .venv-openpi/bin/python benchmarks/bench_openpi.py --quick       # smoke test, tiny sizes

Configurations, per policy, all on ONE batch (openpi's ``Observation``; 3 cameras at 224 px):

* stock full FT: openpi's trainer as it is (``AdamW(model.parameters())``, gradient checkpointing
  on, as ``train_pytorch.py`` enables it);
* stock expert-only: the nearest stock equivalent of a frozen VLM. openpi's PyTorch trainer has no
  freeze support (``freeze_filter`` is JAX-only), so this is ``paligemma.requires_grad_(False)``
  with the same ``AdamW(model.parameters())``, which skips parameters without gradients;
* APT Stage 1, APT Stage 2 (frozen VLM) and the ablation APT Stage 2 with the language mask lifted,
  all prepared with :func:`apt_plugins.prepare_stage`, optimised over :func:`apt_plugins.param_groups`
  (what ``apt-plugins openpi-train`` does).

A step is ``model(observation, actions).mean()`` + ``backward`` + ``AdamW.step`` + ``zero_grad``,
noise and flow time fixed by a per-step seed shared by every configuration; each configuration runs
in its own process (one after the other) and the median over ``--steps`` steps after ``--warmup`` is
reported (``--quick`` runs them in this process instead: a smoke test whose figures mean nothing).
Peak memory is the kernel's RSS high-water mark over optimizer creation and all steps,
minus the RSS after the model and batch exist (``bench_pi.PeakRSS``). Inference is
``sample_actions`` (10 denoising steps) of stock, APT Stage 1 and Stage 2 in one process,
interleaved, median. Ratios and targets are the LeRobot pi benchmark's (``bench_pi.TARGETS``).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_pi import TARGETS, PeakRSS, _rss_bytes, fmt_table, ratios  # noqa: E402

# openpi: 8 query heads / 1 KV head hard-coded, VLM and expert share depth and head_dim; images are
# always resized to 224 px, so the token count is set by SigLIP's patch size.
SIZES: dict[str, dict[str, Any]] = {
    "mid": dict(vlm_width=512, vlm_mlp=2048, expert_width=256, expert_mlp=1024, depth=6, head_dim=64,
                vision_width=384, vision_mlp=1536, vision_layers=4, vision_heads=6, patch_size=32, vocab=16384,
                batch=4, action_horizon=50, action_dim=32, max_token_len={"pi0": 48, "pi05": 128}, num_steps=10),
    "quick": dict(vlm_width=64, vlm_mlp=128, expert_width=32, expert_mlp=64, depth=2, head_dim=8,
                  vision_width=32, vision_mlp=64, vision_layers=1, vision_heads=2, patch_size=56, vocab=2048,
                  batch=2, action_horizon=4, action_dim=8, max_token_len={"pi0": 16, "pi05": 16}, num_steps=2),
}
TRAIN_CONFIGS = ("full_ft", "expert_only", "apt_stage1", "apt_stage2", "apt_stage2_unmasked")
INFER_CONFIGS = ("stock", "apt_stage1", "apt_stage2")
APT = {"apt_stage1": dict(stage=1), "apt_stage2": dict(stage=2),
       "apt_stage2_unmasked": dict(stage=2, inherited_layers_keep_language_mask=False)}
LABELS = {"full_ft": "stock full FT", "expert_only": "stock expert-only (nearest)", "apt_stage1": "APT Stage 1",
          "apt_stage2": "APT Stage 2 (frozen VLM)", "apt_stage2_unmasked": "ablation: APT S2, full prefix",
          "stock": "stock"}


def build(policy: str, config: str, s: dict[str, Any], seed: int = 0) -> Any:
    """A real openpi ``PI0Pytorch`` of size ``s``, stock or prepared for ``config``."""
    import torch
    from openpi.models_pytorch.pi0_pytorch import PI0Pytorch

    from apt_plugins import AptConfig, prepare_stage
    from apt_plugins_openpi_pi.modeling import set_state_marker
    from apt_plugins_openpi_pi.testing import STATE_MARKER, tiny_model_config, tiny_openpi_patches

    cfg = tiny_model_config(policy == "pi05", action_dim=s["action_dim"], action_horizon=s["action_horizon"],
                            max_token_len=s["max_token_len"][policy])
    torch.manual_seed(seed)
    with tiny_openpi_patches(width=s["vlm_width"], mlp_dim=s["vlm_mlp"], depth=s["depth"], head_dim=s["head_dim"],
                             expert_width=s["expert_width"], expert_mlp=s["expert_mlp"],
                             vision_width=s["vision_width"], vision_mlp=s["vision_mlp"],
                             vision_layers=s["vision_layers"], vision_heads=s["vision_heads"],
                             patch_size=s["patch_size"], vocab=s["vocab"]):
        model = PI0Pytorch(cfg)
    set_state_marker(model, STATE_MARKER)
    model.gradient_checkpointing_enable()  # as openpi's train_pytorch.py does
    if config == "expert_only":
        model.paligemma_with_expert.paligemma.requires_grad_(False)
    elif config in APT:
        prepare_stage(model, AptConfig(**APT[config]), adapter="openpi_pi05" if policy == "pi05" else "openpi_pi0")
    return model


def make_batch(policy: str, s: dict[str, Any]) -> dict[str, Any]:
    from apt_plugins_openpi_pi.testing import make_batch as tiny_batch, tiny_model_config

    cfg = tiny_model_config(policy == "pi05", action_dim=s["action_dim"], action_horizon=s["action_horizon"],
                            max_token_len=s["max_token_len"][policy])
    return tiny_batch(cfg, batch_size=s["batch"])


def optimizer(model: Any, config: str) -> Any:
    import torch

    from apt_plugins import param_groups

    # openpi's AdamW settings (betas 0.9/0.95, eps 1e-8, weight decay 1e-10), lr at its peak.
    kwargs = dict(lr=2.5e-5, betas=(0.9, 0.95), eps=1e-8, weight_decay=1e-10)
    params = param_groups(model, 2.5e-5, 1e-10) if config in APT else model.parameters()
    return torch.optim.AdamW(params, **kwargs)


def train_worker(policy: str, config: str, s: dict[str, Any], steps: int, warmup: int, threads: int, out: str) -> None:
    import torch

    from apt_plugins_openpi_pi.testing import observation

    torch.set_num_threads(threads)
    model = build(policy, config, s).train()
    batch = make_batch(policy, s)
    obs = observation(batch)
    baseline = _rss_bytes()
    peak = PeakRSS()
    peak.start()
    opt = optimizer(model, config)
    times = []
    for i in range(warmup + steps):
        torch.manual_seed(10_000 + i)
        start = time.perf_counter()
        loss = model(obs, batch["actions"]).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - start)
        if i == 0:
            first = float(loss)
    growth = (peak.stop() - baseline) / 2**20
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    Path(out).write_text(json.dumps(dict(step_s=statistics.median(times), steps=times, peak_growth_mib=growth,
                                         memory_method=peak.method, first_loss=first, trainable=trainable,
                                         total=sum(p.numel() for p in model.parameters()))))


def infer_worker(policy: str, s: dict[str, Any], reps: int, threads: int, out: str) -> None:
    import torch

    from apt_plugins_openpi_pi.testing import observation

    torch.set_num_threads(threads)
    models = {c: build(policy, "full_ft" if c == "stock" else c, s).eval() for c in INFER_CONFIGS}
    obs = observation(make_batch(policy, s))
    times: dict[str, list[float]] = {c: [] for c in INFER_CONFIGS}
    for rep in range(reps + 1):
        for c, m in models.items():
            torch.manual_seed(rep)
            start = time.perf_counter()
            m.sample_actions(torch.device("cpu"), obs, num_steps=s["num_steps"])
            if rep:
                times[c].append(time.perf_counter() - start)
    Path(out).write_text(json.dumps(dict(infer_s={c: statistics.median(t) for c, t in times.items()})))


def _isolated(fn, *args, in_process: bool = False) -> dict[str, Any]:
    """``fn(*args, out)`` in a fresh process (memory figures of its own); in this one for ``--quick``."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    if in_process:  # --quick: the smoke test skips the per-process import of openpi (seconds each)
        fn(*args, out)
    else:
        proc = mp.get_context("spawn").Process(target=fn, args=(*args, out))
        proc.start()
        proc.join()
        if proc.exitcode != 0:
            raise RuntimeError(f"{fn.__name__}{args[:2]} failed with exit code {proc.exitcode}")
    data = json.loads(Path(out).read_text())
    os.unlink(out)
    return data


def render(report: dict[str, Any]) -> str:
    rows, ratio_rows = [], []
    for policy, p in report["policies"].items():
        for c, r in p["train"].items():
            rows.append([policy, LABELS[c], f"{r['step_s']:.3f}", f"{r['peak_growth_mib']:.0f}",
                         f"{r['trainable']:,} / {r['total']:,}", f"{r['first_loss']:.6f}"])
        for c, t in p["infer"]["infer_s"].items():
            rows.append([policy, f"inference: {LABELS[c]}", f"{t:.3f}", "-", "-", "-"])
        for r in p["ratios"]:
            ratio_rows.append([policy, r["name"], "-" if r["value"] is None else f"{r['value']:.2f}",
                               "-" if r["target"] is None else f"<= {r['target']:.2f}", r["status"]])
    return "\n\n".join([
        fmt_table(["policy", "configuration", "step / sample time (s, median)", "peak mem growth (MiB)",
                   "trainable / total params", "first loss"], rows),
        fmt_table(["policy", "ratio", "measured", "target", "status"], ratio_rows)])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--policies", nargs="+", default=["pi0", "pi05"], choices=["pi0", "pi05"])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5, help="timed inference repetitions")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="tiny sizes, 2 steps, 1 thread: checks the script only")
    ap.add_argument("--json-out")
    ap.add_argument("--fail-on-miss", action="store_true", help="exit 1 when a target is missed")
    args = ap.parse_args(argv)
    size = "quick" if args.quick else "mid"
    s = SIZES[size]
    steps, warmup, reps, threads = (2, 1, 1, 1) if args.quick else (args.steps, args.warmup, args.reps, args.threads)
    report: dict[str, Any] = dict(size_name=size, size=s, steps=steps, warmup=warmup, threads=threads,
                                  utc=_dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M"),
                                  load_avg=os.getloadavg(), policies={})
    for policy in args.policies:
        train = {c: _isolated(train_worker, policy, c, s, steps, warmup, threads, in_process=args.quick)
                 for c in TRAIN_CONFIGS}
        infer = _isolated(infer_worker, policy, s, reps, threads, in_process=args.quick)
        report["policies"][policy] = dict(train=train, infer=infer, ratios=ratios(train, infer, TARGETS))
    report["load_avg_end"] = os.getloadavg()
    print(render(report))
    print(f"\nload average at start / end: {report['load_avg']} / {report['load_avg_end']}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=2, default=str))
    missed = [r for p in report["policies"].values() for r in p["ratios"] if r["status"] == "FAIL"]
    return 1 if args.fail_on_miss and missed else 0


if __name__ == "__main__":
    sys.exit(main())
