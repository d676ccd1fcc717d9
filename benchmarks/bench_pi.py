#!/usr/bin/env python
"""APT vs stock LeRobot pi0 / pi0.5: training step time, peak training memory, inference time.

Run from the repository root (CPU; nothing is downloaded)::

    HF_HUB_OFFLINE=1 python benchmarks/bench_pi.py                      # pi0 and pi0.5, mid-size
    HF_HUB_OFFLINE=1 python benchmarks/bench_pi.py --policies pi0 --steps 8
    HF_HUB_OFFLINE=1 python benchmarks/bench_pi.py --quick              # smoke test, tiny sizes
    HF_HUB_OFFLINE=1 python benchmarks/bench_pi.py --json-out bench.json
    HF_HUB_OFFLINE=1 python benchmarks/bench_pi.py --wait-idle 0        # do not wait for a quiet machine
    HF_HUB_OFFLINE=1 python benchmarks/bench_pi.py --device cuda --dtype bf16 --size real   # on a GPU

What it measures, per policy (pi0, pi0.5), on ONE batch shared by every configuration:

* training configurations: (a) stock LeRobot full fine-tuning, (b) stock LeRobot expert-only
  (``train_expert_only=True, freeze_vision_encoder=True``), (c) APT Stage 1, (d) APT Stage 2 with
  the VLM frozen, and (e) an ablation: APT Stage 2 with the language mask lifted, whose VLM pass
  covers the same (padded) prefix tokens as stock's. A step is ``policy.forward`` + ``backward`` +
  ``AdamW.step`` over ``policy.get_optim_params()`` (+ ``zero_grad``; no gradient clipping); the
  median over ``--steps`` steps after ``--warmup`` steps is reported. Each configuration is its own
  process, and the driver steps them round-robin (one at a time), so slow drifts of the machine
  hit all of them alike. The noise and time of step ``i`` are fixed by a seed that is the same for
  every configuration. Every worker records how much CPU *other* processes used during each timed
  step; ``--wait-idle`` (on by default, off in ``--quick``) waits for a quiet machine and repeats
  rounds that were disturbed.
* peak training memory: each training configuration runs in its own process. Baseline = RSS after
  the model is built (no optimizer yet, batch loaded); peak = the kernel's RSS high-water mark
  (``VmHWM``, reset through ``/proc/self/clear_refs`` right after the baseline) over optimizer
  creation and all steps; reported as ``peak - baseline`` (optimizer state + gradients +
  activations). ``VmHWM`` is the counter ``getrusage(RUSAGE_SELF).ru_maxrss`` reports; where
  ``clear_refs`` is unavailable, a psutil sampler is used instead.
* inference: ``predict_action_chunk`` of stock, APT Stage 1 and APT Stage 2 (same process, same
  weights seed, interleaved repetitions, median).

The models are the *real* LeRobot ``PI0Policy``/``PI05Policy`` (and the APT policies built on them),
shrunk at construction time like ``apt_plugins_lerobot_pi.testing.tiny_pi_patches`` does, but to a
mid-size where the VLM dominates the cost (see ``SIZES``).

Worker processes come from a ``forkserver`` that has LeRobot imported already (the import takes
seconds), so every configuration still gets a fresh process without paying the import again.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import gc
import json
import multiprocessing as mp
import os
import platform
import re
import shlex
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# --------------------------------------------------------------------------------------- sizes
# Real pi0: PaliGemma (SigLIP So400m 27 x 1152, Gemma-2B 18 x 2048, mlp 16384, 8 heads x 256,
# vocab 257152) + Gemma-300M expert (18 x 1024, mlp 4096), 224 px, 3 cameras, prompt 48 (pi0) or
# 200 (pi0.5), chunk 50. LeRobot hard-codes 8 query heads / 1 KV head; the VLM and the expert must
# share depth and head_dim (joint attention), widths may differ.
SIZES: dict[str, dict[str, Any]] = {
    "mid": dict(
        vlm_width=512, vlm_mlp=2048, expert_width=256, expert_mlp=1024, depth=6, head_dim=64,
        vision_width=384, vision_mlp=1536, vision_layers=4, vision_heads=6, vocab=16384,
        image_size=112, cameras=2, batch=4, chunk=50, state_dim=14, action_dim=14,
        max_state_dim=32, max_action_dim=32, num_inference_steps=10,
        prompt_len={"pi0": 48, "pi05": 128}, task_len={"pi0": 20, "pi05": 16},
    ),
    "quick": dict(
        vlm_width=64, vlm_mlp=128, expert_width=32, expert_mlp=64, depth=2, head_dim=8,
        vision_width=32, vision_mlp=64, vision_layers=1, vision_heads=2, vocab=1024,
        image_size=28, cameras=2, batch=2, chunk=4, state_dim=6, action_dim=6,
        max_state_dim=8, max_action_dim=8, num_inference_steps=2,
        prompt_len={"pi0": 12, "pi05": 24}, task_len={"pi0": 6, "pi05": 4},
    ),
    # The real pi0 / pi0.5 (LeRobot's own gemma_2b + gemma_300m + So400m configs, no shrinking): random
    # weights, nothing downloaded. For a GPU (--device cuda) or bench_memory.py; too slow for CPU timing.
    "real": dict(
        real=True, vlm_width=2048, vlm_mlp=16384, expert_width=1024, expert_mlp=4096, depth=18, head_dim=256,
        vision_width=1152, vision_mlp=4304, vision_layers=27, vision_heads=16, vocab=257152,
        image_size=224, cameras=3, batch=4, chunk=50, state_dim=14, action_dim=14,
        max_state_dim=32, max_action_dim=32, num_inference_steps=10,
        prompt_len={"pi0": 48, "pi05": 200}, task_len={"pi0": 20, "pi05": 16},
    ),
}
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}

TRAIN_CONFIGS = ("full_ft", "expert_only", "apt_stage1", "apt_stage2", "apt_stage2_unmasked")
LABELS = {
    "full_ft": "stock full FT",
    "expert_only": "stock expert-only",
    "apt_stage1": "APT Stage 1",
    "apt_stage2": "APT Stage 2 (frozen VLM)",
    "apt_stage2_unmasked": "ablation: APT S2, full prefix",
    "stock": "stock",
}
INFER_CONFIGS = ("stock", "apt_stage1", "apt_stage2")
POLICIES = ("pi0", "pi05")

TOKENS_KEY = "observation.language.tokens"
MASK_KEY = "observation.language.attention_mask"
TASK_MASK_KEY = "observation.language.task_mask"

# (name, numerator, denominator, kind, limit): kind "time" / "mem" / "infer"
TARGETS = [
    ("S1 time / full FT", "apt_stage1", "full_ft", "time", 0.5),
    ("S1 time / expert-only", "apt_stage1", "expert_only", "time", 1.0),
    ("S1 peak mem / full FT", "apt_stage1", "full_ft", "mem", 0.6),
    ("S1 peak mem / expert-only", "apt_stage1", "expert_only", "mem", None),
    ("S2 time / full FT", "apt_stage2", "full_ft", "time", 0.6),
    ("S2 time / expert-only", "apt_stage2", "expert_only", "time", None),
    ("S2 peak mem / full FT", "apt_stage2", "full_ft", "mem", None),
    ("S2 peak mem / expert-only", "apt_stage2", "expert_only", "mem", None),
    ("expert-only time / full FT", "expert_only", "full_ft", "time", None),
    ("ablation S2 full prefix time / expert-only", "apt_stage2_unmasked", "expert_only", "time", None),
    ("infer S1 / stock", "apt_stage1", "stock", "infer", 1.15),
    ("infer S2 / stock", "apt_stage2", "stock", "infer", 1.15),
]

PRELOAD = [
    "torch",
    "lerobot.policies.pi0.modeling_pi0",
    "lerobot.policies.pi05.modeling_pi05",
    "apt_plugins_lerobot_pi.modeling_apt_pi0",
    "apt_plugins_lerobot_pi.modeling_apt_pi05",
    # Imported lazily on first use otherwise; preloading pins every worker to the code as it was when
    # the benchmark started, even if the working tree changes while it runs.
    "apt_plugins_lerobot_pi.adapter",
    "apt_plugins_lerobot_pi.policy",
]


# --------------------------------------------------------------------------------------- models
def sized_pi_patches(s: dict[str, Any]):
    """Shrink LeRobot's pi0/pi0.5 classes at construction time to the sizes ``s``.

    The adapter's own ``tiny_pi_patches``, with distinct VLM (``gemma_2b``) and expert (``gemma_300m``)
    widths and a sized SigLIP tower. ``s["real"]``: no shrinking at all (LeRobot's own configs).
    """
    from apt_plugins_lerobot_pi.testing import tiny_pi_patches

    if s.get("real"):
        return contextlib.nullcontext()

    return tiny_pi_patches(width=s["vlm_width"], mlp_dim=s["vlm_mlp"], depth=s["depth"], head_dim=s["head_dim"],
                           vision_width=s["vision_width"], vision_layers=s["vision_layers"],
                           expert_width=s["expert_width"], expert_mlp=s["expert_mlp"], vision_mlp=s["vision_mlp"],
                           vision_heads=s["vision_heads"], vocab=s["vocab"])


def camera_keys(s: dict[str, Any]) -> list[str]:
    names = ["cam_high", "cam_wrist", "cam_left", "cam_right"]
    return [f"observation.images.{names[i]}" for i in range(s["cameras"])]


def build_policy(policy: str, config: str, s: dict[str, Any], seed: int = 0, apt_extra: dict[str, Any] | None = None):
    """A real (stock or APT) pi0 / pi0.5 policy of size ``s`` for configuration ``config``.

    ``apt_extra``: more :class:`AptConfig` fields for the APT configurations (``prefix_cache``, ...).
    """
    import torch
    from lerobot.configs.types import FeatureType, PolicyFeature

    from apt_plugins import AptConfig

    if policy == "pi05":
        from lerobot.policies.pi05.configuration_pi05 import PI05Config as StockConfig
        from lerobot.policies.pi05.modeling_pi05 import PI05Policy as StockPolicy

        from apt_plugins_lerobot_pi.configuration_apt_pi05 import APTPI05Config as AptCfg
        from apt_plugins_lerobot_pi.modeling_apt_pi05 import APTPI05Policy as AptPolicy
    else:
        from lerobot.policies.pi0.configuration_pi0 import PI0Config as StockConfig
        from lerobot.policies.pi0.modeling_pi0 import PI0Policy as StockPolicy

        from apt_plugins_lerobot_pi.configuration_apt_pi0 import APTPI0Config as AptCfg
        from apt_plugins_lerobot_pi.modeling_apt_pi0 import APTPI0Policy as AptPolicy

    px = s["image_size"]
    inputs = {k: PolicyFeature(type=FeatureType.VISUAL, shape=(3, px, px)) for k in camera_keys(s)}
    inputs["observation.state"] = PolicyFeature(type=FeatureType.STATE, shape=(s["state_dim"],))
    outputs = {"action": PolicyFeature(type=FeatureType.ACTION, shape=(s["action_dim"],))}
    fields: dict[str, Any] = dict(
        device=s.get("device", "cpu"), dtype=s.get("dtype", "float32"), chunk_size=s["chunk"], n_action_steps=s["chunk"],
        max_state_dim=s["max_state_dim"], max_action_dim=s["max_action_dim"],
        num_inference_steps=s["num_inference_steps"], image_resolution=(px, px),
        tokenizer_max_length=s["prompt_len"][policy], input_features=inputs, output_features=outputs,
    )
    if config == "expert_only":
        fields.update(train_expert_only=True, freeze_vision_encoder=True)
    if config in ("full_ft", "expert_only", "stock"):
        cfg, cls = StockConfig(**fields), StockPolicy
    elif config == "apt_stage1":
        cfg, cls = AptCfg(**fields, apt=AptConfig(stage=1, **(apt_extra or {})).to_settings()), AptPolicy
    elif config == "apt_stage2":
        apt = AptConfig(**{"stage": 2, "vlm_mode": "frozen", **(apt_extra or {})})
        cfg, cls = AptCfg(**fields, apt=apt.to_settings()), AptPolicy
    elif config == "apt_stage2_unmasked":
        # Ablation: the language mask lifted, so the VLM runs over the whole padded prefix in one pass
        # exactly like LeRobot's (same tokens as stock), still without autograd, plus the fusion layers.
        apt = AptConfig(stage=2, vlm_mode="frozen", inherited_layers_keep_language_mask=False, **(apt_extra or {}))
        cfg, cls = AptCfg(**fields, apt=apt.to_settings()), AptPolicy
    else:
        raise ValueError(config)
    torch.manual_seed(seed)
    with sized_pi_patches(s):
        pol = cls(cfg)
    return pol.train()


def make_batch(policy: str, s: dict[str, Any], seed: int = 0) -> dict[str, Any]:
    """One training batch as LeRobot's (APT) pre-processor produces it: prompt right-padded to
    ``tokenizer_max_length`` (LeRobot pads to the maximum length), with the APT task mask.

    pi0: ``[task (task_len tokens), padding]``; the whole prompt is the task (state is a token of its
    own). pi0.5: ``["Task", ":", task, ",", "State", ":", max_state_dim state bins, ";", "\\n",
    "Action", ":", padding]``; the task mask covers the ``Task: <task>,`` clause, as the apt_pi05
    processor marks it.
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    b, length, n_task, vocab = s["batch"], s["prompt_len"][policy], s["task_len"][policy], s["vocab"]
    if policy == "pi05":
        n_task_clause = 2 + n_task + 1
        n_valid = n_task_clause + 2 + s["max_state_dim"] + 4
    else:
        n_task_clause = n_valid = n_task
    if n_valid > length:
        raise ValueError(f"prompt of {n_valid} tokens does not fit prompt_len={length}")
    tokens = torch.randint(10, vocab, (b, length), generator=g)
    mask = torch.zeros(b, length, dtype=torch.bool)
    mask[:, :n_valid] = True
    tokens[~mask] = 0
    task_mask = torch.zeros(b, length, dtype=torch.bool)
    task_mask[:, :n_task_clause] = True
    px = s["image_size"]
    batch = {k: torch.rand(b, 3, px, px, generator=g) for k in camera_keys(s)}
    batch.update({
        "observation.state": torch.rand(b, s["state_dim"], generator=g) * 2 - 1,
        "action": torch.rand(b, s["chunk"], s["action_dim"], generator=g) * 2 - 1,
        TOKENS_KEY: tokens,
        MASK_KEY: mask,
        TASK_MASK_KEY: task_mask,
    })
    return batch


def batch_digest(batch: dict[str, Any]) -> str:
    import hashlib

    h = hashlib.sha256()
    for k in sorted(batch):
        h.update(k.encode())
        h.update(batch[k].contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------------------- memory
def _status_kib(field: str) -> int | None:
    try:
        m = re.search(rf"^{field}:\s+(\d+)\s+kB", Path("/proc/self/status").read_text(), re.M)
    except OSError:
        return None
    return int(m.group(1)) if m else None


def _rss_bytes() -> int:
    kib = _status_kib("VmRSS")
    if kib is not None:
        return kib * 1024
    import psutil

    return psutil.Process().memory_info().rss


class PeakRSS:
    """Peak RSS from ``start()`` on: the kernel high-water mark (reset via clear_refs) or sampling."""

    def __init__(self, interval_s: float = 0.005):
        self.interval_s = interval_s
        self.method = None
        self._peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        try:
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
            if _status_kib("VmHWM") is None:
                raise OSError("no VmHWM")
            self.method = "VmHWM (reset via /proc/self/clear_refs)"
            return
        except OSError:
            pass
        import psutil

        self.method = f"psutil RSS sampling every {self.interval_s * 1e3:.0f} ms"
        proc = psutil.Process()
        self._peak = proc.memory_info().rss

        def loop():
            while not self._stop.is_set():
                self._peak = max(self._peak, proc.memory_info().rss)
                time.sleep(self.interval_s)

        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()

    def stop(self) -> int:
        if self._thread is None:
            return (_status_kib("VmHWM") or 0) * 1024
        self._stop.set()
        self._thread.join()
        return max(self._peak, _rss_bytes())


class ForeignCPU:
    """How much of the machine other processes used while we measured (a shared box is noisy).

    ``share(wall)``: CPU seconds spent by *other* processes during the interval, divided by the
    CPU seconds the machine had (``wall x cores``). Near 0 on a quiet machine.
    """

    def __init__(self):
        self._busy0 = self._busy()
        self._own0 = time.process_time()

    @staticmethod
    def _busy() -> float | None:
        try:
            import psutil

            t = psutil.cpu_times()
            return sum(t) - t.idle - getattr(t, "iowait", 0.0) - getattr(t, "guest", 0.0) - getattr(t, "guest_nice", 0.0)
        except Exception:  # psutil missing or /proc/stat unreadable
            return None

    def share(self, wall: float) -> float | None:
        busy = self._busy()
        if busy is None or self._busy0 is None or wall <= 0:
            return None
        foreign = (busy - self._busy0) - (time.process_time() - self._own0)
        return max(0.0, foreign) / (wall * (os.cpu_count() or 1))


class Quiet:
    """Wait for, and judge, a quiet machine (``max_wait_s`` = 0 disables it)."""

    def __init__(self, max_wait_s: float = 0.0, threshold: float = 0.10, window_s: float = 0.5):
        self.max_wait_s, self.threshold, self.window_s = max_wait_s, threshold, window_s

    @property
    def enabled(self) -> bool:
        return self.max_wait_s > 0

    def wait(self) -> bool:
        """Block until other processes use less than ``threshold`` of the machine (or give up)."""
        if not self.enabled:
            return True
        deadline = time.monotonic() + self.max_wait_s
        while True:
            probe = ForeignCPU()
            time.sleep(self.window_s)
            share = probe.share(self.window_s)
            if share is None or share < self.threshold:
                return True
            if time.monotonic() > deadline:
                return False


# --------------------------------------------------------------------------------------- workers
def _setup_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(1)
    import logging

    logging.getLogger("apt_plugins").setLevel(logging.WARNING)


def _load_batch(path: str):
    import torch

    return torch.load(path, weights_only=True)


def on_device(batch: dict[str, Any], device: str) -> dict[str, Any]:
    """``batch`` with every tensor on ``device`` (lerobot-train moves batches the same way)."""
    return {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}


def sync(device: str) -> None:
    """Wait for queued GPU work, so a timer brackets the work itself (no-op on CPU)."""
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


class CudaPeak:
    """Peak GPU memory from ``start()`` on (``torch.cuda.max_memory_allocated``), as ``PeakRSS`` does on CPU."""

    method = "torch.cuda.max_memory_allocated (reset at the baseline)"

    def start(self) -> None:
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()

    def stop(self) -> int:
        import torch

        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()


def memory_baseline(device: str) -> int:
    """Bytes in use before the optimizer exists: process RSS on CPU, allocated GPU memory on CUDA."""
    if device == "cuda":
        import torch

        torch.cuda.synchronize()
        return torch.cuda.memory_allocated()
    return _rss_bytes()


def check_device(device: str, dtype: str) -> str | None:
    """Why ``--device``/``--dtype`` cannot run here (None when they can)."""
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            return ("--device cuda needs a CUDA GPU, but torch.cuda.is_available() is False on this machine "
                    f"(torch {torch.__version__}, CUDA build {torch.version.cuda}); run on a GPU machine or use "
                    "--device cpu")
    if dtype not in DTYPES:
        return f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}"
    return None


def pi_probes(pol: Any) -> tuple[list, list[bool], list[int]]:
    """Forward hooks on the VLM's language model: (hooks, MLP-output requires_grad flags, LM token counts)."""
    return lm_probes(pol.model.paligemma_with_expert.paligemma.model.language_model.layers)


def lm_probes(vlm_layers: Any) -> tuple[list, list[bool], list[int]]:
    """Hooks on a decoder-layer list: does a mid-layer MLP output join autograd, how many tokens enter layer 0."""
    vlm_grad_flags: list[bool] = []
    hooks = [vlm_layers[len(vlm_layers) // 2].mlp.register_forward_hook(
        lambda _m, _i, out: vlm_grad_flags.append(bool(out.requires_grad)))]
    vlm_tokens: list[int] = []
    hooks.append(vlm_layers[0].self_attn.k_proj.register_forward_hook(
        lambda _m, inp, _o: vlm_tokens.append(int(inp[0].shape[-2]))))
    return hooks, vlm_grad_flags, vlm_tokens


def train_worker(conn, policy: str, config: str, s: dict[str, Any], batch_path: str, threads: int,
                 build: Any = None, probes: Any = None) -> None:
    """One training configuration in its own process, stepping when the driver says so.

    Protocol over ``conn``: sends ``("ready", info)`` once the model is built and the memory
    baseline taken; then answers every ``("step", i)`` with ``(seconds, loss)``; on ``("finish",)``
    sends the peak-memory summary and exits. The driver interleaves the configurations step by
    step, so slow drifts of the (shared) machine hit all of them alike. ``build(policy, config, s)``
    and ``probes(pol)`` default to the pi ones (:func:`build_policy`, :func:`pi_probes`).
    """
    try:
        import torch

        _setup_worker(threads)
        batch = _load_batch(batch_path)
        device = s.get("device", "cpu")
        digest = batch_digest(batch)
        batch = on_device(batch, device)
        t_build = time.perf_counter()
        pol = (build or build_policy)(policy, config, s)
        build_s = time.perf_counter() - t_build

        # Evidence for the expert-only discussion: do the VLM's activations join the autograd graph?
        # And how many prefix tokens the VLM's language model processes per sample (all passes).
        hooks, vlm_grad_flags, vlm_tokens = (probes or pi_probes)(pol)

        params = list(pol.parameters())
        info = dict(
            policy=policy, config=config, build_s=build_s, params_total=sum(p.numel() for p in params),
            params_trainable=sum(p.numel() for p in params if p.requires_grad),
            threads=torch.get_num_threads(), batch_digest=digest, device=device,
        )
        groups = pol.get_optim_params()
        cfg = pol.config
        del params
        gc.collect()
        baseline = memory_baseline(device)
        peak = CudaPeak() if device == "cuda" else PeakRSS()
        peak.start()
        opt = torch.optim.AdamW(groups, lr=cfg.optimizer_lr, betas=cfg.optimizer_betas, eps=cfg.optimizer_eps,
                                weight_decay=cfg.optimizer_weight_decay)
        conn.send(("ready", info))
        while True:
            msg = conn.recv()
            if msg[0] == "step":
                torch.manual_seed(10_000 + msg[1])  # the same noise/time for every configuration
                probe = ForeignCPU()
                sync(device)
                t0 = time.perf_counter()
                loss, _ = pol.forward(batch)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                sync(device)
                dt = time.perf_counter() - t0
                for hook in hooks:
                    hook.remove()
                conn.send((dt, float(loss.detach()), probe.share(dt)))
            else:
                peak_bytes = peak.stop()
                n_opt = sum(p.numel() for g in opt.param_groups for p in g["params"] if opt.state.get(p))
                conn.send(dict(
                    baseline_rss_mib=baseline / 2**20, peak_rss_mib=peak_bytes / 2**20,
                    peak_growth_mib=(peak_bytes - baseline) / 2**20, memory_method=peak.method,
                    params_with_adam_state=n_opt,
                    vlm_activations_require_grad=vlm_grad_flags[0] if vlm_grad_flags else None,
                    vlm_tokens_per_sample=sum(vlm_tokens),
                ))
                return
    except BaseException as exc:  # report instead of leaving the driver waiting
        import traceback

        conn.send(("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
        raise


def run_training(ctx, policy: str, s: dict[str, Any], batch_path: str, steps: int, warmup: int,
                 threads: int, quiet: Quiet, configs: tuple[str, ...] = TRAIN_CONFIGS,
                 worker_kwargs: dict[str, Any] | None = None) -> dict[str, dict]:
    """All training configurations of ``policy``: one process each, stepped round-robin.

    With ``quiet`` enabled, every timed round waits for the machine to be quiet first, and a round
    during which other processes took more than ``quiet.threshold`` of the machine in any of its
    steps is discarded and repeated (at most ``3 x steps`` timed rounds in all).
    """
    procs, conns, results = {}, {}, {}
    rejected = 0
    try:
        for config in configs:  # build one at a time (the builds are not timed, but keep them quiet)
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=train_worker, args=(child, policy, config, s, batch_path, threads),
                               kwargs=worker_kwargs or {}, name=f"bench-{policy}-{config}")
            proc.start()
            child.close()
            procs[config], conns[config] = proc, parent
            tag, info = _recv(parent, proc)
            results[config] = dict(info, step_s_all=[], foreign_cpu_share_all=[], losses=[])
        order = list(configs)
        i = kept = 0
        while kept < steps and i < warmup + 3 * steps:
            timed = i >= warmup
            if timed:
                quiet.wait()
            round_ = {}
            for config in order:
                conns[config].send(("step", i))
                dt, loss, foreign = _recv(conns[config], procs[config])
                results[config]["losses"].append(loss)
                round_[config] = (dt, foreign)
            order = order[1:] + order[:1]  # rotate who goes first
            i += 1
            if not timed:
                continue
            if quiet.enabled and any(f is not None and f > quiet.threshold for _, f in round_.values()) \
                    and i < warmup + 3 * steps:
                rejected += 1
                continue
            kept += 1
            for config, (dt, foreign) in round_.items():
                results[config]["step_s_all"].append(dt)
                results[config]["foreign_cpu_share_all"].append(foreign)
        for config in configs:
            conns[config].send(("finish",))
            results[config].update(_recv(conns[config], procs[config]))
            procs[config].join(timeout=60)
    finally:
        for proc in procs.values():
            if proc.is_alive():
                proc.kill()
                proc.join()
    for r in results.values():
        r["step_s"] = statistics.median(r["step_s_all"])
        r["step_s_min"] = min(r["step_s_all"])
        r["foreign_cpu_share"] = _median(r["foreign_cpu_share_all"])
        r["rounds_rejected_busy"] = rejected
    return results


def _median(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _recv(conn, proc):
    while not conn.poll(1.0):
        if not proc.is_alive():
            raise RuntimeError(f"{proc.name} died (exit code {proc.exitcode})")
    msg = conn.recv()
    if isinstance(msg, tuple) and msg and msg[0] == "error":
        raise RuntimeError(f"{proc.name} failed: {msg[1]}")
    return msg


def infer_worker(policy: str, s: dict[str, Any], batch_path: str, reps: int, threads: int,
                 quiet: Quiet, build: Any = None, configs: tuple[str, ...] = INFER_CONFIGS,
                 drop: tuple[str, ...] = ("action",)) -> dict[str, Any]:
    """``predict_action_chunk`` of stock vs APT Stage 1 / Stage 2, interleaved, same process.

    With ``quiet`` enabled, a repetition during which other processes were busy is repeated (at
    most ``3 x reps`` timed repetitions), as in :func:`run_training`. ``drop``: batch keys that are
    not observations.
    """
    import torch

    _setup_worker(threads)
    batch = _load_batch(batch_path)
    device = s.get("device", "cpu")
    obs = on_device({k: v for k, v in batch.items() if k not in drop}, device)
    pols = {name: (build or build_policy)(policy, name, s).eval() for name in configs}
    times: dict[str, list[float]] = {name: [] for name in configs}
    foreign: dict[str, list[float | None]] = {name: [] for name in configs}
    shapes = {}
    r = kept = rejected = 0
    while kept < reps and r < 1 + 3 * reps:  # repetition 0 is the warm-up
        if r > 0:
            quiet.wait()
        rep = {}
        for name, pol in pols.items():
            torch.manual_seed(20_000 + r)
            pol.reset()
            probe = ForeignCPU()
            sync(device)
            t0 = time.perf_counter()
            out = pol.predict_action_chunk(obs)
            sync(device)
            dt = time.perf_counter() - t0
            shapes[name] = list(out.shape)
            rep[name] = (dt, probe.share(dt))
        pols = dict(list(pols.items())[1:] + list(pols.items())[:1])  # rotate who goes first
        r += 1
        if r == 1:
            continue
        if quiet.enabled and any(f is not None and f > quiet.threshold for _, f in rep.values()) \
                and r < 1 + 3 * reps:
            rejected += 1
            continue
        kept += 1
        for name, (dt, f) in rep.items():
            times[name].append(dt)
            foreign[name].append(f)
    return dict(
        policy=policy, infer_s={n: statistics.median(t) for n, t in times.items()}, infer_s_all=times,
        foreign_cpu_share_all=foreign, reps_rejected_busy=rejected,
        action_shape=shapes, threads=torch.get_num_threads(), batch_digest=batch_digest(batch),
    )


# --------------------------------------------------------------------------------------- driver
def _run_isolated(ctx, fn, *args):
    with ProcessPoolExecutor(max_workers=1, mp_context=ctx, max_tasks_per_child=1) as ex:
        return ex.submit(fn, *args).result()


def ratios(train: dict[str, dict], infer: dict[str, Any], targets: list[tuple] = TARGETS) -> list[dict[str, Any]]:
    rows = []
    for name, num, den, kind, limit in targets:
        if kind == "infer":
            a, b = infer["infer_s"].get(num), infer["infer_s"].get(den)
        else:
            key = "step_s" if kind == "time" else "peak_growth_mib"
            a, b = train.get(num, {}).get(key), train.get(den, {}).get(key)
        value = a / b if a is not None and b else None
        status = "-" if limit is None or value is None else ("PASS" if value <= limit else "FAIL")
        rows.append(dict(name=name, kind=kind, value=value, target=limit, status=status))
    return rows


def fmt_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    line = lambda r: "| " + " | ".join(str(x).ljust(w) for x, w in zip(r, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(headers), sep, *(line(r) for r in rows)])


def machine_info() -> dict[str, Any]:
    import torch

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        m = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        cpu = m.group(1).strip() if m else cpu
    mem = None
    with contextlib.suppress(OSError, AttributeError):
        kib = re.search(r"^MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text(), re.M).group(1)
        mem = f"{int(kib) / 2**20:.1f} GiB"
    try:
        from importlib.metadata import version

        lerobot_v, tf_v = version("lerobot"), version("transformers")
    except Exception:  # pragma: no cover
        lerobot_v = tf_v = "?"
    return dict(cpu=cpu, logical_cpus=os.cpu_count(), memory=mem, os=platform.platform(),
                python=platform.python_version(), torch=torch.__version__, lerobot=lerobot_v,
                transformers=tf_v)


def code_version() -> dict[str, Any]:
    """The git commit under test, and which package files differ from it (uncommitted edits)."""
    import subprocess

    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=30,
                                  check=True).stdout.rstrip("\n")
        except (OSError, subprocess.SubprocessError):
            return None

    dirty = git("status", "--porcelain", "--", "apt_plugins", "adapters")
    return dict(commit=git("rev-parse", "HEAD"),
                dirty_package_files=[line[3:] for line in dirty.splitlines()] if dirty else [])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policies", nargs="+", choices=POLICIES, default=list(POLICIES))
    ap.add_argument("--steps", type=int, default=None, help="timed training steps (default 8; quick: 2)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed warm-up steps (default 2; quick: 1)")
    ap.add_argument("--infer-reps", type=int, default=None, help="timed inference calls (default 7; quick: 2)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads in every worker (default: all CPUs; quick: 1, which keeps the "
                         "smoke test fast even when other processes compete for the CPUs)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, 2 steps: checks that the script works")
    ap.add_argument("--json-out", type=Path, default=None, help="also write the results as JSON here")
    ap.add_argument("--wait-idle", type=float, default=None, metavar="SECONDS",
                    help="shared machine: before every timed round wait up to SECONDS for other processes to "
                         "use < 10%% of the CPUs, and repeat rounds during which they did not "
                         "(default 60; quick: 0 = off). Costs ~0.5 s per round on a quiet machine.")
    ap.add_argument("--fail-on-miss", action="store_true", help="exit 1 when a target is missed")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="cuda: time with torch.cuda.synchronize, memory from torch.cuda.max_memory_allocated")
    ap.add_argument("--dtype", default="fp32", help="model weights: fp32 (default) or bf16 (LeRobot's dtype=bfloat16)")
    ap.add_argument("--size", choices=("mid", "real"), default="mid",
                    help="mid (default), or real: LeRobot's real pi0/pi0.5 sizes (random weights; for GPUs)")
    ap.add_argument("--batch", type=int, default=None, help="batch size (default: the size's own)")
    args = ap.parse_args(argv)
    problem = check_device(args.device, args.dtype)
    if problem:
        ap.error(problem)
    size_name = "quick" if args.quick else args.size
    s = dict(SIZES[size_name], device=args.device, dtype=DTYPES[args.dtype])
    if args.batch is not None:
        if args.batch < 1:
            ap.error("--batch must be >= 1")
        s["batch"] = args.batch
    steps = args.steps if args.steps is not None else (2 if args.quick else 8)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    reps = args.infer_reps if args.infer_reps is not None else (2 if args.quick else 7)
    if args.threads is None:
        args.threads = 1 if args.quick else (os.cpu_count() or 1)
    if args.wait_idle is None:
        args.wait_idle = 0.0 if args.quick else 60.0
    if steps < 1 or warmup < 0 or reps < 1 or args.threads < 1 or args.wait_idle < 0:
        ap.error("--steps, --infer-reps and --threads must be >= 1, --warmup and --wait-idle >= 0")

    import torch

    torch.set_num_threads(args.threads)
    quiet = Quiet(args.wait_idle)
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    t_start = time.perf_counter()
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__), *sys.argv[1:]]) \
        if argv is None else "python benchmarks/bench_pi.py " + " ".join(shlex.quote(a) for a in argv)
    report: dict[str, Any] = dict(
        date=_dt.datetime.now().astimezone().isoformat(timespec="seconds"), command=command,
        machine=machine_info(), code=code_version(), threads=args.threads, size_name=size_name, sizes=s, steps=steps,
        device=args.device, dtype=DTYPES[args.dtype],
        warmup=warmup, infer_reps=reps, wait_idle_s=args.wait_idle, loadavg_start=list(os.getloadavg()), policies={},
    )
    print(f"bench_pi: sizes={size_name} steps={steps} warmup={warmup} infer_reps={reps} threads={args.threads} "
          f"wait_idle={args.wait_idle:g}s device={args.device} dtype={DTYPES[args.dtype]}", flush=True)
    any_fail = False
    with tempfile.TemporaryDirectory(prefix="bench_pi_") as tmp:
        for policy in args.policies:
            batch = make_batch(policy, s)
            batch_path = str(Path(tmp) / f"batch_{policy}.pt")
            torch.save(batch, batch_path)
            digest = batch_digest(batch)
            train = run_training(ctx, policy, s, batch_path, steps, warmup, args.threads, quiet)
            for config, r in train.items():
                assert r["batch_digest"] == digest, "every configuration must see the same batch"
                print(f"  {policy:5s} {LABELS[config]:30s} step {r['step_s']:.3f} s  "
                      f"peak +{r['peak_growth_mib']:.0f} MiB  trainable {r['params_trainable'] / 1e6:.1f}M  "
                      f"loss[0] {r['losses'][0]:.4f}", flush=True)
            infer = _run_isolated(ctx, infer_worker, policy, s, batch_path, reps, args.threads, quiet)
            assert infer["batch_digest"] == digest
            print("  " + "  ".join(f"{policy} infer {LABELS[n]} {t:.3f} s" for n, t in infer["infer_s"].items()),
                  flush=True)
            rows = ratios(train, infer)
            any_fail |= any(r["status"] == "FAIL" for r in rows)
            report["policies"][policy] = dict(batch_digest=digest, train=train, infer=infer, ratios=rows)
    report["wall_s"] = time.perf_counter() - t_start
    shares = [v for p in report["policies"].values() for v in _all_foreign(p)]
    report["foreign_cpu_share"] = dict(median=_median(shares), max=max(shares) if shares else None)
    report["loadavg_end"] = list(os.getloadavg())

    print()
    print(render_markdown(report))
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(report, indent=2))
        print(f"\nwrote {args.json_out}")
    return 1 if any_fail and args.fail_on_miss else 0


