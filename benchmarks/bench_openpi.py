#!/usr/bin/env python
"""APT vs stock openpi PyTorch (``PI0Pytorch``, pi0 and pi0.5): training step time, peak memory, inference.

Run from the repository root in the openpi environment (CPU; nothing is downloaded)::

    HF_HUB_OFFLINE=1 .venv-openpi/bin/python benchmarks/bench_openpi.py               # pi0 and pi0.5, mid-size
    HF_HUB_OFFLINE=1 .venv-openpi/bin/python benchmarks/bench_openpi.py --policies pi0 --steps 4
    HF_HUB_OFFLINE=1 .venv-openpi/bin/python benchmarks/bench_openpi.py --wait-idle 0  # do not wait for a quiet machine
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

The method is ``bench_pi.py``'s, through its own machinery (imported, not copied): a step is
``model(observation, actions).mean()`` + ``backward`` + ``AdamW.step`` + ``zero_grad``, noise,
flow time and openpi's image augmentation fixed by a per-step seed shared by every configuration;
each configuration is its own process (forked from a server that has openpi imported), and the
driver steps them round-robin in a rotating order, so slow drifts of a shared machine hit all of
them alike; ``--wait-idle`` (on by default, off in ``--quick``) waits for a quiet machine before
every timed round and discards rounds during which other processes used more than 10% of the
CPUs. The median over ``--steps`` kept steps after ``--warmup`` is reported. Peak memory is the
kernel's RSS high-water mark over optimizer creation and all steps, minus the RSS after the model
and batch exist (``bench_pi.PeakRSS``). Inference is ``sample_actions`` (10 denoising steps) of
stock, APT Stage 1 and Stage 2 in one process, interleaved in rotating order, median. Ratios and
targets are the LeRobot pi benchmark's (``bench_pi.TARGETS``).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import multiprocessing as mp
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_pi as common  # noqa: E402  (shared machinery: workers, memory, quiet-machine guard, tables)
from bench_pi import TARGETS  # noqa: E402

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
TRAIN_CONFIGS = common.TRAIN_CONFIGS  # the same five, so bench_pi's tables render them
INFER_CONFIGS = common.INFER_CONFIGS
APT = {"apt_stage1": dict(stage=1), "apt_stage2": dict(stage=2, vlm_mode="frozen"),
       "apt_stage2_unmasked": dict(stage=2, vlm_mode="frozen", inherited_layers_keep_language_mask=False)}
# openpi's AdamW settings (betas 0.9/0.95, eps 1e-8, weight decay 1e-10), lr at its peak.
OPTIMIZER = dict(optimizer_lr=2.5e-5, optimizer_betas=(0.9, 0.95), optimizer_eps=1e-8, optimizer_weight_decay=1e-10)
PRELOAD = [
    "torch",
    "openpi.models_pytorch.pi0_pytorch",
    "openpi.models.model",
    "apt_plugins_openpi_pi.adapter",
    "apt_plugins_openpi_pi.modeling",
    "apt_plugins_openpi_pi.testing",
    "bench_pi",
]


def model_config(policy: str, s: dict[str, Any]) -> Any:
    """openpi's ``Pi0Config`` at size ``s``.

    ``action_expert_variant="gemma_300m"`` is what makes ``tiny_openpi_patches`` size the expert with
    ``expert_width``/``expert_mlp`` (the patched ``get_config`` tells the two stacks apart by variant).
    """
    from apt_plugins_openpi_pi.testing import tiny_model_config

    return tiny_model_config(policy == "pi05", action_dim=s["action_dim"], action_horizon=s["action_horizon"],
                             max_token_len=s["max_token_len"][policy], action_expert_variant="gemma_300m")


def build(policy: str, config: str, s: dict[str, Any], seed: int = 0) -> Any:
    """A real openpi ``PI0Pytorch`` of size ``s``, stock or prepared for ``config``."""
    import torch
    from openpi.models_pytorch.pi0_pytorch import PI0Pytorch

    from apt_plugins import AptConfig, prepare_stage
    from apt_plugins_openpi_pi.modeling import set_state_marker
    from apt_plugins_openpi_pi.testing import STATE_MARKER, tiny_openpi_patches

    torch.manual_seed(seed)
    with tiny_openpi_patches(width=s["vlm_width"], mlp_dim=s["vlm_mlp"], depth=s["depth"], head_dim=s["head_dim"],
                             expert_width=s["expert_width"], expert_mlp=s["expert_mlp"],
                             vision_width=s["vision_width"], vision_mlp=s["vision_mlp"],
                             vision_layers=s["vision_layers"], vision_heads=s["vision_heads"],
                             patch_size=s["patch_size"], vocab=s["vocab"]):
        model = PI0Pytorch(model_config(policy, s))
    set_state_marker(model, STATE_MARKER)
    model.gradient_checkpointing_enable()  # as openpi's train_pytorch.py does
    if config == "expert_only":
        model.paligemma_with_expert.paligemma.requires_grad_(False)
    elif config in APT:
        prepare_stage(model, AptConfig(**APT[config]), adapter="openpi_pi05" if policy == "pi05" else "openpi_pi0")
    return model


class BenchPolicy:
    """A ``PI0Pytorch`` behind the interface ``bench_pi``'s workers drive (LeRobot's policy calls).

    ``forward(batch)`` is openpi's training loss ``model(observation, actions).mean()``;
    ``get_optim_params`` is ``param_groups`` for APT and ``model.parameters()`` for stock (openpi's
    trainer); ``predict_action_chunk`` is ``sample_actions``. Batches are flat tensor dicts
    (:func:`flat_batch`); the ``Observation`` is built once per batch, outside the timed work, as
    openpi's data loader builds it before the step.
    """

    def __init__(self, model: Any, config: str, num_steps: int):
        from types import SimpleNamespace

        self.model, self.name, self.num_steps = model, config, num_steps
        self.config = SimpleNamespace(**OPTIMIZER)
        self.in_forward = False  # the probes count the forward pass only, not checkpoint recomputation
        self._obs: tuple[Any, Any] | None = None

    def parameters(self):
        return self.model.parameters()

    def train(self) -> BenchPolicy:
        self.model.train()
        return self

    def eval(self) -> BenchPolicy:
        self.model.eval()
        return self

    def get_optim_params(self):
        from apt_plugins import param_groups

        if self.name in APT:
            return param_groups(self.model, self.config.optimizer_lr, self.config.optimizer_weight_decay)
        return self.model.parameters()

    def observation(self, batch: dict[str, Any]) -> Any:
        if self._obs is None or self._obs[0] is not batch:
            from apt_plugins_openpi_pi.testing import observation

            self._obs = (batch, observation(nested_batch(batch)))
        return self._obs[1]

    def forward(self, batch: dict[str, Any]):
        obs = self.observation(batch)
        self.in_forward = True
        try:
            loss = self.model(obs, batch["actions"]).mean()
        finally:
            self.in_forward = False
        return loss, None

    def reset(self) -> None:
        pass

    def predict_action_chunk(self, batch: dict[str, Any]):
        import torch

        return self.model.sample_actions(torch.device("cpu"), self.observation(batch), num_steps=self.num_steps)


def build_policy(policy: str, config: str, s: dict[str, Any], seed: int = 0) -> BenchPolicy:
    """``bench_pi``'s ``build`` hook: :func:`build` wrapped in :class:`BenchPolicy` (``stock`` = full FT model)."""
    model = build(policy, "full_ft" if config == "stock" else config, s, seed)
    return BenchPolicy(model, config, s["num_steps"]).train()


