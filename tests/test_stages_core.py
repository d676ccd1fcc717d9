"""Host-independent core on a pure-torch toy policy: stages, optimizer groups, strict checkpoints, gating."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import apt_plugins
from apt_plugins import (
    Adapter,
    AdapterValidationError,
    AptConfig,
    AptConfigError,
    AptError,
    CheckpointMismatchError,
    HostVersionError,
    apt_state,
    fingerprint,
    gate_statistics,
    hookimpl,
    load_state_dict_strict,
    param_groups,
    prepare_stage,
    read_manifest,
    write_manifest,
)
from apt_plugins import manager as manager_mod
from apt_plugins.checkpoint import MANIFEST_NAME, explain_mismatch, tensor_fingerprint
from apt_plugins.errors import group_keys
from apt_plugins.gating import ATTENTION_MASK_VALUE, GatedCrossAttention, SigmoidGate
from apt_plugins.manager import PluginManager
from apt_plugins.stages import classify_parameters, freeze_module

WIDTH = 8


# ==================================================================================================
# a toy VLA: vlm (vision tower, projector, language model with a dead head) + action expert
# ==================================================================================================
class ToyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(WIDTH, WIDTH) for _ in range(2))
        self.norm = nn.LayerNorm(WIDTH)
        self.head = nn.Linear(WIDTH, 5)  # "unused": never on the action path
        self.drop = nn.Dropout(0.1)


class ToyVLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.vision = nn.Sequential(nn.Linear(6, WIDTH), nn.Dropout(0.1))
        self.proj = nn.Linear(WIDTH, WIDTH)
        self.lm = ToyLM()


class ToyExpert(nn.Module):
    def __init__(self):
        super().__init__()
        self.in_proj = nn.Linear(3, WIDTH)
        self.layers = nn.ModuleList(nn.Linear(WIDTH, WIDTH) for _ in range(2))
        self.norm = nn.LayerNorm(WIDTH)
        self.out = nn.Linear(WIDTH, 3)
        self.drop = nn.Dropout(0.1)


class ToyPolicy(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.vlm = ToyVLM()
        self.expert = ToyExpert()


class ToyAdapter(Adapter):
    name = "toy_vla"
    host = "torch"
    supported_host_versions = ">=2"
    description = "pure-torch toy VLA"

    def __init__(self):
        self.inject_calls = 0

    def matches(self, policy):
        return isinstance(policy, ToyPolicy)

    def module_groups(self, policy):
        return {
            "vision_tower": ["vlm.vision"],
            "projector": ["vlm.proj"],
            "language_model": ["vlm.lm"],
            "action_expert": ["expert"],
            "fusion": ["expert.apt_fusion"],  # longer than "expert": must win
            "unused": ["vlm.lm.head"],  # longer than "vlm.lm": must win
        }

    def inject(self, policy, config):
        self.inject_calls += 1
        if config.stage == 2 and not hasattr(policy.expert, "apt_fusion"):
            policy.expert.apt_fusion = nn.ModuleList(
                GatedCrossAttention(
                    WIDTH,
                    2,
                    4,
                    gate_granularity=config.gate_granularity,
                    gate_init_logit=config.gate_init_logit,
                    zero_init=config.fusion_zero_init,
                )
                for _ in policy.expert.layers
            )

    def lora_targets(self, policy, config):
        return "vlm.lm", ["layers.0", "layers.1"]

    def gate_values(self, policy):
        fusion = getattr(policy.expert, "apt_fusion", None)
        return {} if fusion is None else {f"layer{i}": f.gate() for i, f in enumerate(fusion)}


class ToyPlugin:
    def __init__(self):
        self.prepared = []

    @hookimpl
    def apt_register_adapters(self, register):
        register(ToyAdapter)

    @hookimpl
    def apt_prepare_stage(self, policy, adapter, config, report):
        self.prepared.append((policy, adapter.name, config, report))


@pytest.fixture
def plugin(monkeypatch):
    """A fresh process-wide manager holding only the toy plugin (restored after the test)."""
    monkeypatch.delenv("APT_PLUGINS_BLOCK", raising=False)
    pm = PluginManager(autoload=False)
    toy = ToyPlugin()
    pm.register_plugin(toy, name="toy")
    monkeypatch.setattr(manager_mod, "_manager", pm)
    return toy


@pytest.fixture
def adapter(plugin):
    return manager_mod.get_plugin_manager().get_adapter("toy_vla")


VLM_PREFIXES = ("vlm.vision.", "vlm.proj.", "vlm.lm.layers.", "vlm.lm.norm.")


def params_under(policy, *prefixes):
    return {n: p for n, p in policy.named_parameters() if n.startswith(prefixes)}


def modules_under(policy, prefix):
    return {n: m for n, m in policy.named_modules() if n == prefix or n.startswith(prefix + ".")}


# ==================================================================================================
# stages
# ==================================================================================================
def test_classification_longest_prefix_wins(adapter):
    policy = ToyPolicy()
    adapter.inject(policy, AptConfig(stage=2))
    groups = classify_parameters(policy, adapter)
    assert groups["vlm.vision.0.weight"] == "vision_tower"
    assert groups["vlm.proj.bias"] == "projector"
    assert groups["vlm.lm.layers.1.weight"] == "language_model"
    assert groups["vlm.lm.head.weight"] == "unused"
    assert groups["expert.in_proj.weight"] == "action_expert"
    assert groups["expert.apt_fusion.0.gate.logit"] == "fusion"
    assert groups["expert.apt_fusion.1.q_proj.weight"] == "fusion"
    assert set(groups) == {n for n, _ in policy.named_parameters()}


def test_stage1_freezes_the_vlm_and_keeps_it_in_eval(plugin, adapter):
    policy = ToyPolicy()
    report = prepare_stage(policy, AptConfig(stage=1), adapter=adapter)
    for name, p in policy.named_parameters():
        assert p.requires_grad == name.startswith("expert."), name
    policy.train()
    for name, module in modules_under(policy, "vlm").items():
        assert not module.training, f"{name} left eval mode"
    for name, module in modules_under(policy, "expert").items():
        assert module.training, f"{name} should train"
    # eval() then train() again: the VLM still stays in eval, the expert follows
    policy.eval()
    assert not policy.expert.drop.training
    policy.train()
    assert policy.expert.drop.training and not policy.vlm.vision[1].training and not policy.vlm.lm.drop.training
    # the report counts
    expert = params_under(policy, "expert.")
    assert report.stage == 1 and report.adapter == "toy_vla" and report.vlm_mode == "frozen"
    assert report.fusion_layers == 0
    assert report.groups["action_expert"].trainable_tensors == len(expert)
    assert report.groups["action_expert"].trainable_elements == sum(p.numel() for p in expert.values())
    assert report.groups["action_expert"].frozen_tensors == 0
    vision = params_under(policy, "vlm.vision.")
    assert report.groups["vision_tower"].frozen_elements == sum(p.numel() for p in vision.values())
    assert report.groups["vision_tower"].trainable_tensors == 0
    assert report.groups["unused"].frozen_tensors == 2
    assert report.groups["fusion"].trainable_tensors + report.groups["fusion"].frozen_tensors == 0
    state = apt_state(policy)
    assert state.config == AptConfig(stage=1) and state.adapter is adapter and state.report is report
    # the prepare hook saw the prepared policy
    assert plugin.prepared == [(policy, "toy_vla", AptConfig(stage=1), report)]


def test_stage2_full_trains_the_vlm_but_not_unused(plugin, adapter):
    policy = ToyPolicy()
    report = prepare_stage(policy, {"stage": 2, "vlm_mode": "full"}, adapter=adapter)
    for name, p in policy.named_parameters():
        assert p.requires_grad == (not name.startswith("vlm.lm.head.")), name
    policy.train()
    assert policy.vlm.training and policy.vlm.vision[1].training and policy.vlm.lm.drop.training
    assert not policy.vlm.lm.head.training  # all-frozen module stays in eval
    assert policy.expert.apt_fusion[0].training
    assert report.fusion_layers == 2
    assert report.groups["fusion"].trainable_tensors == len(params_under(policy, "expert.apt_fusion."))
    assert report.groups["language_model"].frozen_tensors == 0
    assert report.groups["unused"].trainable_tensors == 0


def test_stage2_frozen_trains_fusion_and_expert_only(plugin, adapter):
    policy = ToyPolicy()
    prepare_stage(policy, AptConfig(stage=2), adapter=adapter)
    for name, p in policy.named_parameters():
        assert p.requires_grad == name.startswith("expert."), name
    assert params_under(policy, "expert.apt_fusion.")
    policy.train()
    assert not policy.vlm.training and not policy.vlm.proj.training


def test_adapter_selected_by_hook_and_by_name(plugin):
    policy = ToyPolicy()
    report = prepare_stage(policy, AptConfig())
    assert report.adapter == "toy_vla"
    other = ToyPolicy()
    assert prepare_stage(other, AptConfig(), adapter="toy_vla").adapter == "toy_vla"
    with pytest.raises(apt_plugins.UnknownAdapterError, match="Did you mean 'toy_vla'"):
        prepare_stage(ToyPolicy(), AptConfig(), adapter="toy_vl")
    with pytest.raises(apt_plugins.NoAdapterFoundError, match=r"accepts a .*Linear"):
        prepare_stage(nn.Linear(2, 2), AptConfig())


def test_invalid_config_is_rejected_before_anything_changes(plugin, adapter):
    policy = ToyPolicy()
    with pytest.raises(AptConfigError, match=r"apt\.vlm_mode='full'.*not allowed in stage 1"):
        prepare_stage(policy, {"stage": 1, "vlm_mode": "full"}, adapter=adapter)
    assert adapter.inject_calls == 0 and apt_state(policy) is None


def test_param_groups_stage2_full(plugin, adapter):
    policy = ToyPolicy()
    cfg = AptConfig(stage=2, vlm_mode="full", fusion_lr_multiplier=2.0)
    prepare_stage(policy, cfg, adapter=adapter)
    base_lr, wd = 1e-3, 0.01
    groups = param_groups(policy, base_lr, wd)
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {"action_expert", "action_expert_no_decay", "fusion", "fusion_no_decay", "fusion_gate",
                            "vlm", "vlm_no_decay"}
    assert len(by_name) == len(groups)
    for name, g in by_name.items():
        assert g["params"], name
        if name.endswith("_no_decay"):
            assert g["weight_decay"] == 0.0
            assert all(p.ndim < 2 for p in g["params"])
        elif name != "fusion_gate":  # gate logits are 1-D (channel) or 0-D (scalar)
            assert all(p.ndim >= 2 for p in g["params"])
    assert by_name["action_expert"]["lr"] == base_lr and by_name["action_expert"]["weight_decay"] == wd
    assert by_name["fusion"]["lr"] == pytest.approx(base_lr * 2.0) and by_name["fusion"]["weight_decay"] == wd
    assert by_name["vlm"]["lr"] == pytest.approx(base_lr * 0.1)
    assert by_name["vlm_no_decay"]["lr"] == pytest.approx(base_lr * 0.1)
    assert by_name["vlm"]["weight_decay"] == 1e-10
    # gates get their own group: fusion lr x gate_lr_multiplier, no weight decay
    gate_ids = {id(f.gate.logit) for f in policy.expert.apt_fusion}
    assert gate_ids == {id(p) for p in by_name["fusion_gate"]["params"]}
    assert by_name["fusion_gate"]["lr"] == pytest.approx(base_lr * 2.0 * cfg.gate_lr_multiplier)
    assert by_name["fusion_gate"]["weight_decay"] == 0.0
    # exactly the trainable parameters, each once
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in policy.parameters() if p.requires_grad}
    assert id(policy.vlm.lm.head.weight) not in ids
    # and an optimizer accepts them as they are
    opt = torch.optim.AdamW(groups, lr=base_lr)
    policy.expert.out(policy.vlm.proj(torch.randn(2, WIDTH))).sum().backward()
    opt.step()


def test_gate_lr_multiplier_sets_only_the_gate_rate(plugin, adapter):
    policy = ToyPolicy()
    prepare_stage(policy, AptConfig(stage=2, gate_lr_multiplier=7.0), adapter=adapter)
    by_name = {g["name"]: g for g in param_groups(policy, 1e-3, 0.01)}
    assert by_name["fusion_gate"]["lr"] == pytest.approx(7e-3)
    assert by_name["fusion"]["lr"] == pytest.approx(1e-3) and by_name["fusion_no_decay"]["lr"] == pytest.approx(1e-3)
    with pytest.raises(AptConfigError, match=r"apt\.gate_lr_multiplier=0\.0.*greater than 0"):
        AptConfig(stage=2, gate_lr_multiplier=0.0)


def test_param_groups_stage1_only_the_expert(plugin, adapter):
    policy = ToyPolicy()
    prepare_stage(policy, AptConfig(stage=1), adapter=adapter)
    groups = param_groups(policy, 1e-4, 0.01)
    assert {g["name"] for g in groups} == {"action_expert", "action_expert_no_decay"}
    ids = {id(p) for g in groups for p in g["params"]}
    assert ids == {id(p) for p in policy.expert.parameters()}


def test_param_groups_need_a_prepared_policy(plugin):
    with pytest.raises(AptError, match=r"param_groups\(\) needs a prepared policy"):
        param_groups(ToyPolicy(), 1e-4, 0.0)


def test_unclassified_parameter_raises(plugin):
    class Leaky(ToyAdapter):
        name = "leaky"

        def module_groups(self, policy):
            groups = super().module_groups(policy)
            del groups["projector"]
            return groups

    policy = ToyPolicy()
    with pytest.raises(
        AdapterValidationError,
        match=r"adapter 'leaky' is invalid: parameter 'vlm\.proj\.weight' belongs to no module group",
    ):
        prepare_stage(policy, AptConfig(), adapter=Leaky())
    assert apt_state(policy) is None
    assert all(p.requires_grad for p in policy.parameters())  # nothing was frozen


def test_prefix_match_is_on_module_boundaries(plugin):
    class Sloppy(ToyAdapter):
        name = "sloppy"

        def module_groups(self, policy):
            groups = super().module_groups(policy)
            groups["projector"] = ["vlm.pro"]  # not a module path: must not match vlm.proj.*
            return groups

    with pytest.raises(AdapterValidationError, match=r"'vlm\.proj\.weight' belongs to no module group"):
        classify_parameters(ToyPolicy(), Sloppy())


def test_unknown_group_name_raises(plugin):
    class Typo(ToyAdapter):
        name = "typo"

        def module_groups(self, policy):
            return {**super().module_groups(policy), "vision": ["vlm.vision"]}

    with pytest.raises(AdapterValidationError, match=r"module_groups returned unknown group 'vision'"):
        prepare_stage(ToyPolicy(), AptConfig(), adapter=Typo())


def test_prepare_twice(plugin, adapter):
    policy = ToyPolicy()
    report = prepare_stage(policy, AptConfig(stage=1), adapter=adapter)
    assert prepare_stage(policy, AptConfig(stage=1), adapter=adapter) is report
    assert prepare_stage(policy, {"stage": 1}, adapter=adapter) is report
    assert adapter.inject_calls == 1
    assert len(plugin.prepared) == 1
    with pytest.raises(AptConfigError, match=r"already prepared for stage 1.*a policy is prepared once") as info:
        prepare_stage(policy, AptConfig(stage=2), adapter=adapter)
    assert info.value.field == "apt"
    assert apt_state(policy).config == AptConfig(stage=1)
    assert not hasattr(policy.expert, "apt_fusion")


def test_unsupported_host_version_stops_before_injecting(plugin):
    class Old(ToyAdapter):
        name = "old_torch"
        supported_host_versions = "<1"

    old = Old()
    policy = ToyPolicy()
    with pytest.raises(HostVersionError, match=r"adapter 'old_torch' supports torch <1, but version"):
        prepare_stage(policy, AptConfig(stage=2), adapter=old)
    assert old.inject_calls == 0 and apt_state(policy) is None
    assert not hasattr(policy.expert, "apt_fusion")


def test_format_table(plugin, adapter):
    policy = ToyPolicy()
    report = prepare_stage(policy, AptConfig(stage=1), adapter=adapter)
    table = report.format_table()
    lines = table.splitlines()
    assert lines[0] == "APT stage 1 on adapter 'toy_vla' (vlm_mode=frozen)"
    rows = {line.split()[0]: line for line in lines[2:-1]}
    assert set(rows) == {"vision_tower", "projector", "language_model", "action_expert", "unused", "total"}
    expert = sum(p.numel() for p in policy.expert.parameters())
    frozen = sum(p.numel() for p in policy.vlm.parameters())
    assert rows["action_expert"].split() == ["action_expert", f"{expert:,}", "0", f"{len(list(policy.expert.parameters()))}/0"]
    assert rows["total"].split()[1:3] == [f"{expert:,}", f"{frozen:,}"]
    assert lines[-1] == "language masking: language masked from the action path"
    assert report.as_dict()["groups"]["action_expert"]["trainable_elements"] == expert

    other = ToyPolicy()
    report2 = prepare_stage(other, AptConfig(stage=2, inherited_layers_keep_language_mask=False), adapter=adapter)
    table2 = report2.format_table()
    assert re.search(r"^fusion\s+[\d,]+\s+0\s+\d+/0$", table2, re.M)
    assert table2.endswith("language masking: language visible to inherited layers")


def test_gate_statistics(plugin, adapter):
    stage1 = ToyPolicy()
    prepare_stage(stage1, AptConfig(stage=1), adapter=adapter)
    assert gate_statistics(stage1) == {}
    assert gate_statistics(ToyPolicy()) == {}  # not prepared
    stage2 = ToyPolicy()
    prepare_stage(stage2, AptConfig(stage=2, gate_init_logit=2.0), adapter=adapter)
    stats = gate_statistics(stage2)
    assert set(stats) == {"apt/gate_mean/layer0", "apt/gate_std/layer0", "apt/gate_mean/layer1", "apt/gate_std/layer1"}
    assert stats["apt/gate_mean/layer0"] == pytest.approx(torch.sigmoid(torch.tensor(2.0)).item())
    assert stats["apt/gate_std/layer1"] == pytest.approx(0.0, abs=1e-6)


def test_stage2_lora_trains_only_the_adapters(plugin, adapter):
    pytest.importorskip("peft")
    policy = ToyPolicy()
    report = prepare_stage(policy, AptConfig(stage=2, vlm_mode="lora", lora_rank=2, lora_alpha=4), adapter=adapter)
    lora = {n for n, _ in policy.named_parameters() if ".lora_" in n}
    assert lora and all(n.startswith("vlm.lm.layers.") for n in lora)
    for name, p in policy.named_parameters():
        expected = name.startswith("expert.") or name in lora
        assert p.requires_grad == expected, name
    assert report.groups["language_model"].trainable_tensors == len(lora)
    groups = {g["name"]: g for g in param_groups(policy, 1e-3, 0.01)}
    assert {id(p) for p in groups["vlm"]["params"]} == {id(p) for n, p in policy.named_parameters() if n in lora}
    policy.train()
    assert not policy.vlm.vision.training and not policy.vlm.lm.layers[0].base_layer.training


def test_freeze_module_survives_parent_train():
    parent = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5))
    freeze_module(parent[1])
    parent.train()
    assert parent.training and parent[0].training and not parent[1].training
    parent[1].train(True)
    assert not parent[1].training


# ==================================================================================================
# strict checkpoints
# ==================================================================================================
class Net(nn.Module):
    def __init__(self, seed=0, head_out=2, fusion=False):
        super().__init__()
        torch.manual_seed(seed)
        self.enc = nn.Module()
        self.enc.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))
        self.head = nn.Linear(4, head_out)
        if fusion:
            self.apt_fusion = nn.Linear(4, 4)


def clone_state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_load_strict_success():
    model, other = Net(0), Net(1)
    sd = clone_state(other)
    report = load_state_dict_strict(model, sd, source="ckpt.safetensors")
    assert report.loaded == sorted(sd) and report.fresh == [] and report.source == "ckpt.safetensors"
    assert fingerprint(model) == fingerprint(other)
    assert "carried over 8 tensors from ckpt.safetensors" in report.summary()


def test_missing_keys_grouped_and_nothing_loaded():
    model = Net(0)
    before = fingerprint(model)
    sd = clone_state(Net(1))
    for i in range(3):
        del sd[f"enc.layers.{i}.weight"]
    with pytest.raises(CheckpointMismatchError, match=r"checkpoint ckpt does not match the model; nothing was loaded") as info:
        load_state_dict_strict(model, sd, source="ckpt")
    err = info.value
    assert err.missing == ["enc.layers.0.weight", "enc.layers.1.weight", "enc.layers.2.weight"]
    assert err.unexpected == [] and err.mismatched == []
    msg = str(err)
    assert "missing from the checkpoint (3 tensors):" in msg
    assert "enc.layers.*: 3 tensors, e.g. enc.layers.0.weight" in msg
    # not partially loaded: the biases and the head in the file were not copied
    assert fingerprint(model) == before


def test_unexpected_key_raises():
    model = Net(0)
    before = fingerprint(model)
    sd = clone_state(Net(1))
    sd["extra.layer.weight"] = torch.zeros(2)
    with pytest.raises(CheckpointMismatchError, match=r"unexpected in the checkpoint \(1 tensors\):\n    extra\.layer: 1 tensors") as info:
        load_state_dict_strict(model, sd, source="ckpt", explain=lambda m, u: f"explained {len(m)}/{len(u)}")
    assert info.value.unexpected == ["extra.layer.weight"]
    assert "likely cause: explained 0/1" in str(info.value)
    assert fingerprint(model) == before


def test_shape_mismatch_raises():
    model = Net(0)
    before = fingerprint(model)
    sd = clone_state(Net(1, head_out=3))
    with pytest.raises(CheckpointMismatchError, match=re.escape("shape mismatch (2 tensors):\n    head: 2 tensors")) as info:
        load_state_dict_strict(model, sd, source="ckpt")
    assert info.value.mismatched == [
        "head.bias (checkpoint (3,) vs model (2,))",
        "head.weight (checkpoint (3, 4) vs model (2, 4))",
    ]
    assert info.value.missing == [] and info.value.unexpected == []
    assert fingerprint(model) == before


def test_fresh_prefixes():
    model = Net(0, fusion=True)
    fusion_before = fingerprint(model, names=["apt_fusion.weight", "apt_fusion.bias"])
    other = Net(1)
    sd = clone_state(other)
    with pytest.raises(CheckpointMismatchError, match=r"missing from the checkpoint \(2 tensors\)"):
        load_state_dict_strict(model, sd, source="stage1")
    report = load_state_dict_strict(model, sd, source="stage1", fresh_prefixes=["apt_fusion"])
    assert report.fresh == ["apt_fusion.bias", "apt_fusion.weight"]
    assert report.loaded == sorted(sd)
    assert fingerprint(model, names=["apt_fusion.weight", "apt_fusion.bias"]) == fusion_before
    assert fingerprint(model, names=list(sd)) == fingerprint(other)
    assert "new (fresh) tensors: 2: apt_fusion (2)" in report.summary()


class LoraLinear(nn.Module):
    """The state-dict layout of a peft LoRA wrapper: ``base_layer`` plus ``lora_A/B.default``."""

    def __init__(self):
        super().__init__()
        self.base_layer = nn.Linear(4, 4)
        self.lora_A = nn.ModuleDict({"default": nn.Linear(4, 2, bias=False)})
        self.lora_B = nn.ModuleDict({"default": nn.Linear(2, 4, bias=False)})


class LoraNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.q = LoraLinear()
        self.k = nn.Linear(4, 4)


def test_base_layer_keys_map_to_plain_keys():
    model = LoraNet()
    plain = nn.Module()
    plain.q, plain.k = nn.Linear(4, 4), nn.Linear(4, 4)
    sd = clone_state(plain)  # q.weight, q.bias, k.weight, k.bias
    report = load_state_dict_strict(model, sd, source="plain", fresh_substrings=[".lora_"])
    assert report.loaded == ["k.bias", "k.weight", "q.base_layer.bias", "q.base_layer.weight"]
    assert report.fresh == ["q.lora_A.default.weight", "q.lora_B.default.weight"]
    assert torch.equal(model.q.base_layer.weight, plain.q.weight)
    assert torch.equal(model.q.base_layer.bias, plain.q.bias)
    # LoRA tensors are new only when the caller says so
    with pytest.raises(CheckpointMismatchError, match=r"missing from the checkpoint \(2 tensors\)"):
        load_state_dict_strict(LoraNet(), sd, source="plain")
    # a LoRA checkpoint with its own base_layer keys loads as is
    full = clone_state(LoraNet())
    assert len(load_state_dict_strict(LoraNet(), full, source="lora").loaded) == len(full)


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(5, 4)
        self.body = nn.Linear(4, 4)
        self.head = nn.Linear(4, 5, bias=False)
        self.head.weight = self.emb.weight


@pytest.mark.parametrize("kept", ["emb.weight", "head.weight"])
def test_tied_weights_load_from_one_name(kept):
    model = Tied()
    assert {"emb.weight", "head.weight"} <= set(model.state_dict())
    source = Tied()
    with torch.no_grad():
        source.emb.weight.add_(1.0)
    sd = clone_state(source)
    del sd["head.weight" if kept == "emb.weight" else "emb.weight"]
    report = load_state_dict_strict(model, sd, source="tied")
    assert "emb.weight" in report.loaded and "head.weight" in report.loaded
    assert torch.equal(model.emb.weight, source.emb.weight)
    assert model.head.weight is model.emb.weight
    assert torch.equal(model.body.weight, source.body.weight)


def test_fingerprint():
    a, b = Net(0), Net(0)
    fa = fingerprint(a)
    assert fa == fingerprint(b)
    assert set(fa) == {n for n, _ in a.named_parameters()}
    with torch.no_grad():
        b.head.weight[1, 2] += 1e-3
    fb = fingerprint(b)
    assert [n for n in fa if fa[n] != fb[n]] == ["head.weight"]
    # selection
    assert set(fingerprint(a, names=["head.bias"])) == {"head.bias"}
    a.head.requires_grad_(False)
    assert set(fingerprint(a, frozen_only=True)) == {"head.weight", "head.bias"}


def test_tensor_fingerprint_bf16_dtype_and_shape():
    t = torch.randn(4, 6).to(torch.bfloat16)
    assert tensor_fingerprint(t) == tensor_fingerprint(t.clone())
    u = t.clone()
    u[3, 5] = u[3, 5] + 1
    assert tensor_fingerprint(u) != tensor_fingerprint(t)
    # smallest possible change: flip the lowest mantissa bit of one element
    bits = t.clone().view(torch.int16)
    bits[0, 0] ^= 1
    assert tensor_fingerprint(bits.view(torch.bfloat16)) != tensor_fingerprint(t)
    assert tensor_fingerprint(t) != tensor_fingerprint(t.float())  # same values, other dtype
    assert tensor_fingerprint(t) != tensor_fingerprint(t.reshape(6, 4))  # same bytes, other shape
    assert tensor_fingerprint(t.t()) == tensor_fingerprint(t.t().contiguous())  # layout does not matter
    assert tensor_fingerprint(torch.zeros(0)) == tensor_fingerprint(torch.zeros(0))
    assert tensor_fingerprint(torch.tensor(1.5)) != tensor_fingerprint(torch.tensor(2.5))


def test_manifest_round_trip(tmp_path):
    assert read_manifest(tmp_path) is None
    manifest = {"stage": 1, "adapter": "toy_vla", "apt": AptConfig().model_dump()}
    path = write_manifest(tmp_path, manifest)
    assert path == tmp_path / MANIFEST_NAME
    assert read_manifest(tmp_path) == manifest
    assert not list(tmp_path.glob("*.tmp"))


def test_explain_mismatch():
    fusion = ["model.apt_fusion.0.q_proj.weight"]
    assert "plain LeRobot checkpoint" in explain_mismatch(None, None, 2, fusion, [])
    assert "load it with apt.stage=2" in explain_mismatch({"stage": 2}, 2, 1, [], fusion)
    assert "fusion layers do not match" in explain_mismatch({"stage": 2}, 2, 2, fusion, [])
    assert "vlm_mode='lora'" in explain_mismatch({}, 1, 1, [], ["x.q.lora_A.default.weight"])
    assert "differently sized" in explain_mismatch({}, 1, 1, ["a.b"], [])


def test_group_keys():
    rows = group_keys(["a.layers.0.w", "a.layers.1.w", "b.w", "c"])
    assert rows == [("a.layers.*", 2, "a.layers.0.w"), ("<root>", 1, "c"), ("b", 1, "b.w")]


# ==================================================================================================
# gating
# ==================================================================================================
def cross_inputs(seed=0, bsz=2, seq=5, kv=2, ctx=7, head_dim=4, dim=16):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(bsz, seq, dim, generator=g)
    keys = torch.randn(bsz, kv, ctx, head_dim, generator=g)
    values = torch.randn(bsz, kv, ctx, head_dim, generator=g)
    mask = torch.rand(bsz, seq, ctx, generator=g) > 0.4
    mask[0, 1, :] = False  # one query sees no key at all
    mask[1, 2, :] = True
    return x, keys, values, mask


@pytest.mark.parametrize("granularity", ["channel", "scalar"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_zero_init_is_exact_identity(granularity, seed):
    torch.manual_seed(seed)
    layer = GatedCrossAttention(16, 4, 4, gate_granularity=granularity, zero_init=True)
    x, keys, values, mask = cross_inputs(seed)
    out = layer(x, keys, values, mask)
    assert torch.isfinite(out).all()
    assert torch.equal(out, x)
    assert torch.equal(layer.o_proj.weight, torch.zeros_like(layer.o_proj.weight))


def test_zero_init_identity_in_bf16():
    torch.manual_seed(0)
    layer = GatedCrossAttention(16, 4, 4).to(torch.bfloat16)
    x, keys, values, mask = cross_inputs(3)
    x = x.to(torch.bfloat16)
    out = layer(x, keys.to(torch.bfloat16), values.to(torch.bfloat16), mask)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, x)


def test_zero_init_layer_can_open():
    torch.manual_seed(0)
    layer = GatedCrossAttention(16, 4, 4)
    x, keys, values, mask = cross_inputs(0)
    layer(x, keys, values, mask).pow(2).sum().backward()
    assert layer.o_proj.weight.grad.abs().sum() > 0  # the closed layer gets a gradient to open
    assert layer.q_proj.weight.grad.abs().sum() == 0  # nothing upstream of the zero projection moves yet


def test_random_output_projection_reads_the_keys():
    torch.manual_seed(0)
    layer = GatedCrossAttention(16, 4, 4, zero_init=False)
    assert layer.o_proj.weight.abs().sum() > 0
    x, keys, values, mask = cross_inputs(0)
    out = layer(x, keys, values, mask)
    assert torch.isfinite(out).all()  # including the query with every key masked
    assert not torch.allclose(out, x)
    # the fully masked query attends uniformly (finite mask value, no NaN)
    assert ATTENTION_MASK_VALUE > torch.finfo(torch.float32).min
    # other keys change the output of every query that can see them
    keys2 = keys + torch.randn_like(keys)
    out2 = layer(x, keys2, values, mask)
    sees_any = mask.any(-1)
    diff = (out2 - out).abs().amax(-1)
    assert (diff[sees_any] > 0).all()


def test_masked_keys_do_not_leak():
    torch.manual_seed(0)
    layer = GatedCrossAttention(16, 4, 4, zero_init=False)
    x, keys, values, mask = cross_inputs(1)
    mask[:, :, 3] = False
    mask[1, 2, :] = True
    mask[1, 2, 3] = False
    out = layer(x, keys, values, mask)
    keys2, values2 = keys.clone(), values.clone()
    keys2[:, :, 3] += 10.0
    values2[:, :, 3] -= 10.0
    out2 = layer(x, keys2, values2, mask)
    # every query that sees at least one key is unaffected by the hidden one; a query that sees no
    # key at all (row 0, 1) attends uniformly to everything (finite mask value, as in LeRobot's pi0)
    sees_any = mask.any(-1)
    assert not sees_any[0, 1]
    torch.testing.assert_close(out2[sees_any], out[sees_any], rtol=0, atol=1e-6)
    # sanity: unmask it and the change shows
    mask[:, :, 3] = True
    assert not torch.allclose(layer(x, keys2, values2, mask), layer(x, keys, values, mask))


def test_rotate_queries_is_applied():
    torch.manual_seed(0)
    layer = GatedCrossAttention(16, 4, 4, zero_init=False)
    x, keys, values, mask = cross_inputs(0)
    seen = []

    def rotate(q):
        seen.append(tuple(q.shape))
        return -q

    out = layer(x, keys, values, mask, rotate_queries=rotate)
    assert seen == [(2, 4, 5, 4)]
    assert not torch.allclose(out, layer(x, keys, values, mask))


@pytest.mark.parametrize("init", [0.0, -3.0, 1.5])
def test_sigmoid_gate_shapes_and_init(init):
    channel = SigmoidGate(6, "channel", init)
    scalar = SigmoidGate(6, "scalar", init)
    assert channel.logit.shape == (6,) and scalar.logit.shape == ()
    assert torch.equal(channel.logit, torch.full((6,), init))
    assert channel().shape == (6,) and scalar().shape == ()
    expected = torch.sigmoid(torch.tensor(init))
    assert torch.allclose(channel(), expected.expand(6)) and torch.allclose(scalar(), expected)
    assert isinstance(channel.logit, nn.Parameter) and channel.logit.requires_grad


def test_sigmoid_gate_default_and_bad_granularity():
    gate = SigmoidGate(3)
    assert gate.logit.shape == (3,) and torch.allclose(gate(), torch.full((3,), 0.5))
    with pytest.raises(ValueError, match="granularity must be 'scalar' or 'channel', got 'head'"):
        SigmoidGate(3, "head")
    layer = GatedCrossAttention(16, 4, 4, gate_granularity="scalar", gate_init_logit=-1.0)
    assert layer.gate.logit.shape == () and layer.gate.logit.item() == -1.0


def test_lazy_exports_are_the_gating_classes():
    assert apt_plugins.GatedCrossAttention is GatedCrossAttention
    assert apt_plugins.SigmoidGate is SigmoidGate