def _all_foreign(p: dict[str, Any]) -> list[float]:
    vals = [v for r in p["train"].values() for v in r["foreign_cpu_share_all"]]
    vals += [v for vs in p["infer"]["foreign_cpu_share_all"].values() for v in vs]
    return [v for v in vals if v is not None]


def render_markdown(report: dict[str, Any]) -> str:
    """The absolute and ratio tables (markdown), as pasted into docs/benchmarks.md."""
    out = []
    abs_rows = []
    for policy, p in report["policies"].items():
        for config in TRAIN_CONFIGS:
            r = p["train"][config]
            infer = p["infer"]["infer_s"].get("stock" if config in ("full_ft", "expert_only") else config)
            if config == "expert_only":
                infer = None  # the same stock model as full FT
            abs_rows.append([
                policy, LABELS[config], f"{r['step_s']:.3f}", f"{r['peak_growth_mib']:.0f}",
                f"{r['params_trainable'] / 1e6:.2f}M / {r['params_total'] / 1e6:.2f}M",
                str(r["vlm_tokens_per_sample"]),
                "yes" if r["vlm_activations_require_grad"] else "no",
                f"{infer:.3f}" if infer is not None else "-",
            ])
    out.append(fmt_table(
        ["policy", "configuration", "step time (s, median)", "peak mem growth (MiB)", "trainable / total params",
         "VLM LM tokens / sample", "VLM activations in autograd graph", "predict_action_chunk (s, median)"],
        abs_rows))
    out.append("")
    ratio_rows = []
    for policy, p in report["policies"].items():
        for r in p["ratios"]:
            ratio_rows.append([
                policy, r["name"], "-" if r["value"] is None else f"{r['value']:.3f}",
                "-" if r["target"] is None else f"<= {r['target']:.2f}", r["status"],
            ])
    out.append(fmt_table(["policy", "ratio", "measured", "target", "status"], ratio_rows))
    if report.get("device", "cpu") != "cpu":
        out.append("")
        out.append(throughput_table(report))
    fc = report.get("foreign_cpu_share") or {}
    if fc.get("median") is not None:
        out.append("")
        rejected = sum(next(iter(p["train"].values()))["rounds_rejected_busy"] + p["infer"]["reps_rejected_busy"]
                       for p in report["policies"].values())
        out.append(f"CPU used by other processes during the kept timed work: median {fc['median']:.1%}, "
                   f"max {fc['max']:.1%} of the machine; {rejected} busy rounds/repetitions discarded "
                   f"(--wait-idle {report.get('wait_idle_s', 0):g}).")
        if fc["max"] > 0.10:
            out.append("WARNING: the machine was busy with other processes during some timed steps; "
                       "medians are robust to a few such steps, but re-run on a quiet machine to be sure.")
    return "\n".join(out)


def suffix_tokens(policy: str, s: dict[str, Any]) -> int:
    """Expert tokens per sample: the action chunk, plus pi0's state token."""
    return s["chunk"] + (1 if policy == "pi0" else 0)


def throughput_table(report: dict[str, Any]) -> str:
    """Absolute step time, peak memory and training tokens/s (GPU runs).

    tokens/s = batch x (VLM LM tokens per sample + expert tokens per sample) / step time: the tokens
    one training step processes, counted the same way for stock and APT.
    """
    s, rows = report["sizes"], []
    for policy, p in report["policies"].items():
        for config, r in p["train"].items():
            tokens = s["batch"] * (r["vlm_tokens_per_sample"] + suffix_tokens(policy, s))
            rows.append([policy, LABELS[config], f"{r['step_s'] * 1e3:.1f}", f"{r['peak_rss_mib'] / 1024:.2f}",
                         f"{r['peak_growth_mib'] / 1024:.2f}", f"{tokens / r['step_s']:.0f}"])
    return fmt_table(["policy", "configuration", "step (ms, median)", "peak memory (GiB)", "growth over weights (GiB)",
                      "tokens/s"], rows)


if __name__ == "__main__":
    sys.exit(main())
