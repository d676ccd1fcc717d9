"""The openpi adapter beyond the conformance suite: checkpoints, retrofit, errors, openpi-train plumbing.

Runs in the openpi environment on tiny real ``PI0Pytorch`` models (see tests/openpi_env/conftest.py).
"""

from __future__ import annotations

import json

import pytest
import torch

from apt_plugins import (
    AptConfig,
    AptConfigError,
    AptError,
    CheckpointMismatchError,
    LanguageMaskError,
    apt_state,
    param_groups,
)


@pytest.fixture(scope="module")
def kit():
    from apt_plugins_openpi_pi.testing import OpenpiConformanceKit

    return OpenpiConformanceKit("openpi_pi0")


@pytest.fixture(scope="module")
def kit05():
    from apt_plugins_openpi_pi.testing import OpenpiConformanceKit

    return OpenpiConformanceKit("openpi_pi05")


def test_selects_the_adapter_by_pi05_flag(kit, kit05):
    from apt_plugins import get_plugin_manager

    pm = get_plugin_manager()
    assert pm.select_adapter(kit.build(None)).name == "openpi_pi0"
    assert pm.select_adapter(kit05.build(None)).name == "openpi_pi05"


def test_frozen_vlm_prefix_runs_without_autograd(kit):
    from apt_plugins_openpi_pi.testing import observation

    batch = kit.make_batch()
    for config, expect_graph in ((AptConfig(stage=1), False), (AptConfig(stage=2, vlm_mode="full"), True)):
        model = kit.build(config)
        images, img_masks, tokens, masks, _ = model._preprocess_observation(observation(batch), train=True)
        prefix = model._apt_prefix(images, img_masks, tokens, masks)
        assert prefix.visible_kv[0][0].requires_grad is expect_graph, config


def test_stage1_equals_stock_with_the_mask_lifted(kit):
    # With the language mask lifted, APT's split prefix/suffix pass must be openpi's function (close in
    # fp32: openpi computes prefix and suffix in one joint attention, so only summation order differs).
    stock = kit.build(None).eval()
    apt = kit.build(AptConfig(stage=2, inherited_layers_keep_language_mask=False)).eval()
    batch = kit.make_batch()
    a, b = kit.actions(stock, batch), kit.actions(apt, batch)
    assert torch.allclose(a, b, atol=1e-5, rtol=1e-4), float((a - b).abs().max())
    la, lb = kit.loss(stock.train(), batch), kit.loss(apt.train(), batch)
    assert torch.allclose(la, lb, atol=1e-5, rtol=1e-4), (la.item(), lb.item())


def test_pi05_needs_the_state_marker_and_keeps_state_visible(kit05):
    from apt_plugins_openpi_pi.testing import STATE_MARKER

    model = kit05.build(AptConfig(stage=1))
    batch = kit05.make_batch()
    tokens = batch["tokenized_prompt"].clone()
    tokens[tokens == STATE_MARKER] = 7
    with pytest.raises(LanguageMaskError, match=r"no 'State' marker token .*apt\.language_mask_scope='prompt'"):
        kit05.loss(model, {**batch, "tokenized_prompt": tokens})
    # The whole prompt (state included) can be hidden instead: then the state tokens stop mattering.
    whole = kit05.build(AptConfig(stage=1, language_mask_scope="prompt"))
    moved = kit05.probes(batch)["state"]
    assert torch.equal(kit05.actions(whole, batch), kit05.actions(whole, moved))
    assert not torch.equal(kit05.actions(model, batch), kit05.actions(model, moved))


def test_marker_from_environment(kit05, monkeypatch):
    from apt_plugins_openpi_pi.modeling import state_marker_id

    monkeypatch.setenv("APT_OPENPI_STATE_TOKEN_ID", "oops")
    with pytest.raises(LanguageMaskError, match=r"APT_OPENPI_STATE_TOKEN_ID='oops' is not an integer"):
        state_marker_id()
    monkeypatch.setenv("APT_OPENPI_STATE_TOKEN_ID", "1234")
    assert state_marker_id() == 1234


