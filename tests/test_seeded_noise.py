"""``Adapter.seeded_noise``: each batch row's training randomness from its own seed (``--ds.deterministic_noise``).

The DeepSpeed 1-vs-2-process loss check (``test_parity_deepspeed.py``) rests on this; here it is
checked in process, fast, for every registered adapter with a kit.
"""

from __future__ import annotations

import pytest
import torch

from apt_plugins import AdapterError, AptConfig, get_plugin_manager


def adapters_with_kits() -> list[str]:
    return sorted(a.name for a in get_plugin_manager().registry
                  if a.host_version() is not None and a.conformance_kit() is not None)


@pytest.mark.parametrize("adapter_name", adapters_with_kits())
def test_seeded_noise_fixes_the_loss_whatever_the_global_rng(adapter_name):
    adapter = get_plugin_manager().get_adapter(adapter_name)
    kit = adapter.conformance_kit()
    policy, batch = kit.build(AptConfig(stage=1)), kit.make_batch()

    def loss(seeds, global_seed):
        torch.manual_seed(global_seed)
        with adapter.seeded_noise(policy, seeds):
            return policy.forward(batch)[0]

    assert torch.equal(loss([5, 9], 0), loss([5, 9], 1))
    assert not torch.equal(loss([5, 9], 0), loss([5, 10], 0))
    # Outside the context the host's own sampling is back.
    torch.manual_seed(0)
    first = policy.forward(batch)[0]
    assert not torch.equal(first, policy.forward(batch)[0])


def test_default_refuses_a_policy_without_samplers():
    adapter = get_plugin_manager().get_adapter("lerobot_pi0")
    with pytest.raises(AdapterError, match=r"adapter 'lerobot_pi0': object draws its training noise without "
                                           r"model\.sample_noise/sample_time.*override Adapter\.seeded_noise"):
        adapter.seeded_noise(object(), [0])
