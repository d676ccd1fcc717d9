"""The Stage 1 -> Stage 2 invariant report: the claims of apt-plugins, checked on tiny real models.

For each adapter with a conformance kit: build a Stage-1 policy, print its trainable/frozen table,
train it for a few steps while fingerprinting every frozen tensor, show that the prompt does not
change its loss or actions (and that the stock policy's do), promote the checkpoint to Stage 2,
show step-0 equality, train Stage 2 and print the gates. Exit status 1 if any claim fails.
"""

from __future__ import annotations

import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import AptConfig

__all__ = ["run_report", "Claim"]


@dataclass
class Claim:
    """One checked statement with its evidence."""

    adapter: str
    name: str
    passed: bool
    evidence: str


def _say(msg: str) -> None:
    print(msg, flush=True)


def _train(kit: Any, policy: Any, steps: int, lr: float, log_every: int, label: str) -> list[float]:
    import torch

    from . import param_groups

    optimizer = torch.optim.AdamW(param_groups(policy, lr, 0.01), lr=lr)
    policy.train()
    losses = []
    for step in range(steps):
        optimizer.zero_grad()
        loss = kit.loss(policy, kit.make_batch(instruction=step % 3, seed=step), seed=step)
        loss.backward()
        optimizer.step()
        if hasattr(policy, "update"):
            policy.update()
        losses.append(float(loss))
        if (step + 1) % log_every == 0 or step == steps - 1:
            _say(f"    {label} step {step + 1:>3}/{steps}  loss {losses[-1]:.4f}")
    return losses


def _diff(a: Any, b: Any) -> float:
    return float((a.detach().float() - b.detach().float()).abs().max())


def report_adapter(adapter: Any, steps: int = 20, lr: float = 3e-3) -> list[Claim]:
    """Run the story on one adapter and return the checked claims."""
    import torch

    from . import apt_state, fingerprint, gate_statistics

    kit = adapter.conformance_kit()
    claims: list[Claim] = []

    def claim(name: str, passed: bool, evidence: str) -> None:
        claims.append(Claim(adapter.name, name, bool(passed), evidence))
        _say(f"  [{'PASS' if passed else 'FAIL'}] {name}: {evidence}")

    _say(f"\n=== {adapter.name}: {adapter.description}")
    stage1 = kit.build(AptConfig(stage=1))
    _say(apt_state(stage1).report.format_table())
    frozen_before = fingerprint(stage1, frozen_only=True)
    _say(f"  fingerprinted {len(frozen_before)} frozen tensors; training Stage 1 for {steps} steps")
    losses1 = _train(kit, stage1, steps, lr, max(1, steps // 4), "stage 1")
    frozen_after = fingerprint(stage1, names=frozen_before)
    changed = [n for n in frozen_before if frozen_before[n] != frozen_after[n]]
    claim("frozen tensors bit-identical after Stage 1", not changed,
          f"{len(frozen_before) - len(changed)}/{len(frozen_before)} unchanged" + (f"; changed: {changed[:3]}" if changed else ""))

    stage1.eval()
    a, b, c = (kit.make_batch(instruction=i, seed=99) for i in range(3))
    stock = kit.build(None)
    stock_diff = _diff(kit.actions(stock, a), kit.actions(stock, b))
    apt_diff = max(_diff(kit.actions(stage1, a), kit.actions(stage1, x)) for x in (b, c))
    loss_diff = max(_diff(kit.loss(stage1, a), kit.loss(stage1, x)) for x in (b, c))
    claim("Stage 1 ignores the instruction", apt_diff == 0.0 and loss_diff == 0.0 and stock_diff > 0,
          f"max |actions diff| {apt_diff:.3g}, |loss diff| {loss_diff:.3g} under two changed instructions "
          f"(stock policy on the same inputs: {stock_diff:.3g})")

    with tempfile.TemporaryDirectory() as tmp:
        kit.save(stage1, Path(tmp) / "stage1")
        stage2 = kit.load(Path(tmp) / "stage1", AptConfig(stage=2))
    report = stage2.apt_load_report
    _say(f"  promoted: {report.summary()}")
    _say(apt_state(stage2).report.format_table())
    stage1.train(), stage2.train()
    d_loss = _diff(kit.loss(stage1, a), kit.loss(stage2, a))
    d_act = _diff(kit.actions(stage1, a), kit.actions(stage2, a))
    claim("Stage 2 at step 0 equals Stage 1", d_loss == 0.0 and d_act == 0.0,
          f"max |loss diff| {d_loss:.3g}, max |actions diff| {d_act:.3g} (fp32)")
    claim("only the fusion layers are new", all(".apt_" in k for k in report.fresh) and bool(report.fresh),
          f"{len(report.loaded)} tensors carried over, {len(report.fresh)} fresh")

    frozen2 = fingerprint(stage2, frozen_only=True)
    _say(f"  training Stage 2 for {steps} steps")
    losses2 = _train(kit, stage2, steps, lr, max(1, steps // 4), "stage 2")
    changed2 = [n for n, h in fingerprint(stage2, names=frozen2).items() if h != frozen2[n]]
    claim("frozen tensors bit-identical after Stage 2", not changed2, f"{len(frozen2) - len(changed2)}/{len(frozen2)} unchanged")
    gates = gate_statistics(stage2)
    means = [v for k, v in gates.items() if "gate_mean" in k]
    opened = _diff(kit.actions(stage2.eval(), a), kit.actions(stage2, b))
    claim("Stage 2 reads language through the gates after training", opened > 0,
          f"max |actions diff| under a changed instruction {opened:.3g}; gate means " + ", ".join(f"{m:.4f}" for m in means))
    _say(f"  loss: stage 1 {losses1[0]:.4f} -> {losses1[-1]:.4f}; stage 2 {losses2[0]:.4f} -> {losses2[-1]:.4f}")
    return claims


def run_report(adapters: list[str] | None = None, steps: int = 20) -> int:
    """Print the report for the given adapters (default: every adapter with a kit); 0 if all claims pass."""
    from . import get_plugin_manager

    pm = get_plugin_manager()
    chosen = [pm.get_adapter(n) for n in adapters] if adapters else [a for a in pm.registry]
    start = time.time()
    claims: list[Claim] = []
    for adapter in chosen:
        if adapter.conformance_kit() is None:
            _say(f"\n=== {adapter.name}: no conformance kit, skipped")
            continue
        claims += report_adapter(adapter, steps=steps)
    failed = [c for c in claims if not c.passed]
    _say(f"\n{len(claims) - len(failed)}/{len(claims)} claims hold ({time.time() - start:.0f} s)")
    for c in failed:
        _say(f"  FAILED {c.adapter}: {c.name}: {c.evidence}")
    return 1 if failed or not claims else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run_report())
