#!/usr/bin/env python
"""APT vs stock LeRobot GR00T N1.7: training step time, peak training memory, inference time.

Run from the repository root (CPU; nothing is downloaded)::

    HF_HUB_OFFLINE=1 python benchmarks/bench_groot.py                   # mid-size
    HF_HUB_OFFLINE=1 python benchmarks/bench_groot.py --quick           # smoke test, tiny sizes
    HF_HUB_OFFLINE=1 python benchmarks/bench_groot.py --json-out bench.json --wait-idle 0

Same method as ``bench_pi.py`` (whose workers, memory probe and shared-machine guard it reuses): one
model-ready batch shared by every configuration, one process per training configuration stepped
round-robin, a step = ``policy.forward`` + ``backward`` + ``AdamW.step`` over
``policy.get_optim_params()`` (+ ``zero_grad``), peak memory = ``VmHWM`` growth over the built model,
and ``predict_action_chunk`` of stock vs APT in one process. The configurations:

* stock full fine-tuning: ``GrootConfig(tune_llm=True, tune_visual=True)``;
* stock default: ``GrootConfig()`` (``tune_llm=False, tune_visual=False``; projector, DiT and vlln
  trained), GR00T's own frozen-backbone setting;
* APT Stage 1 and APT Stage 2 with the VLM frozen (``apt_groot``).

The models are the real LeRobot ``GrootPolicy`` (and ``APTGrootPolicy``), loaded from a Qwen3-VL
config directory and a GR00T N1.7 directory written to disk at the sizes of ``SIZES`` (as
``apt_plugins_lerobot_groot.testing`` does at test size), with random weights.
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
# Real GR00T N1.7: Cosmos-Reason2-2B (Qwen3-VL: text 2048 wide, MLP 6144, 16 q / 8 kv heads x 128,
# vocab 151936; GR00T keeps the first select_layer=16 of 28 layers; vision 24 x 1024, patch 16,
# 2x2 merge, deepstack), vlln + 4 vl_self_attention layers (32 x 64), DiT 32 blocks of 32 heads x 48
# (1536), action horizon 40 (up to 132-D), 4 denoising steps.
SIZES: dict[str, dict[str, Any]] = {
    "mid": dict(
        text_width=512, text_mlp=1536, text_layers=8, text_heads=8, text_kv_heads=4, head_dim=64, vocab=16384,
        mrope_section=[16, 8, 8], vision_width=256, vision_mlp=1024, vision_layers=2, vision_heads=4,
        deepstack=[0], patch=16, merge=2, temporal=2, image_grid=(1, 16, 16), cameras=2,
        task_len=24, batch=4, horizon=16, state_dim=14, action_dim=14, max_state_dim=32, max_action_dim=32,
        hidden=256, dit_layers=8, dit_heads=4, dit_head_dim=64, vlsa_layers=2, vlsa_heads=8, num_inference_steps=4,
    ),
    "quick": dict(
        text_width=64, text_mlp=128, text_layers=2, text_heads=4, text_kv_heads=2, head_dim=16, vocab=1024,
        mrope_section=[4, 2, 2], vision_width=32, vision_mlp=64, vision_layers=1, vision_heads=2,
        deepstack=[0], patch=8, merge=2, temporal=2, image_grid=(1, 4, 4), cameras=1,
        task_len=6, batch=2, horizon=4, state_dim=6, action_dim=6, max_state_dim=8, max_action_dim=8,
        hidden=32, dit_layers=2, dit_heads=2, dit_head_dim=16, vlsa_layers=1, vlsa_heads=2, num_inference_steps=2,
    ),
}

TRAIN_CONFIGS = ("full_ft", "default", "apt_stage1", "apt_stage2")
INFER_CONFIGS = ("stock", "apt_stage1", "apt_stage2")
LABELS = {
    "full_ft": "stock full FT",
    "default": "stock default (frozen backbone)",
    "apt_stage1": "APT Stage 1",
    "apt_stage2": "APT Stage 2 (frozen VLM)",
    "stock": "stock",
}
POLICY = "groot"

# (name, numerator, denominator, kind, limit): the pi targets, with stock GR00T's default (frozen
# backbone) in the place of pi's expert-only flags.
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
    "transformers.models.qwen3_vl.modeling_qwen3_vl",
    "lerobot.policies.groot.modeling_groot",
    "apt_plugins_lerobot_groot.modeling_apt_groot",
    "apt_plugins_lerobot_groot.adapter",
    "apt_plugins_lerobot_groot.modeling",
    "bench_pi",
]

# Special token ids (top of the vocabulary; instruction ids stay below them).
IMAGE_TOKEN_OFFSET = 8  # image, video, vision start/end, im_start, im_end, newline, pad = vocab - 8 .. vocab - 1


def special_ids(s: dict[str, Any]) -> dict[str, int]:
    names = ("image", "video", "vision_start", "vision_end", "im_start", "im_end", "newline", "pad")
    return {n: s["vocab"] - IMAGE_TOKEN_OFFSET + i for i, n in enumerate(names)}


def image_tokens(s: dict[str, Any]) -> int:
    t, h, w = s["image_grid"]
    return t * h * w // (s["merge"] ** 2)


# --------------------------------------------------------------------------------------- models
def write_base_model(root: Path, s: dict[str, Any], seed: int = 0) -> Path:
    """A Qwen3-VL config dir and a GR00T N1.7 dir (random weights) at sizes ``s``; returns the GR00T dir."""
    import torch
    from lerobot.policies.groot.groot_n1_7 import GR00TN17, GR00TN17Config
    from transformers import Qwen3VLConfig

    ids = special_ids(s)
    backbone = Path(root) / "qwen3vl"
    patches_side = s["image_grid"][1]
    Qwen3VLConfig(
        image_token_id=ids["image"], video_token_id=ids["video"], vision_start_token_id=ids["vision_start"],
        vision_end_token_id=ids["vision_end"], tie_word_embeddings=True,
        text_config=dict(hidden_size=s["text_width"], intermediate_size=s["text_mlp"],
                         num_hidden_layers=s["text_layers"], num_attention_heads=s["text_heads"],
                         num_key_value_heads=s["text_kv_heads"], head_dim=s["head_dim"], vocab_size=s["vocab"],
                         rope_parameters={"rope_type": "default", "rope_theta": 5e6,
                                          "mrope_section": s["mrope_section"], "mrope_interleaved": True}),
        vision_config=dict(depth=s["vision_layers"], hidden_size=s["vision_width"], intermediate_size=s["vision_mlp"],
                           num_heads=s["vision_heads"], patch_size=s["patch"], spatial_merge_size=s["merge"],
                           temporal_patch_size=s["temporal"], out_hidden_size=s["text_width"],
                           num_position_embeddings=patches_side ** 2, deepstack_visual_indexes=s["deepstack"]),
    ).save_pretrained(backbone)
    cfg = GR00TN17Config(
        model_name=str(backbone), backbone_model_type="qwen", backbone_embedding_dim=s["text_width"],
        select_layer=s["text_layers"], load_bf16=False, max_state_dim=s["max_state_dim"],
        max_action_dim=s["max_action_dim"], action_horizon=s["horizon"], hidden_size=s["hidden"],
        input_embedding_dim=s["dit_heads"] * s["dit_head_dim"], max_seq_len=1024, max_num_embodiments=32,
        num_inference_timesteps=s["num_inference_steps"],
        diffusion_model_cfg=dict(num_layers=s["dit_layers"], num_attention_heads=s["dit_heads"],
                                 attention_head_dim=s["dit_head_dim"], output_dim=s["hidden"],
                                 interleave_self_attention=True, norm_type="ada_norm", positional_embeddings=None,
                                 dropout=0.0, final_dropout=True),
        vl_self_attention_cfg=dict(num_layers=s["vlsa_layers"], num_attention_heads=s["vlsa_heads"],
                                   attention_head_dim=s["text_width"] // s["vlsa_heads"]),
    )
    torch.manual_seed(seed)
    directory = Path(root) / "groot"
    GR00TN17(cfg, load_backbone_weights=False).save_pretrained(directory)
    return directory


def camera_keys(s: dict[str, Any]) -> list[str]:
    return [f"observation.images.{n}" for n in ("ego_view", "wrist", "left", "right")[: s["cameras"]]]


def build_policy(policy: str, config: str, s: dict[str, Any], seed: int = 0):
    """A real stock or APT GR00T N1.7 policy loaded from ``s["base_model_path"]``, for ``config``."""
    import torch
    from lerobot.configs.types import FeatureType, PolicyFeature
    from lerobot.policies.groot.configuration_groot import GrootConfig
    from lerobot.policies.groot.modeling_groot import GrootPolicy

    from apt_plugins import AptConfig
    from apt_plugins_lerobot_groot.configuration_apt_groot import APTGrootConfig
    from apt_plugins_lerobot_groot.modeling_apt_groot import APTGrootPolicy

    assert policy == POLICY
    px = s["image_grid"][1] * s["patch"]
    inputs = {k: PolicyFeature(type=FeatureType.VISUAL, shape=(3, px, px)) for k in camera_keys(s)}
    inputs["observation.state"] = PolicyFeature(type=FeatureType.STATE, shape=(s["state_dim"],))
    outputs = {"action": PolicyFeature(type=FeatureType.ACTION, shape=(s["action_dim"],))}
    fields: dict[str, Any] = dict(
        device="cpu", use_bf16=False, chunk_size=s["horizon"], n_action_steps=s["horizon"],
        max_state_dim=s["max_state_dim"], max_action_dim=s["max_action_dim"], base_model_path=s["base_model_path"],
        input_features=inputs, output_features=outputs,
    )
    if config == "full_ft":
        cfg, cls = GrootConfig(**fields, tune_llm=True, tune_visual=True), GrootPolicy
    elif config in ("default", "stock"):
        cfg, cls = GrootConfig(**fields), GrootPolicy
    elif config == "apt_stage1":
        cfg, cls = APTGrootConfig(**fields, apt=AptConfig(stage=1).to_settings()), APTGrootPolicy
    elif config == "apt_stage2":
        cfg, cls = APTGrootConfig(**fields, apt=AptConfig(stage=2, vlm_mode="frozen").to_settings()), APTGrootPolicy
    else:
        raise ValueError(config)
    torch.manual_seed(seed)
    return cls(cfg).train()


def groot_probes(pol: Any):
    """The Qwen3-VL language model's layers (GR00T keeps ``select_layer`` of them)."""
    return common.lm_probes(pol._groot_model.backbone.model.model.language_model.layers)