def test_refused_settings(kit):
    with pytest.raises(AptConfigError, match=r"apt\.fusion_source_layers=\(0,\).*one VLM layer index"):
        kit.build(AptConfig(stage=2, fusion_source_layers=[0]))
    with pytest.raises(AptConfigError, match=r"apt\.attention='sdpa'.*eager"):
        kit.build(AptConfig(stage=1, attention="sdpa"))
    with pytest.raises(AptConfigError, match=r"apt\.prefix_cache.*no prefix cache"):
        kit.build(AptConfig(stage=1, prefix_cache="memory:1GB"))


def test_torch_compile_wraps_the_apt_sampler(kit):
    from apt_plugins_openpi_pi.modeling import APTPI0Pytorch

    # openpi compiles sample_actions onto the instance at construction; the stock compiled method
    # would bypass the masks, so the APT one is compiled instead (compilation itself is lazy).
    stock = kit.build(None, pytorch_compile_mode="default")
    assert stock.__dict__["sample_actions"]._torchdynamo_orig_callable.__qualname__ == "PI0Pytorch.sample_actions"
    model = kit.build(AptConfig(stage=1), pytorch_compile_mode="default")
    compiled = model.__dict__["sample_actions"]._torchdynamo_orig_callable
    assert compiled.__qualname__ == APTPI0Pytorch.sample_actions.__qualname__ == "APTPI0Pytorch.sample_actions"


def test_bf16_stage1_invariance(kit):
    model = kit.build(AptConfig(stage=1), dtype="bfloat16")
    assert model.paligemma_with_expert.paligemma.language_model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    a, b = kit.make_batch(instruction=0), kit.make_batch(instruction=2)
    assert torch.equal(kit.actions(model, a), kit.actions(model, b))
    assert torch.isfinite(kit.loss(model, a))


def test_checkpoint_layout_and_strictness(kit, tmp_path):
    model = kit.build(AptConfig(stage=1))
    kit.save(model, tmp_path / "s1")
    assert {p.name for p in (tmp_path / "s1").iterdir()} == {"model.safetensors", "apt_manifest.json", "config.json"}
    manifest = json.loads((tmp_path / "s1" / "apt_manifest.json").read_text())
    assert manifest["adapter"] == "openpi_pi0" and manifest["stage"] == 1 and manifest["host"]["name"] == "openpi"
    saved = json.loads((tmp_path / "s1" / "config.json").read_text())
    assert saved["apt"]["stage"] == 1 and saved["model"]["action_horizon"] == 4
    # openpi's own loader reads the weights of a Stage-1 checkpoint (no APT tensors in Stage 1).
    from safetensors.torch import load_model

    load_model(kit.build(None), tmp_path / "s1" / "model.safetensors")

    from apt_plugins_openpi_pi.checkpoints import load_checkpoint

    with pytest.raises(CheckpointMismatchError, match="strict=False is not supported"):
        load_checkpoint(tmp_path / "s1", AptConfig(stage=1), strict=False)
    with pytest.raises(CheckpointMismatchError, match="no model.safetensors"):
        load_checkpoint(tmp_path / "missing", AptConfig(stage=1), kit.model_config())
    (tmp_path / "s1" / "config.json").unlink()
    with pytest.raises(CheckpointMismatchError, match="no config.json with the model config"):
        load_checkpoint(tmp_path / "s1", AptConfig(stage=1))
    # A differently sized model: every tensor is accounted for before anything is loaded.
    import dataclasses

    bigger = dataclasses.replace(kit.model_config(), action_dim=16)
    with pytest.raises(CheckpointMismatchError, match=r"action_in_proj"):
        load_checkpoint(tmp_path / "s1", AptConfig(stage=1), bigger, build=kit.construct)


