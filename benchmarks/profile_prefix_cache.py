#!/usr/bin/env python
"""Where an APT Stage-1 step spends its time, with and without ``apt.prefix_cache`` (CPU timers).

Run from the repository root (nothing is downloaded)::

    HF_HUB_OFFLINE=1 python benchmarks/profile_prefix_cache.py                        # pi0, mid, 1 thread
    HF_HUB_OFFLINE=1 python benchmarks/profile_prefix_cache.py --policy pi05 --threads 2

The same synthetic frames and step as ``bench_prefix_cache.py`` (``forward`` + ``backward`` +
``AdamW.step`` + ``zero_grad``). One epoch fills the cache, then ``--epochs`` more epochs are timed,
every step all hits; the uncached configuration runs the same steps. Each phase is timed by
wrapping the method that does it (on this instance only; the code under test is not changed), in
wall and CPU seconds of this process; "other" is the rest of the step (loss, LeRobot's wrapper,
tensor glue). With ``--threads 1`` CPU seconds are the work done whatever else runs on the machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_pi as common  # noqa: E402
import bench_prefix_cache as bench  # noqa: E402


class Timers:
    """Nested-safe phase timers: a phase's time excludes the phases timed inside it."""

    def __init__(self):
        self.wall: dict[str, float] = defaultdict(float)
        self.cpu: dict[str, float] = defaultdict(float)
        self._stack: list[list[float]] = []

    @contextlib.contextmanager
    def phase(self, name: str):
        inner = [0.0, 0.0]
        self._stack.append(inner)
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            self._stack.pop()
            self.wall[name] += dt - inner[0]
            self.cpu[name] += dc - inner[1]
            if self._stack:
                self._stack[-1][0] += dt
                self._stack[-1][1] += dc

    def wrap(self, obj: Any, attr: str, name: str) -> None:
        fn = getattr(obj, attr)

        def timed(*args, **kwargs):
            with self.phase(name):
                return fn(*args, **kwargs)

        setattr(obj, attr, timed)


def instrument(pol: Any, timers: Timers) -> None:
    """Time the phases of a step by wrapping methods of this policy instance (and its cache)."""
    import torch

    from apt_plugins_lerobot_pi import modeling

    model = pol.model
    timers.wrap(pol, "_preprocess_images", "image preprocessing")
    timers.wrap(model, "_apt_compute_prefix", "VLM prefix (vision + LM)")
    timers.wrap(model, "_apt_velocity", "expert forward")
    if hasattr(model, "_apt_prefix_keys"):
        timers.wrap(model, "_apt_prefix_keys", "cache: content keys")
    cache = modeling.prefix_cache_of(model)
    if cache is not None:
        timers.wrap(cache, "namespace", "cache: weights namespace")
        timers.wrap(cache, "check_frames", "cache: frame check")
        timers.wrap(cache, "get", "cache: lookup")
    original = modeling._assemble_prefix

    def assemble(*args, **kwargs):
        with timers.phase("cache: batch assembly (bf16->fp32)"):
            return original(*args, **kwargs)

    modeling._assemble_prefix = assemble
    del torch


def run(policy: str, config: str, s: dict[str, Any], frames: dict[str, Any], epochs: int) -> dict[str, Any]:
    import torch

    extra = {"uncached": {}, "cached_memory": dict(prefix_cache="memory:4GB")}[config]
    pol = common.build_policy(policy, "apt_stage1", s, apt_extra=extra)
    cfg = pol.config
    opt = torch.optim.AdamW(pol.get_optim_params(), lr=cfg.optimizer_lr, betas=cfg.optimizer_betas,
                            eps=cfg.optimizer_eps, weight_decay=cfg.optimizer_weight_decay)
    n = frames["index"].shape[0]
    steps = n // s["batch"]
    timers = None
    per_step_wall, per_step_cpu = [], []
    for epoch in range(epochs + 1):
        if epoch == 1:  # the cache exists now: instrument, and time only epochs 2+
            timers = Timers()
            instrument(pol, timers)
        for i in range(steps):
            pick = bench.epoch_order(n, epoch)[i * s["batch"]:(i + 1) * s["batch"]]
            batch = {k: v[pick] for k, v in frames.items()}
            torch.manual_seed(10_000 + epoch * 1000 + i)
            t0, c0 = time.perf_counter(), time.process_time()
            if timers is None:
                loss, _ = pol.forward(batch)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                continue
            with timers.phase("other (loss, wrappers, glue)"):
                loss, _ = pol.forward(batch)
                with timers.phase("backward"):
                    loss.backward()
                with timers.phase("AdamW step"):
                    opt.step()
                with timers.phase("zero_grad"):
                    opt.zero_grad(set_to_none=True)
            per_step_wall.append(time.perf_counter() - t0)
            per_step_cpu.append(time.process_time() - c0)
    timed = epochs * steps
    from apt_plugins_lerobot_pi.modeling import prefix_cache_of

    cache = prefix_cache_of(pol.model)
    return dict(
        config=config, steps=timed, step_wall_median=statistics.median(per_step_wall),
        step_cpu_median=statistics.median(per_step_cpu),
        phases={k: dict(wall_ms=1e3 * timers.wall[k] / timed, cpu_ms=1e3 * timers.cpu[k] / timed) for k in timers.wall},
        cache=cache.stats() if cache else None,
        expert_params=sum(p.numel() for p in pol.parameters() if p.requires_grad),
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--policy", choices=common.POLICIES, default="pi0")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=2, help="timed epochs after the filling one")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json-out", type=Path, default=None)
    args = ap.parse_args(argv)
    import torch

    common._setup_worker(args.threads)
    s = dict(common.SIZES["quick" if args.quick else "mid"], device="cpu", dtype="float32")
    frames = bench.make_frames(args.policy, s, args.frames)
    results = [run(args.policy, c, s, frames, args.epochs) for c in ("uncached", "cached_memory")]
    names = sorted({k for r in results for k in r["phases"]}, key=lambda k: -results[0]["phases"].get(k, {}).get("cpu_ms", 0))
    print(f"{args.policy}, {'quick' if args.quick else 'mid'}, batch {s['batch']}, {args.threads} thread(s), "
          f"torch {torch.__version__}, load {open('/proc/loadavg').read().split()[:3]}")
    print(f"| phase | {' | '.join(r['config'] + ' CPU ms' for r in results)} | "
          f"{' | '.join(r['config'] + ' wall ms' for r in results)} |")
    print("|---|" + "---|" * 2 * len(results))
    for k in names:
        cpu = [f"{r['phases'].get(k, {}).get('cpu_ms', 0):.1f}" for r in results]
        wall = [f"{r['phases'].get(k, {}).get('wall_ms', 0):.1f}" for r in results]
        print(f"| {k} | {' | '.join(cpu)} | {' | '.join(wall)} |")
    print(f"| **step (median)** | {' | '.join(f'{1e3 * r['step_cpu_median']:.1f}' for r in results)} | "
          f"{' | '.join(f'{1e3 * r['step_wall_median']:.1f}' for r in results)} |")
    if args.json_out:
        args.json_out.write_text(json.dumps(dict(policy=args.policy, threads=args.threads, results=results), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
