#!/usr/bin/env python
"""APT vs stock LeRobot SmolVLA: training step time, peak training memory, inference time.

Run from the repository root (CPU; nothing is downloaded)::

    HF_HUB_OFFLINE=1 python benchmarks/bench_smolvla.py                   # mid-size
    HF_HUB_OFFLINE=1 python benchmarks/bench_smolvla.py --quick           # smoke test, tiny sizes
    HF_HUB_OFFLINE=1 python benchmarks/bench_smolvla.py --json-out bench.json --wait-idle 0

Same method as ``bench_pi.py`` (whose workers, memory probe and shared-machine guard it reuses): one
model-ready batch shared by every configuration, one process per training configuration stepped
round-robin, a step = ``policy.forward`` + ``backward`` + ``AdamW.step`` over
``policy.get_optim_params()`` (+ ``zero_grad``), peak memory = ``VmHWM`` growth over the built model,
and ``predict_action_chunk`` of stock vs APT in one process. The configurations:

* stock full fine-tuning: ``SmolVLAConfig(train_expert_only=False, freeze_vision_encoder=False)``;
* stock default: ``SmolVLAConfig()`` (``train_expert_only=True, freeze_vision_encoder=True``: the
  expert and ``state_proj`` train), SmolVLA's own frozen-VLM setting;
* APT Stage 1 and APT Stage 2 with the VLM frozen (``apt_smolvla``).

The models are the real LeRobot ``SmolVLAPolicy`` (and ``APTSmolVLAPolicy``), built from a SmolVLM
config directory written to disk at the sizes of ``SIZES`` (as ``apt_plugins_lerobot_smolvla.testing``
does at test size), with random weights.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_pi as common  # noqa: E402  (shared machinery: workers, memory, quiet-machine guard, tables)

# --------------------------------------------------------------------------------------- sizes
# Real SmolVLA (smolvla_base): SmolVLM2-500M, text 960 wide, MLP 2560, 15 q / 5 kv heads x 64, vocab
# 49280, truncated to num_vlm_layers=16 of 32; SigLIP 12 x 768, patch 16, 512 px, pixel shuffle 4 (64
# tokens per image); expert 0.75 x 960 = 720 wide, cross-attention every other layer; chunk 50, 10
# denoising steps, prompt up to 48 tokens.
SIZES: dict[str, dict[str, Any]] = {
    "mid": dict(
        text_width=512, text_mlp=1536, text_layers=8, text_heads=8, text_kv_heads=4, head_dim=64, vocab=16384,
        vision_width=256, vision_mlp=1024, vision_layers=2, vision_heads=4, patch=16, image_size=256,
        scale_factor=2, cameras=2, task_len=24, batch=4, chunk=50, state_dim=14, action_dim=14,
        max_state_dim=32, max_action_dim=32, num_steps=10,
    ),
    "quick": dict(
        text_width=64, text_mlp=128, text_layers=4, text_heads=4, text_kv_heads=2, head_dim=16, vocab=512,
        vision_width=32, vision_mlp=64, vision_layers=1, vision_heads=2, patch=8, image_size=32,
        scale_factor=2, cameras=1, task_len=6, batch=2, chunk=4, state_dim=6, action_dim=6,
        max_state_dim=8, max_action_dim=8, num_steps=2,
    ),
}

TRAIN_CONFIGS = ("full_ft", "default", "apt_stage1", "apt_stage2")
INFER_CONFIGS = ("stock", "apt_stage1", "apt_stage2")
LABELS = {
    "full_ft": "stock full FT",
    "default": "stock default (frozen VLM, expert trains)",
    "apt_stage1": "APT Stage 1",
    "apt_stage2": "APT Stage 2 (frozen VLM)",
    "stock": "stock",
}
POLICY = "smolvla"

# (name, numerator, denominator, kind, limit): the pi targets, with stock SmolVLA's default
# (train_expert_only, freeze_vision_encoder) in the place of pi's expert-only flags.
TARGETS = [
    ("S1 time / full FT", "apt_stage1", "full_ft", "time", 0.5),
    ("S1 time / stock default", "apt_stage1", "default", "time", 1.0),
    ("S1 peak mem / full FT", "apt_stage1", "full_ft", "mem", 0.6),
    ("S1 peak mem / stock default", "apt_stage1", "default", "mem", None),
    ("S2 time / full FT", "apt_stage2", "full_ft", "time", 0.6),
    ("S2 time / stock default", "apt_stage2", "default", "time", None),
    ("S2 peak mem / full FT", "apt_stage2", "full_ft", "mem", None),
    ("S2 peak mem / stock default", "apt_stage2", "default", "mem", None),
    ("stock default time / full FT", "default", "full_ft", "time", None),
    ("infer S1 / stock", "apt_stage1", "stock", "infer", 1.15),
    ("infer S2 / stock", "apt_stage2", "stock", "infer", 1.15),
]

PRELOAD = [
    "torch",
    "lerobot.policies.smolvla.modeling_smolvla",
    "apt_plugins_lerobot_smolvla.modeling_apt_smolvla",
    "apt_plugins_lerobot_smolvla.adapter",
    "apt_plugins_lerobot_smolvla.modeling",
    "bench_pi",
]
IMAGE_KEYS = ("observation.images.top", "observation.images.wrist", "observation.images.left")


# --------------------------------------------------------------------------------------- models
def write_backbone(root: Path, s: dict[str, Any]) -> Path:
    """A SmolVLM config + processor directory at sizes ``s`` (random weights are drawn at build time)."""
    from apt_plugins_lerobot_smolvla.testing import write_tiny_backbone

    return write_tiny_backbone(
        Path(root) / "smolvlm", scale_factor=s["scale_factor"],
        vision=dict(hidden_size=s["vision_width"], intermediate_size=s["vision_mlp"],
                    num_hidden_layers=s["vision_layers"], num_attention_heads=s["vision_heads"],
                    patch_size=s["patch"], image_size=s["image_size"]),
        hidden_size=s["text_width"], intermediate_size=s["text_mlp"], num_hidden_layers=s["text_layers"],
        num_attention_heads=s["text_heads"], num_key_value_heads=s["text_kv_heads"], head_dim=s["head_dim"],
        vocab_size=s["vocab"],
    )


def build_policy(policy: str, config: str, s: dict[str, Any], seed: int = 0):
    """A real stock or APT SmolVLA policy on the backbone ``s["vlm_model_name"]``, for ``config``."""
    import torch
    from lerobot.configs.types import FeatureType, PolicyFeature
    from lerobot.policies.smolvla.configuration_smolvla import SmolVLAConfig
    from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy

    from apt_plugins import AptConfig
    from apt_plugins_lerobot_smolvla.configuration_apt_smolvla import APTSmolVLAConfig
    from apt_plugins_lerobot_smolvla.modeling_apt_smolvla import APTSmolVLAPolicy

    assert policy == POLICY
    px = s["image_size"]
    inputs = {k: PolicyFeature(type=FeatureType.VISUAL, shape=(3, px, px)) for k in IMAGE_KEYS[: s["cameras"]]}
    inputs["observation.state"] = PolicyFeature(type=FeatureType.STATE, shape=(s["state_dim"],))
    outputs = {"action": PolicyFeature(type=FeatureType.ACTION, shape=(s["action_dim"],))}
    fields: dict[str, Any] = dict(
        device="cpu", vlm_model_name=s["vlm_model_name"], load_vlm_weights=False, num_vlm_layers=s["text_layers"],
        resize_imgs_with_padding=(px, px), chunk_size=s["chunk"], n_action_steps=s["chunk"],
        max_state_dim=s["max_state_dim"], max_action_dim=s["max_action_dim"], num_steps=s["num_steps"],
        input_features=inputs, output_features=outputs,
    )
    if config == "full_ft":
        cfg, cls = SmolVLAConfig(**fields, train_expert_only=False, freeze_vision_encoder=False), SmolVLAPolicy
    elif config in ("default", "stock"):
        cfg, cls = SmolVLAConfig(**fields), SmolVLAPolicy
    elif config == "apt_stage1":
        cfg, cls = APTSmolVLAConfig(**fields, apt=AptConfig(stage=1).to_settings()), APTSmolVLAPolicy
    elif config == "apt_stage2":
        cfg, cls = APTSmolVLAConfig(**fields, apt=AptConfig(stage=2, vlm_mode="frozen").to_settings()), APTSmolVLAPolicy
    else:
        raise ValueError(config)
    torch.manual_seed(seed)
    return cls(cfg).train()


def smolvla_probes(pol: Any):
    """The SmolVLM text model's (truncated) layers."""
    return common.lm_probes(pol.model.vlm_with_expert.get_vlm_model().text_model.layers)


