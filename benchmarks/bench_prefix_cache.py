#!/usr/bin/env python
"""APT Stage 1 with and without ``apt.prefix_cache``: step time per epoch, cache size per frame.

Run from the repository root (nothing is downloaded)::

    HF_HUB_OFFLINE=1 python benchmarks/bench_prefix_cache.py                   # pi0 and pi0.5, mid-size, CPU
    HF_HUB_OFFLINE=1 python benchmarks/bench_prefix_cache.py --quick           # smoke test, tiny sizes
    HF_HUB_OFFLINE=1 python benchmarks/bench_prefix_cache.py --device cuda --dtype bf16 --size real   # on a GPU

A small synthetic dataset of ``--frames`` frames (the batches ``bench_pi.make_batch`` builds, each
frame with its LeRobot ``index``) is trained for ``--epochs`` epochs, in a new random order every
epoch (the same order for every configuration), as a shuffling DataLoader would. Configurations,
each in its own process, stepped round-robin like ``bench_pi.py``:

* ``uncached``: APT Stage 1 (the VLM prefix runs every step, without autograd);
* ``cached (memory)``: ``prefix_cache='memory:<budget>'``, bfloat16 entries;
* ``cached (disk)``: ``prefix_cache=<temporary directory>``, bfloat16 entries, one file per frame.

A step is ``forward`` + ``backward`` + ``AdamW.step`` + ``zero_grad`` (noise and time of step ``i``
seeded identically everywhere). Reported per epoch: median step time; from epoch 2 on, the speedup
uncached / cached (target >= 3x at mid size); the first epoch's cost of filling the cache; the cache's
bytes per frame (memory, and on disk); and the largest relative loss difference to ``uncached``
(bfloat16 storage; with ``prefix_cache_dtype='model'`` it is 0 by construction, see
tests/test_prefix_cache.py).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import multiprocessing as mp
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_pi as common  # noqa: E402  (sizes, policies, batches, device helpers, guards, tables)

CONFIGS = ("uncached", "cached_memory", "cached_disk")
LABELS = {"uncached": "APT Stage 1, uncached", "cached_memory": "APT Stage 1, cached (memory)",
          "cached_disk": "APT Stage 1, cached (disk)"}
TARGET_SPEEDUP = 3.0


def make_frames(policy: str, s: dict[str, Any], n_frames: int) -> dict[str, Any]:
    """``n_frames`` distinct frames (stacked), each with its dataset ``index``."""
    import torch

    per = s["batch"]
    chunks = [common.make_batch(policy, s, seed=100 + i) for i in range(-(-n_frames // per))]
    frames = {k: torch.cat([c[k] for c in chunks])[:n_frames] for k in chunks[0]}
    frames["index"] = torch.arange(n_frames)
    return frames


def epoch_order(n_frames: int, epoch: int):
    import torch

    return torch.randperm(n_frames, generator=torch.Generator().manual_seed(5000 + epoch))


def cache_worker(conn, policy: str, config: str, s: dict[str, Any], frames_path: str, threads: int,
                 cache_dir: str, budget: str) -> None:
    """One configuration: answers ``("step", epoch, i)`` with ``(seconds, loss, foreign CPU, hits)``."""
    try:
        import torch

        common._setup_worker(threads)
        device = s.get("device", "cpu")
        frames = common._load_batch(frames_path)
        extra = {"uncached": {}, "cached_memory": dict(prefix_cache=budget),
                 "cached_disk": dict(prefix_cache=cache_dir)}[config]
        pol = common.build_policy(policy, "apt_stage1", s, apt_extra=extra)
        cfg = pol.config
        opt = torch.optim.AdamW(pol.get_optim_params(), lr=cfg.optimizer_lr, betas=cfg.optimizer_betas,
                                eps=cfg.optimizer_eps, weight_decay=cfg.optimizer_weight_decay)
        hooks, _, vlm_tokens = common.pi_probes(pol)
        n = frames["index"].shape[0]
        conn.send(("ready", dict(config=config, frames=n)))
        baseline = common.memory_baseline(device)
        while True:
            msg = conn.recv()
            if msg[0] != "step":
                break
            _, epoch, i = msg
            pick = epoch_order(n, epoch)[i * s["batch"]:(i + 1) * s["batch"]]
            batch = common.on_device({k: v[pick] for k, v in frames.items()}, device)
            torch.manual_seed(10_000 + epoch * 1000 + i)
            probe = common.ForeignCPU()
            common.sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            loss, _ = pol.forward(batch)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            common.sync(device)
            dt, cpu = time.perf_counter() - t0, time.process_time() - c0
            for hook in hooks:
                hook.remove()
            hooks = []
            from apt_plugins_lerobot_pi.modeling import prefix_cache_of

            cache = prefix_cache_of(pol.model)
            conn.send((dt, cpu, float(loss.detach()), probe.share(dt), cache.hits if cache else 0))
        from apt_plugins_lerobot_pi.modeling import prefix_cache_of

        cache = prefix_cache_of(pol.model)
        stats = cache.stats() if cache else {}
        disk = sum(p.stat().st_size for p in Path(cache_dir).rglob("*.pt")) if config == "cached_disk" else None
        conn.send(dict(cache=stats, disk_bytes=disk, vlm_tokens_first_step=vlm_tokens[0] if vlm_tokens else None,
                       memory_now_mib=(common.memory_baseline(device) - baseline) / 2**20))
    except BaseException as exc:
        import traceback

        conn.send(("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
        raise


def run_policy(ctx, policy: str, s: dict[str, Any], frames_path: str, n_frames: int, epochs: int, threads: int,
               quiet: common.Quiet, tmp: str, budget: str) -> dict[str, Any]:
    procs, conns = {}, {}
    steps = n_frames // s["batch"]
    results: dict[str, dict[str, Any]] = {c: dict(step_s=[[] for _ in range(epochs)],
                                               cpu_s=[[] for _ in range(epochs)], losses=[], foreign=[])
                                          for c in CONFIGS}
    try:
        for config in CONFIGS:
            parent, child = ctx.Pipe()
            cache_dir = str(Path(tmp) / f"cache_{policy}")
            proc = ctx.Process(target=cache_worker, args=(child, policy, config, s, frames_path, threads, cache_dir,
                                                          budget), name=f"cache-{policy}-{config}")
            proc.start()
            child.close()
            procs[config], conns[config] = proc, parent
            common._recv(parent, proc)
        order = list(CONFIGS)
        for epoch in range(epochs):
            for i in range(steps):
                quiet.wait()
                for config in order:
                    conns[config].send(("step", epoch, i))
                    dt, cpu, loss, foreign, hits = common._recv(conns[config], procs[config])
                    results[config]["step_s"][epoch].append(dt)
                    results[config]["cpu_s"][epoch].append(cpu)
                    results[config]["losses"].append(loss)
                    results[config]["foreign"].append(foreign)
                    results[config]["hits"] = hits
                order = order[1:] + order[:1]
            print(f"  {policy}: epoch {epoch + 1}/{epochs} done", flush=True)
        for config in CONFIGS:
            conns[config].send(("finish",))
            results[config].update(common._recv(conns[config], procs[config]))
            procs[config].join(timeout=60)
    finally:
        for proc in procs.values():
            if proc.is_alive():
                proc.kill()
                proc.join()
    base = results["uncached"]
    for config, r in results.items():
        r["epoch_median_s"] = [statistics.median(e) for e in r["step_s"]]
        later = [t for e in r["step_s"][1:] for t in e]
        r["later_median_s"] = statistics.median(later) if later else None
        later_cpu = [t for e in r["cpu_s"][1:] for t in e]
        r["later_median_cpu_s"] = statistics.median(later_cpu) if later_cpu else None
        r["max_rel_loss_diff"] = max(abs(a - b) / abs(b) for a, b in zip(r["losses"], base["losses"], strict=True))
    summary = dict(
        speedup_later={c: base["later_median_s"] / results[c]["later_median_s"]
                       for c in CONFIGS if c != "uncached" and results[c]["later_median_s"]},
        fill_cost_first_epoch={c: results[c]["epoch_median_s"][0] / base["epoch_median_s"][0]
                               for c in CONFIGS if c != "uncached"},
        # CPU seconds of the worker per step: the work done, much less sensitive than wall time to other
        # processes competing for the CPUs (with --threads 1 it is the step's single-core time).
        cpu_speedup_later={c: base["later_median_cpu_s"] / results[c]["later_median_cpu_s"]
                           for c in CONFIGS if c != "uncached" and results[c]["later_median_cpu_s"]},
    )
    return dict(results=results, summary=summary, steps_per_epoch=steps)


def render_markdown(report: dict[str, Any]) -> str:
    out = []
    epochs = report["epochs"]
    rows = []
    for policy, p in report["policies"].items():
        for config in CONFIGS:
            r = p["results"][config]
            c = r.get("cache") or {}
            per_frame = c.get("bytes_per_frame")
            disk = r.get("disk_bytes")
            rows.append([
                policy, LABELS[config], *(f"{t:.3f}" for t in r["epoch_median_s"]),
                f"{p['summary']['speedup_later'][config]:.2f}x" if config in p["summary"]["speedup_later"] else "-",
                f"{r['later_median_cpu_s']:.3f}",
                f"{p['summary']['cpu_speedup_later'][config]:.2f}x" if config in p["summary"]["cpu_speedup_later"]
                else "-",
                f"{per_frame / 1024:.1f}" if per_frame else "-",
                f"{disk / 1024 / report['frames']:.1f}" if disk else "-",
                f"{r['max_rel_loss_diff']:.1e}" if config != "uncached" else "-",
            ])
    out.append(common.fmt_table(
        ["policy", "configuration", *(f"epoch {e + 1} step (s)" for e in range(epochs)),
         "speedup, epochs 2+", "CPU s / step, epochs 2+", "CPU-time speedup", "cache KiB / frame",
         "disk KiB / frame", "max rel. loss diff"], rows))
    out.append("")
    targets = []
    for policy, p in report["policies"].items():
        for config, value in p["summary"]["speedup_later"].items():
            targets.append([policy, f"uncached / {LABELS[config].split(', ')[1]} step, epochs 2+", f"{value:.2f}",
                            f">= {TARGET_SPEEDUP:.1f}", "PASS" if value >= TARGET_SPEEDUP else "FAIL"])
        for config, value in p["summary"]["cpu_speedup_later"].items():
            targets.append([policy, f"uncached / {LABELS[config].split(', ')[1]} CPU time per step, epochs 2+",
                            f"{value:.2f}", f">= {TARGET_SPEEDUP:.1f}", "PASS" if value >= TARGET_SPEEDUP else "FAIL"])
        for config, value in p["summary"]["fill_cost_first_epoch"].items():
            targets.append([policy, f"{LABELS[config].split(', ')[1]} / uncached step, epoch 1 (fill)",
                            f"{value:.2f}", "-", "-"])
    out.append(common.fmt_table(["policy", "ratio", "measured", "target", "status"], targets))
    shares = [f for p in report["policies"].values() for r in p["results"].values() for f in r["foreign"]
              if f is not None]
    if shares:
        out.append("")
        out.append(f"CPU used by other processes during the timed steps: median {statistics.median(shares):.1%}, "
                   f"max {max(shares):.1%} of the machine (--wait-idle {report['wait_idle_s']:g}).")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policies", nargs="+", choices=common.POLICIES, default=list(common.POLICIES))
    ap.add_argument("--epochs", type=int, default=None, help="epochs (default 3; quick: 2)")
    ap.add_argument("--frames", type=int, default=None, help="frames in the dataset (default 32; quick: 4)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per worker (default: all; quick: 1)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: checks that the script works")
    ap.add_argument("--size", choices=("mid", "real"), default="mid", help="mid (default) or real (for GPUs)")
    ap.add_argument("--batch", type=int, default=None, help="batch size (default: the size's own)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--dtype", default="fp32", help="fp32 (default) or bf16")
    ap.add_argument("--memory-budget", default="memory:4GB", help="prefix_cache of the memory configuration")
    ap.add_argument("--wait-idle", type=float, default=None, metavar="SECONDS",
                    help="wait up to SECONDS for a quiet machine before every round (default 60; quick: 0)")
    ap.add_argument("--json-out", type=Path, default=None)
    ap.add_argument("--fail-on-miss", action="store_true", help="exit 1 when the speedup target is missed")
    args = ap.parse_args(argv)
    problem = common.check_device(args.device, args.dtype)
    if problem:
        ap.error(problem)
    size_name = "quick" if args.quick else args.size
    s = dict(common.SIZES[size_name], device=args.device, dtype=common.DTYPES[args.dtype])
    if args.batch is not None:
        s["batch"] = args.batch
    epochs = args.epochs if args.epochs is not None else (2 if args.quick else 3)
    frames = args.frames if args.frames is not None else (4 if args.quick else 32)
    threads = args.threads if args.threads is not None else (1 if args.quick else (os.cpu_count() or 1))
    wait = args.wait_idle if args.wait_idle is not None else (0.0 if args.quick else 60.0)
    if epochs < 2 or frames < s["batch"] or threads < 1 or s["batch"] < 1 or wait < 0:
        ap.error("need --epochs >= 2, --frames >= batch size, --threads >= 1, --batch >= 1, --wait-idle >= 0")
    try:
        from apt_plugins import AptConfig

        AptConfig(prefix_cache=args.memory_budget)
    except Exception as exc:  # noqa: BLE001  (an AptConfigError: report it as a usage error)
        ap.error(f"--memory-budget: {exc}")

    import torch

    torch.set_num_threads(threads)
    quiet = common.Quiet(wait)
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(common.PRELOAD)
    command = "python benchmarks/bench_prefix_cache.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    report: dict[str, Any] = dict(
        date=_dt.datetime.now().astimezone().isoformat(timespec="seconds"), command=command,
        machine=common.machine_info(), code=common.code_version(), threads=threads, size_name=size_name, sizes=s,
        epochs=epochs, frames=frames, wait_idle_s=wait, device=args.device, dtype=s["dtype"],
        memory_budget=args.memory_budget, policies={},
    )
    print(f"bench_prefix_cache: sizes={size_name} frames={frames} batch={s['batch']} epochs={epochs} "
          f"threads={threads} device={args.device} dtype={s['dtype']}", flush=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_prefix_cache_") as tmp:
        for policy in args.policies:
            path = str(Path(tmp) / f"frames_{policy}.pt")
            torch.save(make_frames(policy, s, frames), path)
            report["policies"][policy] = run_policy(ctx, policy, s, path, frames, epochs, threads, quiet, tmp,
                                                    args.memory_budget)
            p = report["policies"][policy]
            print(f"  {policy}: " + "  ".join(f"{c} {p['results'][c]['epoch_median_s']}" for c in CONFIGS), flush=True)
    report["wall_s"] = time.perf_counter() - t0
    print()
    print(render_markdown(report))
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(report, indent=2))
        print(f"\nwrote {args.json_out}")
    missed = any(v < TARGET_SPEEDUP for p in report["policies"].values() for v in p["summary"]["speedup_later"].values())
    return 1 if missed and args.fail_on_miss else 0


if __name__ == "__main__":
    sys.exit(main())
