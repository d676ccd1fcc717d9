"""apt.attention='sdpa' computes the eager (LeRobot) function, and keeps Stage 1 exactly language-blind.

SDPA and eager sum in different orders, so they agree to float rounding (fp32 here), not bit for
bit; what must stay bit-exact is every invariance APT claims *within* one kernel: Stage-1 loss and
actions under other instructions, and Stage 2 with closed gates against its Stage-1 parent.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from apt_plugins import AptConfig
from apt_plugins_lerobot_pi.testing import PiConformanceKit

ADAPTERS = ["lerobot_pi0", "lerobot_pi05"]
STAGES = {
    "stage1": dict(stage=1),
    "stage2_frozen": dict(stage=2),
    "stage2_unmasked": dict(stage=2, inherited_layers_keep_language_mask=False),
}
TOL = dict(rtol=1e-5, atol=1e-5)


def _loss_grads(kit, policy, batch):
    policy.zero_grad(set_to_none=True)
    loss = kit.loss(policy, batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("stage", list(STAGES))
@pytest.mark.parametrize("adapter", ADAPTERS)
def test_sdpa_matches_eager_in_fp32(adapter, stage):
    kit = PiConformanceKit(adapter)
    eager = kit.build(AptConfig(**STAGES[stage], attention="eager"), seed=3)
    sdpa = kit.build(AptConfig(**STAGES[stage], attention="sdpa"), seed=3)
    if stage != "stage1":  # open the fusion layers, so they take part
        kit.perturb_fusion(eager), kit.perturb_fusion(sdpa)
    batch = kit.make_batch(seed=2)
    want_loss, want_grads = _loss_grads(kit, eager, batch)
    got_loss, got_grads = _loss_grads(kit, sdpa, batch)
    torch.testing.assert_close(got_loss, want_loss, **TOL)
    assert got_grads.keys() == want_grads.keys()
    for name, g in got_grads.items():
        torch.testing.assert_close(g, want_grads[name], rtol=1e-4, atol=1e-5, msg=f"gradient of {name}")
    torch.testing.assert_close(kit.actions(sdpa.eval(), batch), kit.actions(eager.eval(), batch), **TOL)


def test_sdpa_matches_stock_lerobot_pi0():
    """Mask lifted and gates closed: APT computes LeRobot's function, also with the SDPA kernel."""
    kit = PiConformanceKit("lerobot_pi0")
    stock = kit.build(None, seed=5)
    apt = kit.build(AptConfig(stage=2, inherited_layers_keep_language_mask=False, attention="sdpa"), seed=5)
    apt.load_state_dict(stock.state_dict(), strict=False)
    batch = kit.make_batch()
    torch.testing.assert_close(kit.loss(apt, batch), kit.loss(stock, batch), **TOL)
    torch.testing.assert_close(kit.actions(apt.eval(), batch), kit.actions(stock.eval(), batch), **TOL)


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_sdpa_stage1_is_bit_exactly_language_blind(adapter):
    kit = PiConformanceKit(adapter)
    policy = kit.build(AptConfig(stage=1, attention="sdpa"), seed=1)
    batches = [kit.make_batch(instruction=i, seed=4) for i in range(3)]  # other ids and lengths
    losses = [kit.loss(policy, b) for b in batches]
    assert all(torch.equal(losses[0], x) for x in losses[1:])
    policy.eval()
    actions = [kit.actions(policy, b) for b in batches]
    assert all(torch.equal(actions[0], x) for x in actions[1:])
    for name, probe in kit.probes(batches[0]).items():
        assert not torch.equal(kit.actions(policy, probe), actions[0]), f"probe {name} did not reach the actions"


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_sdpa_closed_stage2_equals_stage1_bit_for_bit(adapter):
    kit = PiConformanceKit(adapter)
    stage1 = kit.build(AptConfig(stage=1, attention="sdpa"), seed=6)
    stage2 = kit.build(AptConfig(stage=2, attention="sdpa"), seed=6)
    stage2.load_state_dict(stage1.state_dict(), strict=False)
    batch = kit.make_batch(seed=1)
    assert torch.equal(kit.loss(stage2, batch), kit.loss(stage1, batch))
    assert torch.equal(kit.actions(stage2.eval(), batch), kit.actions(stage1.eval(), batch))


def test_auto_is_sdpa_on_cuda_and_eager_elsewhere():
    kit = PiConformanceKit("lerobot_pi0")
    auto = kit.build(AptConfig(stage=1), seed=2)
    eager = kit.build(AptConfig(stage=1, attention="eager"), seed=2)
    cuda = SimpleNamespace(device=torch.device("cuda"))
    assert auto.model._apt_attention(cuda) == "sdpa"
    assert auto.model._apt_attention(torch.zeros(1)) == "eager"
    batch = kit.make_batch()
    assert torch.equal(kit.loss(auto, batch), kit.loss(eager, batch))


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_sdpa_in_bfloat16_trains_and_samples(adapter):
    kit = PiConformanceKit(adapter)
    eager = kit.build(AptConfig(stage=2, attention="eager"), seed=1, dtype="bfloat16")
    sdpa = kit.build(AptConfig(stage=2, attention="sdpa"), seed=1, dtype="bfloat16")
    batch = kit.make_batch()
    loss = kit.loss(sdpa, batch)
    loss.backward()
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss.detach(), kit.loss(eager, batch).detach(), rtol=2e-2, atol=2e-2)
    assert torch.isfinite(kit.actions(sdpa.eval(), batch)).all()
