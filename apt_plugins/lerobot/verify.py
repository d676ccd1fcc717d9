"""``apt-plugins verify``: the conformance invariants, run on a user's own APT checkpoint.

Checks (each PASS/FAIL, plus INFO lines):

- the checkpoint loads strictly into its APT policy type;
- Stage 1: the training loss and the sampled actions are bit-identical under swapped, empty and
  shuffled instructions;
- with ``--parent`` (the Stage-1 checkpoint a Stage-2 run started from): every tensor the child keeps
  frozen is bit-identical to the parent's, and promoting the parent with the child's APT config
  reproduces the parent exactly (loss and actions, fixed noise);
- Stage 2: gate statistics per fusion layer and how much the instruction moves the actions.

Batches come from a few frames of the user's dataset (through the checkpoint's own processors),
or, without a dataset, from the adapter's probe batch.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["Check", "verify", "format_checks", "VARIANTS"]

#: The instruction changes a Stage-1 policy must be blind to.
VARIANTS = ("swapped", "empty", "shuffled")
ALTERNATIVE_TASK = "move the object to the far left corner"


@dataclass
class Check:
    """One line of the verify table."""

    name: str
    status: str  # PASS, FAIL or INFO
    detail: str


def format_checks(checks: list[Check]) -> str:
    """The pass/fail table."""
    width = max((len(c.name) for c in checks), default=10)
    lines = [f"{'check':<{width}}  status  detail"]
    lines += [f"{c.name:<{width}}  {c.status:<6}  {c.detail}" for c in checks]
    failed = sum(c.status == "FAIL" for c in checks)
    passed = sum(c.status == "PASS" for c in checks)
    lines.append(f"{passed} passed, {failed} failed")
    return "\n".join(lines)


def _load(directory: Path, config: Any = None):
    from lerobot.configs.policies import PreTrainedConfig
    from lerobot.policies.factory import get_policy_class

    from .. import AptError

    config = config or PreTrainedConfig.from_pretrained(directory)
    if not config.type.startswith("apt_"):
        raise AptError(f"{directory} is a plain {config.type!r} checkpoint, not an APT one; "
                       "convert it with `apt-plugins retrofit` first.")
    config.device = "cpu"
    return get_policy_class(config.type).from_pretrained(directory, config=config), config


class _Batches:
    """The original batch and its instruction variants, from a dataset or from the adapter's probe."""

    def __init__(self, policy: Any, directory: Path, repo_id: str | None, root: str | None, frames: int, seed: int):
        self.policy = policy
        self.seed = seed
        self.raw = None
        if repo_id is not None or root is not None:
            self._from_dataset(directory, repo_id or "local/dataset", root, frames)

    def _from_dataset(self, directory: Path, repo_id: str, root: str | None, frames: int) -> None:
        import torch
        from lerobot.datasets.lerobot_dataset import LeRobotDataset, LeRobotDatasetMetadata
        from lerobot.policies.factory import make_pre_post_processors

        config = self.policy.config
        meta = LeRobotDatasetMetadata(repo_id, root=root)
        deltas = {"action": [i / meta.fps for i in range(config.chunk_size)]}
        dataset = LeRobotDataset(repo_id, root=root, delta_timestamps=deltas)
        picks = torch.linspace(0, len(dataset) - 1, frames).long().tolist()
        items = [dataset[i] for i in picks]
        raw: dict[str, Any] = {}
        for key, value in items[0].items():
            if isinstance(value, torch.Tensor):
                raw[key] = torch.stack([it[key] for it in items])
            elif key == "task":
                raw[key] = [it[key] for it in items]
        for key, value in list(raw.items()):
            if key.startswith("observation.images") and value.dtype == torch.uint8:
                raw[key] = value.float() / 255
        self.raw = raw
        self.preprocessor, _ = make_pre_post_processors(config, pretrained_path=str(directory))

    def get(self, variant: str = "original") -> dict[str, Any]:
        if self.raw is None:
            return self.policy.apt_adapter.probe_batch(self.policy, variant=variant, seed=self.seed)
        tasks = list(self.raw["task"])
        rng = random.Random(self.seed)
        if variant == "swapped":
            rolled = tasks[1:] + tasks[:1]
            tasks = rolled if rolled != tasks else [ALTERNATIVE_TASK] * len(tasks)
        elif variant == "empty":
            tasks = [""] * len(tasks)
        elif variant == "shuffled":
            shuffled = []
            for task in tasks:
                words = task.split()
                rng.shuffle(words)
                shuffled.append(" ".join(words))
            tasks = shuffled
        return self.preprocessor({**self.raw, "task": tasks})


def _outputs(policy: Any, batch: dict[str, Any], seed: int):
    import torch

    with torch.no_grad():
        torch.manual_seed(seed)
        loss, _ = policy.forward(batch)
        torch.manual_seed(seed)
        policy.reset()
        actions = policy.predict_action_chunk({k: v for k, v in batch.items() if k != "action"})
    return loss, actions