def make_batch(s: dict[str, Any], seed: int = 0) -> dict[str, Any]:
    """A model-ready batch, laid out as LeRobot's groot processor lays it out (left padding to the
    longest prompt): ``<|im_start|> user \\n`` + per camera ``<|vision_start|> <image>*n <|vision_end|>``
    + instruction + ``<|im_end|> \\n``. Instruction lengths vary across the batch (task_len, -2, -4)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    ids_ = special_ids(s)
    b, cams = s["batch"], s["cameras"]
    image = [ids_["vision_start"], *([ids_["image"]] * image_tokens(s)), ids_["vision_end"]]
    seqs = []
    for i in range(b):
        n = max(1, s["task_len"] - 2 * (i % 3))
        task = torch.randint(10, s["vocab"] - IMAGE_TOKEN_OFFSET, (n,), generator=g).tolist()
        seqs.append([ids_["im_start"], 11, ids_["newline"], *(image * cams), *task, ids_["im_end"], ids_["newline"]])
    length = max(map(len, seqs))
    input_ids = torch.full((b, length), ids_["pad"], dtype=torch.long)
    mask = torch.zeros(b, length, dtype=torch.long)
    for i, seq in enumerate(seqs):
        input_ids[i, length - len(seq):] = torch.tensor(seq)
        mask[i, length - len(seq):] = 1
    t, h, w = s["image_grid"]
    patch_dim = 3 * s["temporal"] * s["patch"] ** 2
    action_mask = torch.zeros(b, s["horizon"], s["max_action_dim"])
    action_mask[:, :, : s["action_dim"]] = 1
    state = torch.zeros(b, 1, s["max_state_dim"])
    state[:, :, : s["state_dim"]] = torch.rand(b, 1, s["state_dim"], generator=g) * 2 - 1
    action = torch.zeros(b, s["horizon"], s["max_action_dim"])
    action[:, :, : s["action_dim"]] = torch.rand(b, s["horizon"], s["action_dim"], generator=g) * 2 - 1
    return {
        "input_ids": input_ids,
        "attention_mask": mask,
        "pixel_values": torch.randn(b * cams * t * h * w, patch_dim, generator=g),
        "image_grid_thw": torch.tensor([[t, h, w]] * (b * cams)),
        "state": state,
        "embodiment_id": torch.full((b,), 10, dtype=torch.long),
        "action": action,
        "action_mask": action_mask,
    }


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
    command = "python benchmarks/bench_groot.py " + " ".join(shlex.quote(a) for a in shown)
    report: dict[str, Any] = dict(
        date=_dt.datetime.now().astimezone().isoformat(timespec="seconds"), command=command.strip(),
        machine=common.machine_info(), code=common.code_version(), threads=threads, size_name=size_name, sizes=s,
        steps=steps, warmup=warmup, infer_reps=reps, wait_idle_s=wait_idle, loadavg_start=list(os.getloadavg()),
        policies={},
    )
    print(f"bench_groot: sizes={size_name} steps={steps} warmup={warmup} infer_reps={reps} threads={threads} "
          f"wait_idle={wait_idle:g}s", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench_groot_") as tmp:
        s["base_model_path"] = str(write_base_model(Path(tmp), s))
        batch = make_batch(s)
        s["prompt_len"] = int(batch["input_ids"].shape[1])
        s["image_tokens_per_camera"] = image_tokens(s)
        batch_path = str(Path(tmp) / "batch_groot.pt")
        torch.save(batch, batch_path)
        digest = common.batch_digest(batch)
        train = common.run_training(ctx, POLICY, s, batch_path, steps, warmup, threads, quiet, configs=TRAIN_CONFIGS,
                                    worker_kwargs=dict(build=build_policy, probes=groot_probes))
        for config, r in train.items():
            assert r["batch_digest"] == digest, "every configuration must see the same batch"
            print(f"  {LABELS[config]:32s} step {r['step_s']:.3f} s  peak +{r['peak_growth_mib']:.0f} MiB  "
                  f"trainable {r['params_trainable'] / 1e6:.2f}M  loss[0] {r['losses'][0]:.6f}", flush=True)
        infer = common._run_isolated(ctx, common.infer_worker, POLICY, s, batch_path, reps, threads, quiet,
                                     build_policy, INFER_CONFIGS, ("action", "action_mask"))
        assert infer["batch_digest"] == digest
        print("  " + "  ".join(f"infer {LABELS[n]} {t:.3f} s" for n, t in infer["infer_s"].items()), flush=True)
        rows = common.ratios(train, infer, TARGETS)
        report["policies"][POLICY] = dict(batch_digest=digest, train=train, infer=infer, ratios=rows)
    s.pop("base_model_path")
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
