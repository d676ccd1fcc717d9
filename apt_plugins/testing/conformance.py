"""The conformance checks. Each is a plain function that raises ``AssertionError`` with the evidence.

Every check has a negative control or an independent definition of the expected result, so it can
fail: language invariance is only claimed if the stock policy *does* react to the same change;
"frozen" is decided from the adapter's module groups, not from ``requires_grad``; carry-over is
compared bit for bit in fp32.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from ..config import AptConfig
from ..errors import (
    AptConfigError,
    AptError,
    CheckpointMismatchError,
    UnknownAdapterError,
)
from .kit import ConformanceKit

__all__ = [
    "AdapterConformance",
    "CHECKS",
    "check_stage1_language_invariance",
    "check_frozen_stays_frozen",
    "check_closed_gate_carry_over",
    "check_fresh_stage2_is_closed",
    "check_stage2_reads_language",
    "check_finite",
    "check_save_load_round_trip",
    "check_gradient_checkpointing",
    "check_documented_errors",
]

TRAIN_STEPS = 3


def _torch():
    import torch

    return torch


def _max_diff(a: Any, b: Any) -> float:
    return float((a.detach().float() - b.detach().float()).abs().max())


def _train(kit: ConformanceKit, policy: Any, steps: int = TRAIN_STEPS, lr: float = 1e-2, seed: int = 0) -> Any:
    """A few AdamW steps over *every* parameter that asks for a gradient, as a careless trainer would."""
    torch = _torch()
    from .. import param_groups

    groups = param_groups(policy, lr, 0.01)
    params = [p for p in policy.parameters() if p.requires_grad]
    in_groups = {id(p) for g in groups for p in g["params"]}
    assert in_groups == {id(p) for p in params}, "param_groups() must hold exactly the trainable parameters"
    optimizer = torch.optim.AdamW(groups, lr=lr)
    policy.train()
    for step in range(steps):
        optimizer.zero_grad()
        kit.loss(policy, kit.make_batch(seed=seed + step), seed=seed + step).backward()
        optimizer.step()
    return optimizer


def _snapshot(policy: Any) -> dict[str, Any]:
    return {k: v.detach().clone() for k, v in policy.state_dict().items()}


def _expected_trainable(group: str, name: str, config: AptConfig) -> bool:
    # Independent restatement of the stage rules (not a call into the code under test).
    if group == "action_expert":
        return True
    if group == "fusion":
        return config.stage == 2
    if group in ("vision_tower", "projector", "language_model"):
        return config.vlm_mode == "full" or (config.vlm_mode == "lora" and ".lora_" in name)
    return False


# ----------------------------------------------------------------------------------------------
def check_stage1_language_invariance(kit: ConformanceKit, config: AptConfig) -> None:
    """Stage 1 ignores the prompt: bit-identical loss and actions under a changed instruction.

    Negative controls: the stock policy differs on the same inputs, and the Stage-1 policy still
    reacts to each non-language probe (image, state).
    """
    torch = _torch()
    assert config.stage == 1
    stock = kit.build(None)
    policy = kit.build(config)
    a, b = kit.make_batch(instruction=0), kit.make_batch(instruction=1)
    assert _max_diff(kit.loss(stock, a), kit.loss(stock, b)) > 0, (
        "negative control failed: the stock policy's loss does not depend on the instruction, so "
        "invariance would prove nothing")
    assert _max_diff(kit.actions(stock, a), kit.actions(stock, b)) > 0, "negative control failed (stock actions)"
    for other in (b, kit.make_batch(instruction=2)):
        la, lb = kit.loss(policy, a), kit.loss(policy, other)
        assert torch.equal(la, lb), f"Stage-1 loss depends on the instruction: {la.item()!r} vs {lb.item()!r}"
        xa, xb = kit.actions(policy, a), kit.actions(policy, other)
        assert torch.equal(xa, xb), f"Stage-1 actions depend on the instruction (max |diff| {_max_diff(xa, xb)})"
    for name, probe in kit.probes(a).items():
        assert _max_diff(kit.actions(policy, a), kit.actions(policy, probe)) > 0, (
            f"Stage-1 actions ignore the {name!r} input: the policy must still read non-language inputs")


def check_frozen_stays_frozen(kit: ConformanceKit, config: AptConfig) -> None:
    """After several optimizer steps every frozen tensor is bit-identical and every trainable one changed."""
    torch = _torch()
    from ..stages import apt_state

    policy = kit.build(config)
    state = apt_state(policy)
    assert state is not None, "the policy was not prepared by apt_plugins.prepare_stage"
    params = dict(policy.named_parameters())
    for name, param in params.items():
        expected = _expected_trainable(state.groups[name], name, config)
        assert param.requires_grad == expected, (
            f"{name} (group {state.groups[name]}) has requires_grad={param.requires_grad}, expected {expected}")
    frozen_modules = [n for n, m in policy.named_modules()
                      if list(m.parameters()) and not any(p.requires_grad for p in m.parameters())]
    before = _snapshot(policy)
    _train(kit, policy)
    for name in frozen_modules:
        assert not policy.get_submodule(name).training, f"frozen module {name} is in train mode"
    after = policy.state_dict()
    for name, param in params.items():
        changed = not torch.equal(before[name], after[name])
        if _expected_trainable(state.groups[name], name, config):
            assert changed, f"trainable tensor {name} ({state.groups[name]}) did not change in {TRAIN_STEPS} steps"
        else:
            assert not changed, f"frozen tensor {name} ({state.groups[name]}) changed"
    # Buffers. A state-dict entry that aliases a parameter (a tied LM head) is that parameter, checked above.
    param_storage = {p.data_ptr() for p in params.values()}
    for name in before.keys() - params.keys():
        if after[name].data_ptr() in param_storage:
            continue
        assert torch.equal(before[name], after[name]), f"buffer {name} changed"


def _promote(kit: ConformanceKit, config: AptConfig, tmp: Path) -> tuple[Any, Any]:
    stage1 = kit.build(AptConfig(stage=1, language_mask_scope=config.language_mask_scope))
    _train(kit, stage1, steps=2)
    stage1.eval()
    kit.save(stage1, tmp / "stage1")
    stage2 = kit.load(tmp / "stage1", config)
    return stage1, stage2


def check_closed_gate_carry_over(kit: ConformanceKit, config: AptConfig) -> None:
    """Stage 2 promoted from Stage 1 equals Stage 1 exactly at step 0; then gates and fusion learn."""
    torch = _torch()
    assert config.stage == 2 and config.fusion_zero_init
    with tempfile.TemporaryDirectory() as tmp:
        stage1, stage2 = _promote(kit, config, Path(tmp))
    report = stage2.apt_load_report
    fresh = set(report.fresh)
    fusion = {n for n, _ in stage2.state_dict().items() if ".apt_" in n}
    assert fusion, "Stage 2 has no APT fusion tensors"
    lora = {n for n in stage2.state_dict() if ".lora_" in n}
    assert fresh == fusion | lora, f"fresh tensors {sorted(fresh ^ (fusion | lora))[:5]} differ from the fusion/LoRA tensors"
    for batch in (kit.make_batch(instruction=0), kit.make_batch(instruction=1)):
        stage1.train(), stage2.train()
        l1, l2 = kit.loss(stage1, batch), kit.loss(stage2, batch)
        assert _max_diff(l1, l2) == 0.0, f"Stage-2 loss at step 0 differs from Stage 1 by {_max_diff(l1, l2)}"
        a1, a2 = kit.actions(stage1, batch), kit.actions(stage2, batch)
        assert _max_diff(a1, a2) == 0.0, f"Stage-2 actions at step 0 differ from Stage 1 by {_max_diff(a1, a2)}"
    stage2.train()
    before = _snapshot(stage2)
    torch.manual_seed(0)
    kit.loss(stage2, kit.make_batch()).backward()
    o_proj_grads = [p.grad for n, p in stage2.named_parameters() if ".apt_" in n and "o_proj" in n]
    assert o_proj_grads and all(g is not None and g.abs().sum() > 0 for g in o_proj_grads), (
        "the closed fusion output projections receive no gradient at step 0")
    stage2.zero_grad()
    _train(kit, stage2)
    after = stage2.state_dict()
    for name in fusion:
        assert not torch.equal(before[name], after[name]), f"fusion tensor {name} did not change in training"
    gates = [n for n in fusion if "gate" in n]
    assert gates, "no gate parameters found among the fusion tensors"


def check_fresh_stage2_is_closed(kit: ConformanceKit, config: AptConfig) -> None:
    """A Stage-2 policy *constructed* from the base weights equals a Stage-1 one exactly (not only after promotion).

    Guards the fusion layers' initialisation at construction: a host loader that re-initialises
    modules missing from its checkpoint (transformers does) would open them if they were injected
    before it ran.
    """
    torch = _torch()
    assert config.stage == 2 and config.fusion_zero_init
    stage1 = kit.build(AptConfig(stage=1, language_mask_scope=config.language_mask_scope))
    stage2 = kit.build(config)
    ref = stage1.state_dict()
    for name, value in stage2.state_dict().items():
        if ".apt_" in name or ".lora_" in name:
            if ".apt_" in name and ".lora_" not in name and name.endswith("o_proj.weight"):
                assert not value.any(), f"fusion output projection {name} is not zero after construction"
            continue
        base = name.replace(".base_layer.", ".")  # peft renames the wrapped weights
        assert base in ref and torch.equal(ref[base], value), f"{name} differs between fresh Stage-1 and Stage-2 policies"
    batch = kit.make_batch()
    l1, l2 = kit.loss(stage1, batch), kit.loss(stage2, batch)
    assert _max_diff(l1, l2) == 0.0, f"fresh Stage-2 loss differs from Stage 1 by {_max_diff(l1, l2)}"
    a1, a2 = kit.actions(stage1, batch), kit.actions(stage2, batch)
    assert _max_diff(a1, a2) == 0.0, f"fresh Stage-2 actions differ from Stage 1 by {_max_diff(a1, a2)}"


def check_finite(kit: ConformanceKit, config: AptConfig) -> None:
    """Loss, gradients and actions are finite for every instruction (masks never leave a row without keys)."""
    torch = _torch()
    policy = kit.build(config)
    if config.stage == 2:
        kit.perturb_fusion(policy)
    for instruction in range(3):
        batch = kit.make_batch(instruction=instruction)
        policy.train()
        policy.zero_grad()
        loss = kit.loss(policy, batch)
        assert torch.isfinite(loss).all(), f"non-finite loss {loss.item()!r} (instruction {instruction})"
        loss.backward()
        for name, param in policy.named_parameters():
            if param.grad is not None:
                assert torch.isfinite(param.grad).all(), f"non-finite gradient of {name} (instruction {instruction})"
        actions = kit.actions(policy, batch)
        assert torch.isfinite(actions).all(), f"non-finite actions (instruction {instruction})"


def check_stage2_reads_language(kit: ConformanceKit, config: AptConfig) -> None:
    """With the fusion output moved away from zero, a changed instruction changes the actions."""
    assert config.stage == 2
    policy = kit.build(config)
    a, b = kit.make_batch(instruction=0), kit.make_batch(instruction=1)
    closed = _max_diff(kit.actions(policy, a), kit.actions(policy, b))
    if config.inherited_layers_keep_language_mask:
        assert closed == 0.0, f"closed Stage 2 must still ignore language (max |diff| {closed})"
    kit.perturb_fusion(policy)
    diff = _max_diff(kit.actions(policy, a), kit.actions(policy, b))
    assert diff > 1e-6, f"open fusion layers do not carry language to the actions (max |diff| {diff})"
    assert _max_diff(kit.loss(policy, a), kit.loss(policy, b)) > 0, "open fusion: the loss ignores the instruction"


def check_save_load_round_trip(kit: ConformanceKit, config: AptConfig) -> None:
    """Every tensor and the APT config survive save -> load unchanged; outputs are identical."""
    torch = _torch()
    policy = kit.build(config)
    _train(kit, policy, steps=1)
    if config.stage == 2:
        kit.perturb_fusion(policy)
    policy.eval()
    with tempfile.TemporaryDirectory() as tmp:
        kit.save(policy, Path(tmp) / "ckpt")
        loaded = kit.load(Path(tmp) / "ckpt", config)
        saved_config = (Path(tmp) / "ckpt" / "config.json").read_text()
    assert '"apt"' in saved_config, "config.json does not record the APT settings"
    from ..stages import apt_state

    assert apt_state(loaded).config == config, "the loaded policy's APT config differs"
    assert loaded.apt_load_report.fresh == [], f"tensors missing from the checkpoint: {loaded.apt_load_report.fresh[:5]}"
    ref, got = policy.state_dict(), loaded.state_dict()
    assert ref.keys() == got.keys(), f"state-dict keys differ: {sorted(ref.keys() ^ got.keys())[:5]}"
    for name in ref:
        assert torch.equal(ref[name], got[name]), f"tensor {name} changed in the round trip"
    batch = kit.make_batch()
    assert _max_diff(kit.actions(policy, batch), kit.actions(loaded, batch)) == 0.0, "actions differ after reload"


def check_gradient_checkpointing(kit: ConformanceKit, config: AptConfig) -> None:
    """Gradient checkpointing changes memory, not results: same loss and gradients on and off."""
    torch = _torch()
    policy = kit.build(config)
    if config.stage == 2:
        kit.perturb_fusion(policy)
    batch = kit.make_batch()
    grads = []
    for enabled in (False, True):
        kit.set_gradient_checkpointing(policy, enabled)
        policy.zero_grad()
        loss = kit.loss(policy, batch)
        loss.backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}))
    (l0, g0), (l1, g1) = grads
    assert _max_diff(l0, l1) == 0.0, f"loss differs with gradient checkpointing ({_max_diff(l0, l1)})"
    assert g0.keys() == g1.keys() and g0, "different parameters receive gradients with checkpointing"
    for name in g0:
        assert torch.allclose(g0[name], g1[name], atol=1e-6, rtol=1e-5), f"gradient of {name} differs with checkpointing"


def check_documented_errors(kit: ConformanceKit, config: AptConfig) -> None:
    """Every error documented in docs/errors.md is raised, with its message, and loses nothing."""
    import pytest

    from .. import get_plugin_manager, prepare_stage

    # Configuration errors name the field, the value and the fix.
    with pytest.raises(AptConfigError, match=r"apt\.stage=3.*allowed values: 1, 2"):
        AptConfig.parse({"stage": 3})
    with pytest.raises(AptConfigError, match=r"apt\.vlm_mode='lora'.*not allowed in stage 1"):
        AptConfig.parse({"stage": 1, "vlm_mode": "lora"})
    with pytest.raises(AptConfigError, match=r"Did you mean 'stage'"):
        AptConfig.parse({"stag": 1})
    with pytest.raises(UnknownAdapterError, match=r"Did you mean"):
        get_plugin_manager().get_adapter(kit.adapter_name + "x")
    # Preparing twice with another config refuses instead of half-applying.
    policy = kit.build(config)
    other = config.replace(gate_init_logit=config.gate_init_logit + 1.0)
    with pytest.raises(AptConfigError, match=r"already prepared"):
        prepare_stage(policy, other)
    # Checkpoints: a Stage-2 checkpoint into a Stage-1 policy, and a plain one into Stage 2, fail
    # loudly and load nothing.
    with tempfile.TemporaryDirectory() as tmp:
        stage2 = kit.build(AptConfig(stage=2))
        kit.save(stage2, Path(tmp) / "s2")
        with pytest.raises(CheckpointMismatchError, match=r"Stage-2 checkpoint; load it with apt.stage=2"):
            kit.load(Path(tmp) / "s2", AptConfig(stage=1))
        stock = kit.build(None)
        kit.save(stock, Path(tmp) / "plain")
        with pytest.raises(CheckpointMismatchError, match=r"plain \w+ checkpoint.*retrofit"):
            kit.load(Path(tmp) / "plain", AptConfig(stage=2))
    # Adapter-specific documented errors.
    for case in getattr(kit, "error_cases", lambda: [])():
        with pytest.raises(case["error"], match=case["match"]):
            case["trigger"]()
        assert issubclass(case["error"], AptError)


#: Every check with the stage configurations it applies to ("1", "2", or "all").
CHECKS: dict[str, tuple[Any, str]] = {
    "stage1_language_invariance": (check_stage1_language_invariance, "1"),
    "frozen_stays_frozen": (check_frozen_stays_frozen, "all"),
    "closed_gate_carry_over": (check_closed_gate_carry_over, "2"),
    "fresh_stage2_is_closed": (check_fresh_stage2_is_closed, "2"),
    "stage2_reads_language": (check_stage2_reads_language, "2"),
    "finite": (check_finite, "all"),
    "save_load_round_trip": (check_save_load_round_trip, "all"),
    "gradient_checkpointing": (check_gradient_checkpointing, "all"),
    "documented_errors": (check_documented_errors, "1"),
}


class AdapterConformance:
    """Subclass in a test module to run every check over every registered adapter x stage.

    The ``apt_case`` fixture (from the ``apt_plugins`` pytest plugin) is parametrised over the
    registered adapters (restrict with ``--apt-adapter``), their kits' stage configurations, and
    :data:`CHECKS`.
    """

    def test_conformance(self, apt_case: tuple[Any, str, AptConfig, str]) -> None:
        kit, _config_name, config, check = apt_case
        fn, _ = CHECKS[check]
        fn(kit, config)