def test_retrofit_plain_checkpoint(kit, tmp_path):
    from apt_plugins_openpi_pi.checkpoints import retrofit_checkpoint, save_checkpoint

    stock = kit.build(None)
    save_checkpoint(stock, tmp_path / "plain")
    (tmp_path / "plain" / "assets" / "trossen").mkdir(parents=True)
    (tmp_path / "plain" / "assets" / "trossen" / "norm_stats.json").write_text("{}")
    keep = AptConfig(stage=2, inherited_layers_keep_language_mask=False)
    model = retrofit_checkpoint(tmp_path / "plain", tmp_path / "apt", keep, build=kit.construct)
    assert (tmp_path / "apt" / "assets" / "trossen" / "norm_stats.json").is_file()
    assert sorted({n.split(".")[1] for n in model.apt_load_report.fresh}) == ["apt_fusion"]
    batch = kit.make_batch()
    a, b = kit.actions(stock.eval(), batch), kit.actions(model.eval(), batch)
    assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)
    # The retrofitted checkpoint reloads strictly as Stage 2, and is refused as a retrofit source.
    reloaded = kit.load(tmp_path / "apt", keep)
    assert reloaded.apt_load_report.fresh == []
    with pytest.raises(CheckpointMismatchError, match="already an APT checkpoint"):
        retrofit_checkpoint(tmp_path / "apt", tmp_path / "again", keep, build=kit.construct)
    # Stage 1 with a re-drawn expert keeps the VLM and changes the expert.
    s1 = retrofit_checkpoint(tmp_path / "plain", tmp_path / "s1", AptConfig(stage=1), build=kit.construct,
                             reinit_expert=True)
    groups = apt_state(s1).groups
    ref = stock.state_dict()
    for name, value in s1.named_parameters():
        if groups[name] != "action_expert":
            assert torch.equal(ref[name], value), f"{name} changed by --reinit-expert"
        elif value.ndim == 2:
            assert not torch.equal(ref[name], value), f"expert weight {name} was not re-drawn"


def test_split_apt_args():
    from apt_plugins_openpi_pi.train import split_apt_args

    apt, rest = split_apt_args(["--exp_name=x", "--apt.stage=2", "--apt.vlm_mode", "lora",
                                "--apt.fusion_source_layers=[0, 1]", "--apt.check-frozen=true", "--resume"])
    assert apt == {"stage": 2, "vlm_mode": "lora", "fusion_source_layers": [0, 1], "check_frozen": True}
    assert rest == ["--exp_name=x", "--resume"]
    with pytest.raises(AptConfigError, match=r"apt\.stag.*Did you mean 'stage'"):
        AptConfig.parse(split_apt_args(["--apt.stag=1"])[0], prefix="apt")


def test_optimizer_groups_survive_openpi_lr_schedule_and_resume(kit):
    from apt_plugins_openpi_pi.train import _Run

    config = AptConfig(stage=2, vlm_mode="full")
    run = _Run(config)
    model = run.build(kit.construct)(kit.model_config())
    AdamW = run.adamw(torch.optim.AdamW)
    opt = AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.01)
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in model.parameters() if p.requires_grad}
    expected = {g["name"]: g["lr"] / 1e-3 for g in param_groups(model, 1e-3, 0.01)}
    for pg in opt.param_groups:  # what openpi's loop does at every step
        pg["lr"] = 2e-4
    assert {g["name"]: round(g["lr"] / 2e-4, 6) for g in opt.param_groups} == pytest.approx(expected)
    state = opt.state_dict()
    resumed = AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.01)
    resumed.load_state_dict(state)
    for pg in resumed.param_groups:
        pg["lr"] = 5e-5
    assert {g["name"]: round(g["lr"] / 5e-5, 6) for g in resumed.param_groups} == pytest.approx(expected)
    assert expected["vlm"] == pytest.approx(config.vlm_lr_multiplier)


def test_lerobot_data_placeholder_explains():
    import importlib

    from apt_plugins_openpi_pi.train import _ensure_lerobot_data_module

    _ensure_lerobot_data_module()
    module = importlib.import_module("lerobot.common.datasets.lerobot_dataset")
    if not type(module).__name__.startswith("_LeRobotData"):
        pytest.skip("a LeRobot with lerobot.common.datasets is installed here")
    with pytest.raises(AptError, match=r"reads a LeRobot dataset .*only openpi's fake-data configs"):
        module.LeRobotDatasetMetadata  # noqa: B018


def test_cli_openpi_train_needs_a_stage(capsys):
    from apt_plugins.cli import main

    assert main(["openpi-train", "debug", "--exp_name=x"]) == 2
    assert "--apt.stage=1 or --apt.stage=2" in capsys.readouterr().err
