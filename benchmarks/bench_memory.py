#!/usr/bin/env python
"""Peak memory of one training step at the REAL pi0 / pi0.5 sizes (2B VLM + 300M expert) and the REAL
GR00T N1.7 (Cosmos-Reason2-2B backbone, 16 of its 28 LM layers kept, + the 32-block DiT head), on CPU.

Run from the repository root (random weights built from LeRobot's own configs; nothing is downloaded)::

    HF_HUB_OFFLINE=1 python benchmarks/bench_memory.py                         # cap 14 GB (shared machine)
    HF_HUB_OFFLINE=1 python benchmarks/bench_memory.py --cap-gb 22            # a free 24 GB machine
    HF_HUB_OFFLINE=1 python benchmarks/bench_memory.py --policies pi0 --configs apt_stage1 expert_only --batch 2

Every (policy, configuration) runs alone in a child process, one after the other. A watchdog in this
process samples the child's RSS every 50 ms and kills it with SIGKILL as soon as it passes
``--cap-gb``; that row then reads "exceeds N GB" instead of letting the machine swap or the kernel's
OOM killer hit other processes; it also kills the child when the machine's available memory falls
below ``--floor-gb`` (other processes grew), reported as "stopped". Before each child starts, the script waits (up to ``--wait-memory``
seconds) until the machine has ``cap + 0.5 GB`` available, and otherwise marks the row "not measured".

The child builds the policy in bfloat16 directly: ``torch.set_default_dtype(torch.bfloat16)`` while
the modules are constructed (and transformers' per-sub-model ``local_torch_dtype``, which would
apply the float32 LeRobot writes into the Gemma/SigLIP configs, routed to bfloat16), so no float32
copy of the 3.3B parameters ever exists, then LeRobot's own
``dtype="bfloat16"`` handling keeps the vision tower, projector and norms in float32 as the host does.
It then runs ``--steps`` training steps (``forward`` + ``backward`` + ``AdamW.step``) and reports the
kernel's RSS high-water mark (``VmHWM``): the whole process's peak, weights included. The parent's
sampled peak is reported next to it (they agree to a few %; the kernel's is exact).

Fast build, same memory. The random values of the weights do not matter for memory, only which
tensors exist, in which dtype, and that every page of them has been written once (an untouched
``torch.empty`` page is not resident). Running PyTorch's and transformers' initialisers over 4B
parameters (kaiming/normal/trunc-normal, several passes per tensor) is what made a real-size child
take 10-18 minutes on 2 vCPUs. So while the policy is built, every initialiser in ``torch.nn.init``
(and the copies transformers keeps in ``transformers.initialization``) is a no-op for a tensor of
``FAST_INIT_NUMEL`` elements or more (small tensors: norms, biases, gates, keep their real init), and
after the build every such large parameter is filled once with ``uniform_(-a, a)``, std 0.02. Each
parameter is still allocated by the host's own constructors, in the host's dtypes and layout, and
written in full before the step, so the weights' resident bytes, the gradients, AdamW's state and
the activations are the ones a real initialisation gives; the values are finite and non-degenerate,
so the loss and gradients are finite (checked: the row records the losses). Only the build time
changes (about a minute instead of 10-18).

GR00T N1.7 (``--policies groot``): the real LeRobot ``GrootPolicy`` / ``APTGrootPolicy`` loaded from a
directory holding LeRobot's own ``GR00TN17Config()`` (the N1.7 defaults: backbone
``nvidia/Cosmos-Reason2-2B``, built from LeRobot's hard-coded copy of its config, so nothing is
downloaded) and an empty ``model.safetensors``: transformers' loader creates every parameter as a
missing key (its documented behaviour, re-initialised), under the same fast initialisation. Weights
in bfloat16 (``model_params_fp32=False``; LeRobot's default ``model_params_fp32=True`` keeps float32
master weights, twice the weight bytes) with LeRobot's bf16 autocast (``use_bf16=True``). The batch is
model-ready (the groot processor needs the Cosmos tokenizer from the hub), laid out as the processor
lays it out (``bench_groot.make_batch``): cameras of 256x256 (GR00T's image target size; 64 tokens
each after the 2x2 merge) and a short instruction.

Configurations: stock full fine-tuning, stock expert-only (pi: ``train_expert_only=True,
freeze_vision_encoder=True``; groot: LeRobot's default ``GrootConfig()``, ``tune_llm=False,
tune_visual=False``: the backbone frozen, projector + vlln + DiT trained), APT Stage 1, APT Stage 2
with the VLM frozen, and APT Stage 2 with LoRA on the VLM. The claim under test: APT Stage 1 of the
real pi0 trains on a machine where stock expert-only runs out of memory.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
CONFIGS = ("full_ft", "expert_only", "apt_stage1", "apt_stage2", "apt_stage2_lora")
LABELS = {"full_ft": "stock full FT", "expert_only": "stock expert-only", "apt_stage1": "APT Stage 1",
          "apt_stage2": "APT Stage 2 (frozen VLM)", "apt_stage2_lora": "APT Stage 2 (LoRA VLM)"}
# GR00T has no expert-only flag: its stock default (backbone frozen) takes that row.
GROOT_LABELS = {**LABELS, "expert_only": "stock default (frozen backbone)"}
POLICIES = ("pi0", "pi05", "groot")
GB = 10**9
# Initialisers skip tensors this large while the policy is built; they are filled once afterwards.
FAST_INIT_NUMEL = 1 << 16
FAST_INIT_STD = 0.02


def label(policy: str, config: str) -> str:
    return (GROOT_LABELS if policy == "groot" else LABELS)[config]


# --------------------------------------------------------------------------------------- fast init
class fast_init:
    """While active, every ``torch.nn.init`` initialiser (and transformers' recorded copies) leaves a
    tensor of ``FAST_INIT_NUMEL`` elements or more untouched; small tensors get their real init.

    Call :func:`fill_large_parameters` on the built module afterwards: the skipped tensors hold
    whatever ``torch.empty`` gave them until then.
    """

    def __enter__(self):
        import torch
        import transformers.initialization as hf_init

        self._saved: list[tuple[Any, str, Any]] = []

        def skipping(original):
            def init(tensor, *args, **kwargs):
                if tensor.numel() >= FAST_INIT_NUMEL:
                    return tensor
                return original(tensor, *args, **kwargs)
            return init

        for name, original in list(hf_init.TORCH_INIT_FUNCTIONS.items()):
            self._saved.append((hf_init.TORCH_INIT_FUNCTIONS, name, original))
            hf_init.TORCH_INIT_FUNCTIONS[name] = skipping(original)
            if hasattr(torch.nn.init, name):
                self._saved.append((torch.nn.init, name, getattr(torch.nn.init, name)))
                setattr(torch.nn.init, name, skipping(getattr(torch.nn.init, name)))
        return self

    def __exit__(self, *exc):
        for target, name, original in reversed(self._saved):
            if isinstance(target, dict):
                target[name] = original
            else:
                setattr(target, name, original)
        return False


def fill_large_parameters(module: Any, seed: int = 0) -> int:
    """Write every parameter skipped by :class:`fast_init` once (uniform, std ``FAST_INIT_STD``);
    returns how many elements were written."""
    import torch

    torch.manual_seed(seed)
    bound = FAST_INIT_STD * 3**0.5
    written = 0
    with torch.no_grad():
        for p in module.parameters():
            if p.numel() >= FAST_INIT_NUMEL:
                if p.is_meta:
                    raise RuntimeError(f"parameter of shape {tuple(p.shape)} left on the meta device")
                p.uniform_(-bound, bound)
                written += p.numel()
    return written


# --------------------------------------------------------------------------------------- child
def _vm_kib(field: str) -> int:
    m = re.search(rf"^{field}:\s+(\d+)\s+kB", Path("/proc/self/status").read_text(), re.M)
    return int(m.group(1)) if m else 0


def child(policy: str, config: str, batch: int, steps: int, threads: int, quick: bool) -> None:
    """Build, step, and print one JSON line with the figures (run in a fresh interpreter)."""
    import torch

    torch.set_num_threads(threads)
    sys.path.insert(0, str(HERE))
    import bench_pi as common

    s = dict(common.SIZES["quick" if quick else "real"], batch=batch, dtype="bfloat16")
    print(json.dumps(dict(phase="building", rss_gb=_vm_kib("VmRSS") * 1024 / GB)), flush=True)
    t0 = time.perf_counter()
    build_config, extra = config, None
    if config == "apt_stage2_lora":
        build_config, extra = "apt_stage2", dict(vlm_mode="lora")
    import transformers.modeling_utils as hf_modeling

    # Parameters are born bf16, so no fp32 copy of 3.3B weights ever exists. transformers builds each
    # sub-model under its config's dtype (LeRobot sets float32 there), through local_torch_dtype;
    # route that to bfloat16 too while the policy is built.
    hf_local_dtype = hf_modeling.local_torch_dtype

    def bf16_local_dtype(dtype, model_class_name=None):
        return hf_local_dtype(torch.bfloat16 if dtype == torch.float32 else dtype, model_class_name)

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    hf_modeling.local_torch_dtype = bf16_local_dtype
    try:
        with fast_init():
            if policy == "groot":
                pol, data = build_groot(build_config, quick, batch, extra)
            else:
                pol = common.build_policy(policy, build_config, s, apt_extra=extra)
    finally:
        torch.set_default_dtype(previous)
        hf_modeling.local_torch_dtype = hf_local_dtype
    if policy != "groot":
        # LeRobot's dtype="bfloat16" casts paligemma_with_expert only (keeping its vision tower, projector
        # and norms in float32); the small projections around it stay float32. Restore that layout for
        # what the bf16 default created outside it (a few MB).
        for name, module in pol.model.named_children():
            if name != "paligemma_with_expert":
                module.float()
        data = common.make_batch(policy, s)
    filled = fill_large_parameters(pol)
    build_s = time.perf_counter() - t0
    params = list(pol.parameters())
    info = dict(params_total=sum(p.numel() for p in params),
                params_trainable=sum(p.numel() for p in params if p.requires_grad),
                weight_bytes=sum(p.numel() * p.element_size() for p in params), build_s=build_s,
                fast_filled=filled, dtypes=sorted({str(p.dtype) for p in params}))
    del params
    after_build = _vm_kib("VmRSS") * 1024
    print(json.dumps(dict(phase="stepping", rss_gb=after_build / GB, **info)), flush=True)
    cfg = pol.config
    opt = torch.optim.AdamW(pol.get_optim_params(), lr=cfg.optimizer_lr, betas=cfg.optimizer_betas,
                            eps=cfg.optimizer_eps, weight_decay=cfg.optimizer_weight_decay)
    times, losses = [], []
    before_optimizer = 0
    for i in range(steps):
        torch.manual_seed(10_000 + i)
        t = time.perf_counter()
        # The phase lines say where a child killed at the cap was (the parent keeps the last one).
        print(json.dumps(dict(phase="forward", after_build_gb=after_build / GB, **info)), flush=True)
        loss, _ = pol.forward(data)
        print(json.dumps(dict(phase="backward", after_build_gb=after_build / GB, **info)), flush=True)
        loss.backward()
        # High-water mark before AdamW's state first exists: what forward + backward alone need.
        before_optimizer = max(before_optimizer, _vm_kib("VmHWM") * 1024)
        print(json.dumps(dict(phase="optimizer step", peak_before_optimizer_gb=before_optimizer / GB,
                              after_build_gb=after_build / GB, **info)), flush=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
        losses.append(float(loss.detach()))
    print(json.dumps(dict(phase="done", peak_gb=_vm_kib("VmHWM") * 1024 / GB, after_build_gb=after_build / GB,
                          peak_before_optimizer_gb=before_optimizer / GB, step_s=times, losses=losses, **info)),
          flush=True)


def build_groot(config: str, quick: bool, batch: int, apt_extra: dict[str, Any] | None):
    """The real-size (or, ``quick``, tiny) LeRobot GR00T N1.7 policy for ``config`` and a model-ready batch.

    Real size: a GR00T directory with ``GR00TN17Config()`` (LeRobot's N1.7 defaults, Cosmos-Reason2-2B
    backbone from LeRobot's hard-coded config) and an empty ``model.safetensors``, so the transformers
    loader creates every parameter as a missing key; nothing is downloaded and no weights are written.
    """
    import tempfile

    import torch
    from lerobot.configs.types import FeatureType, PolicyFeature
    from lerobot.policies.groot.configuration_groot import GrootConfig
    from lerobot.policies.groot.groot_n1_7 import GR00TN17Config
    from lerobot.policies.groot.modeling_groot import GrootPolicy
    from safetensors.torch import save_file

    import bench_groot
    from apt_plugins import AptConfig
    from apt_plugins_lerobot_groot.configuration_apt_groot import APTGrootConfig
    from apt_plugins_lerobot_groot.modeling_apt_groot import APTGrootPolicy

    root = Path(tempfile.mkdtemp(prefix="bench_memory_groot_"))
    if quick:
        s = dict(bench_groot.SIZES["quick"], batch=batch)
        directory = bench_groot.write_base_model(root, s)
    else:
        # The real Cosmos-Reason2-2B special token ids, image 256x256 (16 x 16 patches of 16 px, 64
        # tokens after the 2x2 merge), N1.7's horizon 40 and 132-D state/action padding.
        s = dict(bench_groot.SIZES["mid"], batch=batch, vocab=151936 + bench_groot.IMAGE_TOKEN_OFFSET,
                 patch=16, merge=2, temporal=2, image_grid=(1, 16, 16), cameras=2, task_len=24, horizon=40,
                 max_state_dim=132, max_action_dim=132, state_dim=14, action_dim=14)
        directory = root / "groot"
        GR00TN17Config().save_pretrained(directory)
        save_file({}, str(directory / "model.safetensors"), metadata={"format": "pt"})
    px = s["image_grid"][1] * s["patch"]
    inputs = {k: PolicyFeature(type=FeatureType.VISUAL, shape=(3, px, px)) for k in bench_groot.camera_keys(s)}
    inputs["observation.state"] = PolicyFeature(type=FeatureType.STATE, shape=(s["state_dim"],))
    outputs = {"action": PolicyFeature(type=FeatureType.ACTION, shape=(s["action_dim"],))}
    fields: dict[str, Any] = dict(
        device="cpu", use_bf16=True, model_params_fp32=False, chunk_size=s["horizon"], n_action_steps=s["horizon"],
        max_state_dim=s["max_state_dim"], max_action_dim=s["max_action_dim"], base_model_path=str(directory),
        input_features=inputs, output_features=outputs,
    )
    if config == "full_ft":
        cfg, cls = GrootConfig(**fields, tune_llm=True, tune_visual=True), GrootPolicy
    elif config == "expert_only":
        cfg, cls = GrootConfig(**fields), GrootPolicy
    elif config == "apt_stage1":
        cfg, cls = APTGrootConfig(**fields, apt=AptConfig(stage=1).to_settings()), APTGrootPolicy
    elif config == "apt_stage2":
        apt = AptConfig(**{"stage": 2, "vlm_mode": "frozen", **(apt_extra or {})})
        cfg, cls = APTGrootConfig(**fields, apt=apt.to_settings()), APTGrootPolicy
    else:
        raise ValueError(config)
    torch.manual_seed(0)
    pol = cls(cfg).train()
    data = bench_groot.make_batch(s)
    if not quick:
        # make_batch puts the special ids at the top of the vocabulary; use the real Cosmos ones.
        ids = bench_groot.special_ids(s)
        real = dict(image=151655, video=151656, vision_start=151652, vision_end=151653, im_start=151644,
                    im_end=151645, newline=198, pad=151643)
        remapped = data["input_ids"].clone()
        for name, value in ids.items():
            remapped[data["input_ids"] == value] = real[name]
        data["input_ids"] = remapped
    return pol, data


# --------------------------------------------------------------------------------------- parent
def available_bytes() -> int:
    import psutil

    return psutil.virtual_memory().available


def tree_rss(proc: Any) -> int:
    """RSS of ``proc`` and its children (bytes); 0 once it is gone."""
    import psutil

    try:
        procs = [proc, *proc.children(recursive=True)]
        return sum(p.memory_info().rss for p in procs)
    except psutil.NoSuchProcess:
        return 0


def measure(policy: str, config: str, args: argparse.Namespace) -> dict[str, Any]:
    """One child under the watchdog; the row's outcome (``ok``, ``exceeds``, ``not measured``, ``failed``)."""
    import psutil

    margin = GB // 2  # room for everyone else's growth while the child runs
    cap = args.cap_gb
    if args.start_before is not None and time.time() > args.start_before:
        return dict(outcome="not measured", cap_gb=cap, reason="--start-before time passed before this row")
    deadline = time.monotonic() + args.wait_memory
    while available_bytes() < cap * GB + margin:
        if time.monotonic() > deadline:
            spare = (available_bytes() - margin) / GB
            if args.min_cap_gb is not None and spare >= args.min_cap_gb:
                cap = round(spare, 1)  # a lower cap, recorded in the row: "exceeds" then means "exceeds this"
                break
            return dict(outcome="not measured", cap_gb=cap,
                        reason=f"only {available_bytes() / GB:.1f} GB available, {cap + margin / GB:.1f} GB needed")
        time.sleep(5)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", policy, config, "--batch", str(args.batch),
           "--steps", str(args.steps), "--threads", str(args.threads)] + (["--quick"] if args.quick else [])
    started = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1"))
    ps = psutil.Process(proc.pid)
    peak, outcome = 0, None
    while proc.poll() is None:
        rss = tree_rss(ps)
        peak = max(peak, rss)
        if rss > cap * GB:
            proc.send_signal(signal.SIGKILL)  # before the machine swaps or the OOM killer picks a victim
            outcome = "exceeds"
        elif available_bytes() < args.floor_gb * GB:
            # Other processes grew meanwhile: give the memory back before the kernel picks a victim.
            proc.send_signal(signal.SIGKILL)
            outcome = "stopped"
            low = available_bytes() / GB
        elif time.monotonic() - started > args.timeout:
            proc.send_signal(signal.SIGKILL)
            outcome = "timed out"
        time.sleep(0.05)
    out, err = proc.communicate()
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    last = lines[-1] if lines else {}
    row = dict(outcome=outcome or ("ok" if last.get("phase") == "done" else "failed"), cap_gb=cap,
               sampled_peak_gb=peak / GB, wall_s=time.monotonic() - started, phase=last.get("phase"),
               **{k: v for k, v in last.items() if k != "phase"})
    if row["outcome"] == "stopped":
        row["reason"] = (f"machine memory ran low ({low:.1f} GB available, floor {args.floor_gb:g} GB) at "
                         f"{peak / GB:.1f} GB; re-run on a quieter machine")
    if row["outcome"] == "failed":
        row["error"] = err.strip().splitlines()[-1] if err.strip() else f"exit code {proc.returncode}"
    return row


def render_markdown(report: dict[str, Any]) -> str:
    from bench_pi import fmt_table

    rows = []
    for policy, configs in report["rows"].items():
        for config, r in configs.items():
            cap = r.get("cap_gb", report["cap_gb"])
            if r["outcome"] == "ok":
                peak = f"{r['peak_gb']:.1f}"
                verdict = f"fits in {cap:g} GB"
            elif r["outcome"] == "exceeds":
                peak = f"> {cap:g}"
                verdict = f"exceeds {cap:g} GB (killed during {r.get('phase') or 'start-up'})"
            else:
                peak = "-"
                verdict = f"{r['outcome']}: {r.get('reason') or r.get('error') or ''}".strip()
            weights = f"{r['weight_bytes'] / GB:.1f}" if r.get("weight_bytes") else "-"
            trainable = (f"{r['params_trainable'] / 1e6:.1f}M / {r['params_total'] / 1e6:.1f}M"
                         if r.get("params_total") else "-")
            step = f"{r['step_s'][-1]:.0f}" if r.get("step_s") else "-"
            after_build = r.get("after_build_gb") or r.get("rss_gb")  # rss_gb: the "stepping" line's
            built = f"{after_build:.1f}" if after_build and r.get("phase") != "building" else "-"
            before_opt = f"{r['peak_before_optimizer_gb']:.1f}" if r.get("peak_before_optimizer_gb") else "-"
            rows.append([policy, label(policy, config), trainable, weights, built, before_opt, peak, step, verdict])
    return fmt_table(["policy", "configuration", "trainable / total params", "weights (GB)", "RSS after build (GB)",
                      "peak before AdamW step (GB)", "peak RSS, one step (GB)", "step (s)", "verdict (cap in force)"],
                     rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policies", nargs="+", choices=POLICIES, default=list(POLICIES))
    ap.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=1, help="training steps per child (AdamW state appears at the first)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads in the child")
    ap.add_argument("--cap-gb", type=float, default=None,
                    help="kill a child whose RSS passes this many GB (10^9 bytes; default 14, the shared-machine "
                         "cap; quick: 4)")
    ap.add_argument("--wait-memory", type=float, default=600.0, metavar="SECONDS",
                    help="wait this long for cap + 0.5 GB to be available before marking a row not measured")
    ap.add_argument("--min-cap-gb", type=float, default=None,
                    help="when cap + 0.5 GB never became available, measure under a lower cap (what is available "
                         "minus 0.5 GB) if that is at least this many GB; the row records the cap it ran under")
    ap.add_argument("--floor-gb", type=float, default=1.0,
                    help="also kill the child when the machine's available memory falls below this (other "
                         "processes grew), so the kernel's OOM killer never has to pick a victim")
    ap.add_argument("--timeout", type=float, default=1800.0, help="kill a child that runs longer (seconds)")
    ap.add_argument("--start-before", type=_dt.datetime.fromisoformat, default=None, metavar="ISO_TIME",
                    help="start no row after this time (e.g. 2026-12-02T08:05+00:00); later rows read "
                         "'not measured' (a shared machine's time slot)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: checks the script and the watchdog")
    ap.add_argument("--json-out", type=Path, default=None)
    ap.add_argument("--child", nargs=2, metavar=("POLICY", "CONFIG"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.cap_gb is None:
        args.cap_gb = 4.0 if args.quick else 14.0
    if args.start_before is not None:
        args.start_before = args.start_before.timestamp()
    if args.batch < 1 or args.steps < 1 or args.threads < 1 or args.cap_gb <= 0:
        ap.error("--batch, --steps and --threads must be >= 1 and --cap-gb > 0")
    if args.child:
        child(*args.child, batch=args.batch, steps=args.steps, threads=args.threads, quick=args.quick)
        return 0
    sys.path.insert(0, str(HERE))
    import bench_pi as common

    command = "python benchmarks/bench_memory.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    report: dict[str, Any] = dict(date=_dt.datetime.now().astimezone().isoformat(timespec="seconds"),
                                  command=command, machine=common.machine_info(), code=common.code_version(),
                                  cap_gb=args.cap_gb, batch=args.batch, steps=args.steps, threads=args.threads,
                                  size="quick" if args.quick else "real", rows={})
    print(f"bench_memory: size={report['size']} batch={args.batch} cap={args.cap_gb:g} GB, one child at a time",
          flush=True)
    for policy in args.policies:
        report["rows"][policy] = {}
        for config in args.configs:
            row = measure(policy, config, args)
            report["rows"][policy][config] = row
            print(f"  {policy:5s} {label(policy, config):31s} {row['outcome']:12s} "
                  f"peak {row.get('peak_gb', row['sampled_peak_gb'] if 'sampled_peak_gb' in row else 0):.2f} GB "
                  f"(sampled {row.get('sampled_peak_gb', 0):.2f}) wall {row.get('wall_s', 0):.0f} s", flush=True)
            if args.json_out:  # after every row: a later kill of this script keeps what was measured
                args.json_out.parent.mkdir(parents=True, exist_ok=True)
                args.json_out.write_text(json.dumps(report, indent=2))
    print()
    print(render_markdown(report))
    if args.json_out:
        print(f"\nwrote {args.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