def make_batch(s: dict[str, Any], seed: int = 0) -> dict[str, Any]:
    """A model-ready batch, laid out as LeRobot's SmolVLA processor lays it out (right padding to the
    longest prompt). Instruction lengths vary across the batch (task_len, -2, -4)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    b = s["batch"]
    lengths = [max(1, s["task_len"] - 2 * (i % 3)) for i in range(b)]
    tokens = torch.zeros(b, max(lengths), dtype=torch.long)
    mask = torch.zeros(b, max(lengths), dtype=torch.bool)
    for i, n in enumerate(lengths):
        tokens[i, :n] = torch.randint(20, s["vocab"], (n,), generator=g)
        mask[i, :n] = True
    batch = {k: torch.rand(b, 3, s["image_size"], s["image_size"], generator=g) for k in IMAGE_KEYS[: s["cameras"]]}
    batch.update({
        "observation.state": torch.rand(b, s["state_dim"], generator=g) * 2 - 1,
        "action": torch.rand(b, s["chunk"], s["action_dim"], generator=g) * 2 - 1,
        "observation.language.tokens": tokens,
        "observation.language.attention_mask": mask,
    })
    return batch


# --------------------------------------------------------------------------------------- report
def render_markdown(report: dict[str, Any]) -> str:
    """The absolute and ratio tables (markdown), as pasted into docs/benchmarks.md."""
    p = report["policies"][POLICY]
    rows = []
    for config in TRAIN_CONFIGS:
        r = p["train"][config]
        infer = p["infer"]["infer_s"].get("stock" if config == "full_ft" else config)
        rows.append([
            LABELS[config], f"{r['step_s']:.3f}", f"{r['peak_growth_mib']:.0f}",
            f"{r['params_trainable'] / 1e6:.2f}M / {r['params_total'] / 1e6:.2f}M", str(r["vlm_tokens_per_sample"]),
            {True: "yes", False: "no", None: "-"}[r["vlm_activations_require_grad"]],
            f"{infer:.3f}" + (" (stock)" if config == "full_ft" else "") if infer is not None else "-",
        ])
    out = [common.fmt_table(
        ["configuration", "step time (s, median)", "peak mem growth (MiB)", "trainable / total params",
         "LM tokens / sample", "LM activations in autograd graph", "predict_action_chunk (s, median)"], rows), ""]
    out.append(common.fmt_table(["ratio", "measured", "target", "status"], [
        [r["name"], "-" if r["value"] is None else f"{r['value']:.3f}",
         "-" if r["target"] is None else f"<= {r['target']:.2f}", r["status"]] for r in p["ratios"]]))
    fc = report.get("foreign_cpu_share") or {}
    if fc.get("median") is not None:
        rejected = next(iter(p["train"].values()))["rounds_rejected_busy"] + p["infer"]["reps_rejected_busy"]
        out += ["", f"CPU used by other processes during the kept timed work: median {fc['median']:.1%}, "
                    f"max {fc['max']:.1%} of the machine; {rejected} busy rounds/repetitions discarded "
                    f"(--wait-idle {report.get('wait_idle_s', 0):g})."]
        if fc["max"] > 0.10:
            out.append("WARNING: the machine was busy with other processes during some timed steps; "
                       "re-run on a quiet machine to be sure.")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=None, help="timed training steps (default 8; quick: 2)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed warm-up steps (default 2; quick: 1)")
    ap.add_argument("--infer-reps", type=int, default=None, help="timed inference calls (default 7; quick: 2)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per worker (default: all CPUs; quick: 1)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, 2 steps: checks that the script works")
    ap.add_argument("--json-out", type=Path, default=None, help="also write the results as JSON here")
    ap.add_argument("--wait-idle", type=float, default=None, metavar="SECONDS",
                    help="wait up to SECONDS for a quiet machine before every timed round and repeat busy rounds "
                         "(default 60; quick: 0 = off); see bench_pi.py")
    ap.add_argument("--fail-on-miss", action="store_true", help="exit 1 when a target is missed")
    args = ap.parse_args(argv)
    size_name = "quick" if args.quick else "mid"
    s = dict(SIZES[size_name])
    steps = args.steps if args.steps is not None else (2 if args.quick else 8)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    reps = args.infer_reps if args.infer_reps is not None else (2 if args.quick else 7)
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
    command = "python benchmarks/bench_smolvla.py " + " ".join(shlex.quote(a) for a in shown)
    report: dict[str, Any] = dict(
        date=_dt.datetime.now().astimezone().isoformat(timespec="seconds"), command=command.strip(),
        machine=common.machine_info(), code=common.code_version(), threads=threads, size_name=size_name, sizes=s,
        steps=steps, warmup=warmup, infer_reps=reps, wait_idle_s=wait_idle, loadavg_start=list(os.getloadavg()),
        policies={},
    )
    print(f"bench_smolvla: sizes={size_name} steps={steps} warmup={warmup} infer_reps={reps} threads={threads} "
          f"wait_idle={wait_idle:g}s", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench_smolvla_") as tmp:
        s["vlm_model_name"] = str(write_backbone(Path(tmp), s))
        batch = make_batch(s)
        batch_path = str(Path(tmp) / "batch_smolvla.pt")
        torch.save(batch, batch_path)
        digest = common.batch_digest(batch)
        train = common.run_training(ctx, POLICY, s, batch_path, steps, warmup, threads, quiet, configs=TRAIN_CONFIGS,
                                    worker_kwargs=dict(build=build_policy, probes=smolvla_probes))
        for config, r in train.items():
            assert r["batch_digest"] == digest, "every configuration must see the same batch"
            print(f"  {LABELS[config]:42s} step {r['step_s']:.3f} s  peak +{r['peak_growth_mib']:.0f} MiB  "
                  f"trainable {r['params_trainable'] / 1e6:.2f}M  loss[0] {r['losses'][0]:.6f}", flush=True)
        infer = common._run_isolated(ctx, common.infer_worker, POLICY, s, batch_path, reps, threads, quiet,
                                     build_policy, INFER_CONFIGS, ("action",))
        assert infer["batch_digest"] == digest
        print("  " + "  ".join(f"infer {LABELS[n]} {t:.3f} s" for n, t in infer["infer_s"].items()), flush=True)
        rows = common.ratios(train, infer, TARGETS)
        report["policies"][POLICY] = dict(batch_digest=digest, train=train, infer=infer, ratios=rows)
    s.pop("vlm_model_name")
    report["wall_s"] = time.perf_counter() - t_start
    shares = common._all_foreign(report["policies"][POLICY])
    report["foreign_cpu_share"] = dict(median=common._median(shares), max=max(shares) if shares else None)
    report["loadavg_end"] = list(os.getloadavg())

    print()
    print(render_markdown(report))
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(report, indent=2))
        print(f"\nwrote {args.json_out}")
    any_fail = any(r["status"] == "FAIL" for r in rows)
    return 1 if any_fail and args.fail_on_miss else 0


if __name__ == "__main__":
    sys.exit(main())
