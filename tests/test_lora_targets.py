"""``apt.lora_targets``: peft's ``target_modules`` forms, and no LoRA where the actions never reach.

Every LoRA tensor must be able to learn: a LoRA ``B`` matrix starts at zero, so after one backward
pass on the training loss each one must hold a non-zero gradient. A LoRA layer on a module the
action path never uses (pi0's last-layer ``q_proj``) would get none. Parametrized over every
registered adapter with a conformance kit, with its default targets and with a user list.
"""

from __future__ import annotations

import pytest
import torch

from apt_plugins import AptConfig, AptConfigError, apt_state, get_plugin_manager
from apt_plugins_lerobot_pi.testing import PiConformanceKit

LORA = dict(stage=2, vlm_mode="lora", lora_rank=2, lora_alpha=4)
PI0 = PiConformanceKit("lerobot_pi0")
LM = "model.paligemma_with_expert.paligemma.model.language_model"


def lora_adapters() -> list[str]:
    """Registered adapters with a kit whose host is installed here (openpi has its own environment)."""
    return sorted(a.name for a in get_plugin_manager().registry
                  if a.host_version() is not None and a.conformance_kit() is not None)


def _lora_modules(policy) -> set[str]:
    return {n.rsplit(".lora_A", 1)[0] for n, _ in policy.named_parameters() if ".lora_A." in n}


@pytest.mark.parametrize("targets", [None, ("q_proj", "v_proj")], ids=["default", "suffixes"])
@pytest.mark.parametrize("adapter_name", lora_adapters())
def test_every_lora_tensor_gets_a_gradient(adapter_name, targets):
    kit = get_plugin_manager().get_adapter(adapter_name).conformance_kit()
    policy = kit.build(AptConfig(**LORA, lora_targets=targets))
    groups = apt_state(policy).groups
    lora = {n: p for n, p in policy.named_parameters() if ".lora_" in n}
    assert lora, "no LoRA tensors attached"
    assert {groups[n] for n in lora} == {"language_model"}, "LoRA tensors outside the language model"
    assert all(p.requires_grad for p in lora.values())
    kit.loss(policy, kit.make_batch()).backward()
    dead = [n for n, p in lora.items() if ".lora_B." in n and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert not dead, f"LoRA on modules the action path never uses: {dead[:5]}"


def test_suffix_list_and_regex_are_peft_forms_and_skip_unused_modules():
    last = 1  # the tiny VLM has 2 layers
    as_list = _lora_modules(PI0.build(AptConfig(**LORA, lora_targets=["q_proj", "v_proj"])))
    assert f"{LM}.layers.0.self_attn.q_proj" in as_list and f"{LM}.layers.{last}.self_attn.v_proj" in as_list
    # The expert reads only the last layer's keys/values: its q_proj stays without LoRA.
    assert f"{LM}.layers.{last}.self_attn.q_proj" not in as_list
    as_regex = _lora_modules(PI0.build(AptConfig(**LORA, lora_targets=r".*self_attn\.(q|v)_proj")))
    assert as_regex == as_list
    # The adapter default (a regex) = every projection, the last layer's k/v only.
    default = _lora_modules(PI0.build(AptConfig(**LORA)))
    assert f"{LM}.layers.{last}.self_attn.k_proj" in default and f"{LM}.layers.0.mlp.down_proj" in default
    assert not any(f"layers.{last}.mlp" in m or f"layers.{last}.self_attn.o_proj" in m for m in default)


def test_targets_that_match_nothing_usable_are_refused():
    with pytest.raises(AptConfigError, match=r"apt\.lora_targets='q_proj'.*matches no module.*write a list"):
        PI0.build(AptConfig(**LORA, lora_targets="q_proj"))  # a str is a full-name regex, as in peft
    with pytest.raises(AptConfigError, match=r"apt\.lora_targets=.*only modules the action path never uses"):
        PI0.build(AptConfig(**LORA, lora_targets=r".*layers\.1\.self_attn\.q_proj"))
    with pytest.raises(AptConfigError, match=r"apt\.lora_targets=\['nothing_here'\].*matches no module.*suffixes"):
        PI0.build(AptConfig(**LORA, lora_targets=["nothing_here"]))
    with pytest.raises(AptConfigError, match=r"apt\.lora_targets='\('.*not a valid regular expression"):
        AptConfig(**LORA, lora_targets="(")
    with pytest.raises(AptConfigError, match=r"apt\.lora_targets=\[\].*at least one"):
        AptConfig(**LORA, lora_targets=[])


@pytest.mark.parametrize("flag, expected", [
    ("--policy.apt.lora_targets=[q_proj,v_proj]", ("q_proj", "v_proj")),
    (r"--policy.apt.lora_targets=.*layers\.[0-9]+\.self_attn\.(q|v)_proj", r".*layers\.[0-9]+\.self_attn\.(q|v)_proj"),
])
def test_both_forms_parse_from_the_lerobot_cli_and_round_trip_config_json(flag, expected, tmp_path):
    import draccus
    from lerobot.configs.policies import PreTrainedConfig

    from apt_plugins_lerobot_pi.configuration_apt_pi0 import APTPI0Config

    config = draccus.parse(APTPI0Config, args=["--apt.stage=2", "--apt.vlm_mode=lora",
                                               flag.replace("--policy.", "--")])
    assert AptConfig.from_settings(config.apt).lora_targets == expected
    config._save_pretrained(tmp_path)
    again = PreTrainedConfig.from_pretrained(tmp_path)
    assert AptConfig.from_settings(again.apt).lora_targets == expected
