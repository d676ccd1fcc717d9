"""The arms of the reproduction, trained the way LeRobot trains, and their scoring.

Every arm sees the same data and the same number of steps: ``pretrain_steps`` on the many-layout
robot pretraining set, then ``posttrain_steps`` on the small imbalanced post-training set (the
paper's pretrain -> post-train protocol). The optimizer and schedule are LeRobot's own presets
(``PI0Config.get_optimizer_preset()`` / ``get_scheduler_preset()``) over the policy's own
``get_optim_params()`` (stock: every parameter; APT: :func:`apt_plugins.param_groups`), and a step
is ``lerobot-train``'s update (forward, backward, grad-norm clip, optimizer, scheduler,
``policy.update()``).

- ``stock_full``: stock ``PI0Policy``, random expert, the VLM trains (one learning rate);
- ``stock_expert``: stock ``PI0Policy`` with ``train_expert_only=True`` (VLM frozen);
- ``apt_frozen``: ``apt_pi0`` Stage 1 (half the pretraining steps), promoted through a checkpoint
  to Stage 2 (the other half, then post-training), VLM frozen;
- ``apt_lora``: the same Stage-1 checkpoint, Stage 2 with LoRA on the VLM;
- ``apt_frozen_gate1`` (control, seed 0 only): ``apt_frozen`` with ``gate_lr_multiplier=1`` (the
  gates' old learning rate), to show what the gate fix changes.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import world
from .models import ModelSize, Tokenizer, build_apt, build_stock, load_apt, load_vlm, to_batch

__all__ = ["ARMS", "TrainSettings", "run_seed_job", "score", "JOBS"]

ARMS = ("stock_full", "stock_expert", "apt_frozen", "apt_lora", "apt_frozen_gate1")
#: which arms one worker job trains (the APT arms share their Stage-1 checkpoint)
JOBS = {"stock_full": ("stock_full",), "stock_expert": ("stock_expert",),
        "apt": ("apt_frozen", "apt_lora", "apt_frozen_gate1")}
SUCCESS_RADIUS = 0.12  # in [-1, 1] image units: about 3.4 px of 56, i.e. on the object


@dataclass(frozen=True)
class TrainSettings:
    """Step budget and optimizer settings shared by every arm."""

    pretrain_steps: int
    posttrain_steps: int
    batch_size: int = 32
    lr: float = 1e-3
    decay_lr: float = 1e-4
    warmup_steps: int = 100
    lora_rank: int = 8
    eval_batch: int = 128
    log_every: int = 50


def _optim_fields(settings: TrainSettings, steps: int) -> dict:
    return dict(optimizer_lr=settings.lr, scheduler_decay_lr=settings.decay_lr,
                scheduler_warmup_steps=min(settings.warmup_steps, max(1, steps // 10)), scheduler_decay_steps=steps)


def _set_schedule(policy: Any, settings: TrainSettings, steps: int) -> None:
    # The presets read these config fields; each phase is its own run with its own schedule.
    for key, value in _optim_fields(settings, steps).items():
        setattr(policy.config, key, value)


def train_phase(policy: Any, data: dict, tokenizer: Tokenizer, settings: TrainSettings, steps: int, seed: int,
                label: str, log) -> list[tuple[int, float, list[float]]]:
    """Train ``policy`` for ``steps`` on ``data`` the way ``lerobot-train`` does.

    :returns: ``(step, mean loss since the last point, mean gate value per fusion layer)`` every
        ``log_every`` steps.
    """
    from apt_plugins import gate_statistics

    if steps <= 0:
        return []
    _set_schedule(policy, settings, steps)
    params = policy.get_optim_params()
    optimizer = policy.config.get_optimizer_preset().build(params)
    scheduler = policy.config.get_scheduler_preset().build(optimizer, steps)
    clip = policy.config.optimizer_grad_clip_norm
    trainable = [p for p in policy.parameters() if p.requires_grad]
    policy.train()
    g = torch.Generator().manual_seed(seed)
    n = data["images"].shape[0]
    curve, running, start = [], [], time.time()
    for step in range(1, steps + 1):
        index = torch.randint(0, n, (settings.batch_size,), generator=g)
        batch = to_batch(data, index, tokenizer)
        loss, _ = policy.forward(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if hasattr(policy, "update"):
            policy.update()
        running.append(loss.item())
        if step % settings.log_every == 0 or step == steps:
            gates = [v for k, v in gate_statistics(policy).items() if "gate_mean" in k]
            curve.append((step, float(np.mean(running)), gates))
            running = []
    gates = gate_statistics(policy)
    gate_text = " gates " + " ".join(f"{v:.3f}" for k, v in gates.items() if "mean" in k) if gates else ""
    log(f"{label}: {steps} steps, loss {curve[0][1]:.3f} -> {curve[-1][1]:.3f}{gate_text} "
        f"({time.time() - start:.0f} s, {(time.time() - start) / steps * 1000:.0f} ms/step)")
    return curve


@torch.no_grad()
def score(policy: Any, data: dict, tokenizer: Tokenizer, batch: int = 128, seed: int = 0) -> dict[str, float]:
    """Success against the scripted expert on first frames (random starts).

    - ``success``: the target the predicted chunk heads for is within :data:`SUCCESS_RADIUS` of the
      named object (precision and choice together);
    - ``choice``: the object nearest that target is the named one (chance is about 1/3);
    - ``action_error``: mean distance of the predicted waypoints to the expert's.
    """
    policy.eval()
    n = data["images"].shape[0]
    heads, errors = [], []
    for i in range(0, n, batch):
        index = torch.arange(i, min(n, i + batch))
        obs = to_batch(data, index, tokenizer, with_action=False)
        torch.manual_seed(seed + i)
        policy.reset()
        chunk = policy.predict_action_chunk(obs)[..., :2].float().numpy()
        state = data["state"][index].numpy()
        heads.append(world.target_from_chunk(state, chunk))
        errors.append(np.linalg.norm(chunk - data["action"][index].numpy(), axis=-1).mean(axis=1))
    policy.train()
    head = np.concatenate(heads)
    centres = data["centres"].numpy()
    target = data["target"].numpy()
    named = centres[np.arange(n), target]
    return {
        "success": float((np.linalg.norm(head - named, axis=-1) < SUCCESS_RADIUS).mean()),
        "choice": float((world.nearest_object(head, centres) == target).mean()),
        "action_error": float(np.concatenate(errors).mean()),
    }


def _evaluate(policy: Any, evals: dict[str, dict], tokenizer: Tokenizer, settings: TrainSettings) -> dict:
    from apt_plugins import gate_statistics

    from .grounding import grounding_accuracy

    result = {name: score(policy, data, tokenizer, settings.eval_batch) for name, data in evals.items()}
    result["grounding"] = grounding_accuracy(policy, tokenizer)
    gates = gate_statistics(policy)
    result["gates"] = [v for k, v in gates.items() if "gate_mean" in k]
    return result


def run_seed_job(job: str, seed: int, workdir: str, size: dict, settings: dict, log_path: str | None = None) -> dict:
    """Train and score the arms of one worker job (see :data:`JOBS`) for one seed.

    Runs in a worker process: loads the datasets and the cached VLM from ``workdir``, writes
    ``<workdir>/results/<arm>_seed<seed>.json`` per arm and returns ``{arm: result}``.
    """
    from safetensors.torch import load_file

    from apt_plugins import AptConfig

    from .data import EVAL_SPLITS, load_split

    torch.set_num_threads(1)
    ws = Path(workdir)
    size_ = ModelSize(**size)
    settings_ = TrainSettings(**settings)
    logf = open(log_path, "a") if log_path else None  # noqa: SIM115 - closed below

    def log(msg: str) -> None:
        line = f"[{job} seed {seed}] {msg}"
        if logf:
            logf.write(line + "\n")
            logf.flush()
        else:
            print(line, flush=True)

    tokenizer = Tokenizer(ws / "hub")
    pre = load_split(ws / "data" / "pretrain")
    post = load_split(ws / "data" / "posttrain")
    evals = {name.removeprefix("eval_"): load_split(ws / "data" / name, first_frame_only=True) for name in EVAL_SPLITS}
    vlm = load_file(str(ws / "vlm" / "vlm.safetensors"))
    half = settings_.pretrain_steps // 2
    results: dict[str, Any] = {}

    def finish(arm: str, policy: Any, curves: dict, start: float) -> None:
        res = _evaluate(policy, evals, tokenizer, settings_)
        res.update(arm=arm, seed=seed, curves=curves, seconds=round(time.time() - start, 1))
        out = ws / "results" / f"{arm}_seed{seed}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res))
        results[arm] = res
        summary = ", ".join(f"{k} {res[k]['success']:.2f}/{res[k]['choice']:.2f}" for k in evals)
        log(f"{arm} done ({res['seconds']:.0f} s): success/choice {summary}; grounding {res['grounding']}")

    try:
        if job in ("stock_full", "stock_expert"):
            start = time.time()
            policy = build_stock(size_, seed, train_expert_only=job == "stock_expert",
                                 **_optim_fields(settings_, settings_.pretrain_steps))
            load_vlm(policy, vlm)
            curves = {"pretrain": train_phase(policy, pre, tokenizer, settings_, settings_.pretrain_steps, seed,
                                              f"{job} pretrain", log)}
            curves["posttrain"] = train_phase(policy, post, tokenizer, settings_, settings_.posttrain_steps,
                                              seed + 1, f"{job} post-train", log)
            finish(job, policy, curves, start)
        elif job == "apt":
            start = time.time()
            stage1 = build_apt(size_, seed, AptConfig(stage=1), **_optim_fields(settings_, half))
            load_vlm(stage1, vlm)
            s1_curve = train_phase(stage1, pre, tokenizer, settings_, half, seed, "apt stage 1 (pretrain)", log)
            ckpt = ws / "checkpoints" / f"apt_stage1_seed{seed}"
            stage1.save_pretrained(ckpt)
            s1_seconds = time.time() - start
            del stage1
            variants = {
                "apt_frozen": AptConfig(stage=2),
                "apt_lora": AptConfig(stage=2, vlm_mode="lora", lora_rank=settings_.lora_rank,
                                      lora_alpha=settings_.lora_rank),
                "apt_frozen_gate1": AptConfig(stage=2, gate_lr_multiplier=1.0),
            }
            # The gate control needs one seed: it shows a mechanism (how far the gates move), not a score.
            for arm in JOBS["apt"] if seed == 0 else JOBS["apt"][:2]:
                start = time.time() - s1_seconds  # the shared Stage 1 counts towards every APT arm
                policy = load_apt(size_, ckpt, variants[arm], **_optim_fields(settings_, half))
                curves = {"stage1": s1_curve}
                curves["stage2"] = train_phase(policy, pre, tokenizer, settings_, settings_.pretrain_steps - half,
                                               seed + 2, f"{arm} stage 2 (pretrain)", log)
                curves["posttrain"] = train_phase(policy, post, tokenizer, settings_, settings_.posttrain_steps,
                                                  seed + 1, f"{arm} post-train", log)
                finish(arm, policy, curves, start)
        else:
            raise ValueError(f"unknown job {job!r}; expected one of {sorted(JOBS)}")
    finally:
        if logf:
            logf.close()
    return results


def settings_dict(settings: TrainSettings) -> dict:
    """JSON-friendly settings (for worker processes)."""
    return asdict(settings)