def _diff(a: Any, b: Any) -> float:
    return float((a.detach().float() - b.detach().float()).abs().max())


def verify(
    checkpoint: str | Path,
    parent: str | Path | None = None,
    dataset_repo_id: str | None = None,
    dataset_root: str | None = None,
    frames: int = 4,
    seed: int = 0,
) -> list[Check]:
    """Run the invariants on ``checkpoint`` (and against ``parent``); return the checks."""
    from .. import apt_state, gate_statistics
    from . import register_lerobot_types
    from .policy import resolve_checkpoint_dir

    register_lerobot_types()
    checks: list[Check] = []
    directory = resolve_checkpoint_dir(checkpoint)
    try:
        policy, config = _load(directory)
    except Exception as exc:  # the error message is the evidence
        return [Check("loads strictly", "FAIL", f"{type(exc).__name__}: {exc}")]
    policy.eval()
    apt = apt_state(policy).config
    report = policy.apt_load_report
    checks.append(Check("loads strictly", "PASS",
                        f"{config.type}, APT stage {apt.stage}, {len(report.loaded)} tensors, none missing or unexpected"))
    batches = _Batches(policy, directory, dataset_repo_id, dataset_root, frames, seed)
    source = f"{frames} dataset frames" if batches.raw is not None else "the adapter's probe batch"
    original = batches.get()
    loss0, actions0 = _outputs(policy, original, seed)

    for variant in VARIANTS:
        loss, actions = _outputs(policy, batches.get(variant), seed)
        d_loss, d_act = _diff(loss0, loss), _diff(actions0, actions)
        if apt.stage == 1:
            ok = d_loss == 0.0 and d_act == 0.0
            checks.append(Check(f"stage 1 ignores {variant} instruction", "PASS" if ok else "FAIL",
                                f"|loss diff| {d_loss:.3g}, max |actions diff| {d_act:.3g} on {source}"))
        else:
            checks.append(Check(f"language sensitivity ({variant})", "INFO",
                                f"max |actions diff| {d_act:.3g}, |loss diff| {d_loss:.3g} on {source}"))

    if apt.stage == 2:
        stats = gate_statistics(policy)
        layers = sorted({k.rsplit("/", 1)[1] for k in stats}, key=lambda x: int(x) if x.isdigit() else x)
        summary = ", ".join(f"{l}: {stats[f'apt/gate_mean/{l}']:.3f}±{stats[f'apt/gate_std/{l}']:.3f}" for l in layers)
        checks.append(Check("gate values (mean±std per layer)", "INFO", summary or "no fusion layers"))

    if parent is not None:
        checks += _against_parent(policy, config, resolve_checkpoint_dir(parent), original, seed)
    return checks


def _against_parent(child: Any, child_config: Any, parent_dir: Path, batch: dict[str, Any], seed: int) -> list[Check]:
    import copy

    import torch

    from .. import apt_state

    checks: list[Check] = []
    try:
        parent, _ = _load(parent_dir)
    except Exception as exc:
        return [Check("parent loads", "FAIL", f"{type(exc).__name__}: {exc}")]
    parent.eval()
    parent_stage = apt_state(parent).config.stage
    child_apt = apt_state(child).config
    parent_params = dict(parent.named_parameters())
    frozen = [n for n, p in child.named_parameters() if not p.requires_grad and n in parent_params]
    changed = [n for n in frozen if not torch.equal(dict(child.named_parameters())[n], parent_params[n])]
    checks.append(Check("frozen tensors identical to the parent", "FAIL" if changed else "PASS",
                        f"{len(frozen) - len(changed)}/{len(frozen)} identical"
                        + (f"; changed: {', '.join(changed[:3])}" if changed else "")))
    if child_apt.stage == 2 and parent_stage == 1:
        config = copy.deepcopy(child_config)
        promoted = type(child).from_pretrained(parent_dir, config=config)
        promoted.eval()
        l_parent, a_parent = _outputs(parent, batch, seed)
        l_promoted, a_promoted = _outputs(promoted, batch, seed)
        d_loss, d_act = _diff(l_parent, l_promoted), _diff(a_parent, a_promoted)
        ok = d_loss == 0.0 and d_act == 0.0
        fresh = promoted.apt_load_report.fresh
        checks.append(Check("stage 2 at step 0 equals the stage-1 parent", "PASS" if ok else "FAIL",
                            f"|loss diff| {d_loss:.3g}, max |actions diff| {d_act:.3g}; {len(fresh)} fresh tensors, all "
                            + ("fusion" if all(".apt_" in k or ".lora_" in k for k in fresh) else "NOT fusion")))
    else:
        checks.append(Check("stage 2 at step 0 equals the stage-1 parent", "INFO",
                            f"skipped: child stage {child_apt.stage}, parent stage {parent_stage}"))
    return checks
