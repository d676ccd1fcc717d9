"""Negative controls: every conformance check fails when the property it guards is broken.

Each test wraps the real pi0 kit so that exactly one property breaks, and expects the check to
raise. Without these, a check that can never fail would look like a passing one.
"""

from __future__ import annotations

import pytest
import torch

from apt_plugins import AptConfig, get_plugin_manager
from apt_plugins.testing import conformance as c


class BrokenKit:
    """Delegates to the real kit; subclasses override one method to break one property."""

    def __init__(self) -> None:
        self.inner = get_plugin_manager().get_adapter("lerobot_pi0").conformance_kit()
        self.adapter_name = self.inner.adapter_name

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_language_invariance_fails_when_language_leaks(monkeypatch):
    from apt_plugins_lerobot_pi.modeling import APTPiMixin

    # Hide nothing: the Stage-1 model would read the instruction.
    monkeypatch.setattr(APTPiMixin, "_apt_language_tokens", lambda self, masks: torch.zeros_like(masks.bool()))
    with pytest.raises(AssertionError, match="depends on the instruction"):
        c.check_stage1_language_invariance(BrokenKit(), AptConfig(stage=1))


def test_language_invariance_fails_when_stage1_ignores_the_image(monkeypatch):
    class ConstantImage(BrokenKit):
        def probes(self, batch):
            return {"image": dict(batch)}  # a "probe" that changes nothing must be caught

    with pytest.raises(AssertionError, match="ignore the 'image' input"):
        c.check_stage1_language_invariance(ConstantImage(), AptConfig(stage=1))


def test_frozen_check_fails_when_a_vlm_tensor_trains():
    class LeakyFreeze(BrokenKit):
        def build(self, apt, seed=0, **kw):
            policy = self.inner.build(apt, seed, **kw)
            if apt is not None:
                vision = policy.model.paligemma_with_expert.paligemma.model.vision_tower
                next(vision.parameters()).requires_grad_(True)
            return policy

    with pytest.raises(AssertionError, match=r"vision_tower.*requires_grad=True, expected False"):
        c.check_frozen_stays_frozen(LeakyFreeze(), AptConfig(stage=1))


def test_frozen_check_fails_when_an_expert_tensor_is_frozen():
    class DeadExpert(BrokenKit):
        def build(self, apt, seed=0, **kw):
            policy = self.inner.build(apt, seed, **kw)
            if apt is not None:
                policy.model.action_in_proj.weight.requires_grad_(False)
            return policy

    with pytest.raises(AssertionError, match=r"action_in_proj.weight.*requires_grad=False, expected True"):
        c.check_frozen_stays_frozen(DeadExpert(), AptConfig(stage=1))


def test_carry_over_fails_when_fusion_starts_open():
    class OpenAtPromotion(BrokenKit):
        def load(self, path, apt, **kw):
            policy = self.inner.load(path, apt, **kw)
            if apt.stage == 2:
                self.inner.perturb_fusion(policy)
            return policy

    with pytest.raises(AssertionError, match="at step 0 differs from Stage 1"):
        c.check_closed_gate_carry_over(OpenAtPromotion(), AptConfig(stage=2))


def test_reads_language_fails_when_fusion_never_opens():
    class NoPerturb(BrokenKit):
        def perturb_fusion(self, policy, seed=0):
            pass

    with pytest.raises(AssertionError, match="do not carry language"):
        c.check_stage2_reads_language(NoPerturb(), AptConfig(stage=2))


def test_round_trip_fails_when_a_tensor_is_lost():
    class LossyLoad(BrokenKit):
        def load(self, path, apt, **kw):
            policy = self.inner.load(path, apt, **kw)
            with torch.no_grad():
                policy.model.action_out_proj.bias.zero_()
            return policy

    with pytest.raises(AssertionError, match="action_out_proj.bias changed in the round trip"):
        c.check_save_load_round_trip(LossyLoad(), AptConfig(stage=1))


def test_gradient_checkpointing_check_fails_when_results_change():
    class DropoutWhenCheckpointing(BrokenKit):
        def set_gradient_checkpointing(self, policy, enabled):
            self.inner.set_gradient_checkpointing(policy, enabled)
            if enabled:
                with torch.no_grad():
                    policy.model.action_out_proj.bias.add_(1.0)

    with pytest.raises(AssertionError, match="differs with gradient checkpointing"):
        c.check_gradient_checkpointing(DropoutWhenCheckpointing(), AptConfig(stage=1))