def openpi_probes(pol: BenchPolicy):
    """``bench_pi.lm_probes`` for openpi's VLM, counting the forward pass only.

    openpi's checkpointed joint pass recomputes the VLM during ``backward``; those calls are not
    new tokens, so the hooks record only while :meth:`BenchPolicy.forward` runs.
    """
    layers = pol.model.paligemma_with_expert.paligemma.language_model.layers
    flags: list[bool] = []
    tokens: list[int] = []

    def on_mlp(_m, _i, out):
        if pol.in_forward:
            flags.append(bool(out.requires_grad))

    def on_k(_m, inp, _o):
        if pol.in_forward:
            tokens.append(int(inp[0].shape[-2]))

    hooks = [layers[len(layers) // 2].mlp.register_forward_hook(on_mlp),
             layers[0].self_attn.k_proj.register_forward_hook(on_k)]
    return hooks, flags, tokens


def flat_batch(batch: dict[str, Any]) -> dict[str, Any]:
    """openpi's nested batch dict as a flat tensor dict (``image.<camera>`` keys), as bench_pi stores batches."""
    out = {}
    for k, v in batch.items():
        if isinstance(v, dict):
            out.update({f"{k}.{name}": t for name, t in v.items()})
        else:
            out[k] = v
    return out


def nested_batch(flat: dict[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`flat_batch`."""
    out: dict[str, Any] = {}
    for k, v in flat.items():
        if "." in k:
            group, name = k.split(".", 1)
            out.setdefault(group, {})[name] = v
        else:
            out[k] = v
    return out


def make_batch(policy: str, s: dict[str, Any]) -> dict[str, Any]:
    """The benchmark batch (flat): ``apt_plugins_openpi_pi.testing.make_batch`` at size ``s``."""
    from apt_plugins_openpi_pi.testing import make_batch as tiny_batch

    return flat_batch(tiny_batch(model_config(policy, s), batch_size=s["batch"]))


def machine_info() -> dict[str, Any]:
    """``bench_pi.machine_info`` with this environment's versions (openpi's transformers, no LeRobot)."""
    from importlib.metadata import PackageNotFoundError, version

    info = common.machine_info()
    info.pop("lerobot", None)
    try:
        info["transformers"] = version("transformers")
    except PackageNotFoundError:  # pragma: no cover
        pass
    return info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--policies", nargs="+", default=["pi0", "pi05"], choices=["pi0", "pi05"])
    ap.add_argument("--steps", type=int, default=None, help="timed training steps (default 8; quick: 2)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed warm-up steps (default 2; quick: 1)")
    ap.add_argument("--infer-reps", "--reps", type=int, default=None, dest="reps",
                    help="timed inference repetitions (default 7; quick: 1)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per worker (default: all CPUs; quick: 1)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, 2 steps, 1 thread: checks the script only")
    ap.add_argument("--json-out", type=Path)
    ap.add_argument("--wait-idle", type=float, default=None, metavar="SECONDS",
                    help="wait up to SECONDS for a quiet machine before every timed round and repeat busy rounds "
                         "(default 60; quick: 0 = off); see bench_pi.py")
    ap.add_argument("--fail-on-miss", action="store_true", help="exit 1 when a target is missed")
    args = ap.parse_args(argv)
    size = "quick" if args.quick else "mid"
    s = SIZES[size]
    steps = args.steps if args.steps is not None else (2 if args.quick else 8)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    reps = args.reps if args.reps is not None else (1 if args.quick else 7)
    threads = args.threads if args.threads is not None else (1 if args.quick else (os.cpu_count() or 1))
    wait_idle = args.wait_idle if args.wait_idle is not None else (0.0 if args.quick else 60.0)
    if steps < 1 or warmup < 0 or reps < 1 or threads < 1 or wait_idle < 0:
        ap.error("--steps, --infer-reps and --threads must be >= 1, --warmup and --wait-idle >= 0")

    import torch

    torch.set_num_threads(threads)
    quiet = common.Quiet(wait_idle)
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    t_start = time.perf_counter()
    shown = sys.argv[1:] if argv is None else argv
    report: dict[str, Any] = dict(
        date=_dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        command=("python benchmarks/bench_openpi.py " + " ".join(shlex.quote(a) for a in shown)).strip(),
        machine=machine_info(), code=common.code_version(), size_name=size, sizes=s, steps=steps,
        warmup=warmup, infer_reps=reps, threads=threads, wait_idle_s=wait_idle,
        loadavg_start=list(os.getloadavg()), policies={})
    print(f"bench_openpi: sizes={size} steps={steps} warmup={warmup} infer_reps={reps} threads={threads} "
          f"wait_idle={wait_idle:g}s", flush=True)
    hooks = dict(build=build_policy, probes=openpi_probes)
    with tempfile.TemporaryDirectory(prefix="bench_openpi_") as tmp:
        for policy in args.policies:
            batch = make_batch(policy, s)
            batch_path = str(Path(tmp) / f"batch_{policy}.pt")
            torch.save(batch, batch_path)
            digest = common.batch_digest(batch)
            train = common.run_training(ctx, policy, s, batch_path, steps, warmup, threads, quiet,
                                        configs=TRAIN_CONFIGS, worker_kwargs=hooks)
            for config, r in train.items():
                assert r["batch_digest"] == digest, "every configuration must see the same batch"
                print(f"  {policy:5s} {common.LABELS[config]:30s} step {r['step_s']:.3f} s  "
                      f"peak +{r['peak_growth_mib']:.0f} MiB  trainable {r['params_trainable'] / 1e6:.2f}M  "
                      f"loss[0] {r['losses'][0]:.6f}", flush=True)
            infer = common._run_isolated(ctx, common.infer_worker, policy, s, batch_path, reps, threads, quiet,
                                         build_policy, INFER_CONFIGS, ("actions",))
            assert infer["batch_digest"] == digest
            print("  " + "  ".join(f"{policy} infer {common.LABELS[n]} {t:.3f} s" for n, t in infer["infer_s"].items()),
                  flush=True)
            report["policies"][policy] = dict(batch_digest=digest, train=train, infer=infer,
                                              ratios=common.ratios(train, infer, TARGETS))
    report["wall_s"] = time.perf_counter() - t_start
    shares = [v for p in report["policies"].values() for v in common._all_foreign(p)]
    report["foreign_cpu_share"] = dict(median=common._median(shares), max=max(shares) if shares else None)
    report["loadavg_end"] = list(os.getloadavg())
    print()
    print(common.render_markdown(report))
    print(f"\nload average at start / end: {report['loadavg_start']} / {report['loadavg_end']}")
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(report, indent=2, default=str))
        print(f"wrote {args.json_out}")
    missed = [r for p in report["policies"].values() for r in p["ratios"] if r["status"] == "FAIL"]
    return 1 if args.fail_on_miss and missed else 0


if __name__ == "__main__":
    sys.exit(main())
