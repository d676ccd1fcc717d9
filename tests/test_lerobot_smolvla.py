"""The SmolVLA adapter beyond the shared suite: host variants, the stock function, processor, retrofit, lerobot-train."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import unit_stats
import torch

pytest.importorskip("num2words")  # SmolVLM's processor needs it (LeRobot's smolvla extra)

from apt_plugins import AptConfig, AptConfigError, CheckpointMismatchError, get_plugin_manager  # noqa: E402
from apt_plugins_lerobot_smolvla.testing import (  # noqa: E402
    IMAGE_KEY,
    SmolVLAConformanceKit,
    write_tiny_backbone,
)

KIT = SmolVLAConformanceKit()


def _adapter():
    return get_plugin_manager().get_adapter("lerobot_smolvla")


# ----------------------------------------------------------------------------------- host variants
# The suite runs the default layout (cross-attention every other layer, one expert layer per VLM
# layer). These are the other layouts SmolVLA's config allows, each a different code path.
VARIANTS = {
    "self_attn_only": dict(attention_mode="self_attn"),
    # LeRobot's own sampling fails for this layout (an empty torch.cat in the layers without an expert
    # layer); its training loss works, and APT's sampling does.
    "half_expert_layers": dict(attention_mode="self_attn", num_expert_layers=2),
    "image_special_tokens": dict(add_image_special_tokens=True),
    "padded_prefix": dict(prefix_length=24),
    "every_layer_cross": dict(self_attn_every_n_layers=-1),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_stage1_exact_and_stage2_closed_on_every_layer_layout(variant):
    """Stage 1 ignores the instruction bit for bit; a fresh Stage 2 equals it; opened fusion reads language."""
    fields = VARIANTS[variant]
    stock, stage1 = KIT.build(None, **fields), KIT.build(AptConfig(stage=1), **fields)
    stage2 = KIT.build(AptConfig(stage=2), **fields)
    a, b = KIT.make_batch(instruction=0), KIT.make_batch(instruction=1)
    assert not torch.equal(KIT.loss(stock, a), KIT.loss(stock, b))  # control: the host reads language
    if variant != "half_expert_layers":
        assert not torch.equal(KIT.actions(stock, a), KIT.actions(stock, b))
    assert torch.equal(KIT.loss(stage1, a), KIT.loss(stage1, b))
    assert torch.equal(KIT.actions(stage1, a), KIT.actions(stage1, b))
    assert not torch.equal(KIT.actions(stage1, a), KIT.actions(stage1, KIT.probes(a)["image"]))
    stage1.train(), stage2.train()
    assert torch.equal(KIT.loss(stage1, a), KIT.loss(stage2, a))
    assert torch.equal(KIT.actions(stage1, a), KIT.actions(stage2, a))
    KIT.perturb_fusion(stage2)
    assert not torch.equal(KIT.actions(stage2, a), KIT.actions(stage2, b))
    assert len(KIT.fusion_layers(stage2)) == len(stage2.model.vlm_with_expert.lm_expert.layers)


def test_lifted_mask_reproduces_stock_smolvla():
    """Mask lifted, gates closed: the host's sampled actions bit for bit, its loss to float rounding."""
    stock = KIT.build(None)
    policy = KIT.build(AptConfig(stage=2, inherited_layers_keep_language_mask=False))
    batch = KIT.make_batch()
    assert torch.equal(KIT.actions(stock, batch), KIT.actions(policy, batch))
    stock.train(), policy.train()
    assert torch.allclose(KIT.loss(stock, batch), KIT.loss(policy, batch), atol=1e-6, rtol=1e-6)
    a, b = KIT.make_batch(instruction=0), KIT.make_batch(instruction=1)
    assert not torch.equal(KIT.actions(policy, a), KIT.actions(policy, b))  # language visible everywhere


def test_state_token_still_trains_with_a_frozen_vlm():
    """The state token runs through the frozen VLM; state_proj must still get a gradient."""
    policy = KIT.build(AptConfig(stage=1))
    KIT.loss(policy, KIT.make_batch()).backward()
    grad = policy.model.state_proj.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    assert all(p.grad is None for p in policy.model.vlm_with_expert.vlm.parameters())


# Negative controls for the SmolVLA-specific paths: the suite's checks catch them when broken.
def test_invariance_check_catches_language_in_the_vlm_prefix(monkeypatch):
    from apt_plugins.testing.conformance import check_stage1_language_invariance
    from apt_plugins_lerobot_smolvla.modeling import APTVLAFlowMatching

    # The one-pass prefix of the lifted mask in Stage 1: images and state read the prompt in the VLM.
    monkeypatch.setattr(APTVLAFlowMatching, "_apt_prefix", APTVLAFlowMatching._apt_joint_prefix)
    with pytest.raises(AssertionError, match="depends on the instruction"):
        check_stage1_language_invariance(KIT, AptConfig(stage=1))


def test_frozen_check_catches_a_state_token_without_autograd(monkeypatch):
    from apt_plugins.testing.conformance import check_frozen_stays_frozen
    from apt_plugins_lerobot_smolvla.modeling import APTVLAFlowMatching

    run_vlm = APTVLAFlowMatching._apt_run_vlm

    def no_grad_state(self, embs, mask, positions, context=None):
        with torch.set_grad_enabled(torch.is_grad_enabled() and embs.shape[1] != 1):
            return run_vlm(self, embs, mask, positions, context)

    monkeypatch.setattr(APTVLAFlowMatching, "_apt_run_vlm", no_grad_state)
    with pytest.raises(AssertionError, match=r"trainable tensor model\.state_proj\..* did not change"):
        check_frozen_stays_frozen(KIT, AptConfig(stage=1))


def test_vlm_train_mode_follows_vlm_mode():
    """SmolVLA's train() forces the VLM into eval (train_expert_only); APT hands that decision to vlm_mode."""
    frozen, full = KIT.build(AptConfig(stage=2)).train(), KIT.build(AptConfig(stage=2, vlm_mode="full")).train()
    assert not frozen.model.vlm_with_expert.vlm.training
    assert full.model.vlm_with_expert.vlm.model.text_model.layers[0].training


def test_fusion_source_layers_and_summary():
    with pytest.raises(AptConfigError, match=r"apt\.fusion_source_layers.*per expert layer \(4 entries\)"):
        KIT.build(AptConfig(stage=2, fusion_source_layers=(0, 1, 2, 9)))
    policy = KIT.build(AptConfig(stage=2, fusion_source_layers=(3, 3, 3, 3)))
    KIT.perturb_fusion(policy)
    assert torch.isfinite(KIT.loss(policy, KIT.make_batch()))
    assert set(_adapter().gate_values(policy)) == {"0", "1", "2", "3"}
    assert "4 gated fusion layers" in policy.apt_report.format_table()
    assert _adapter().gate_values(KIT.build(AptConfig(stage=1))) == {}


def test_strict_loading(tmp_path):
    KIT.save(KIT.build(AptConfig(stage=1)), tmp_path / "s1")
    with pytest.raises(CheckpointMismatchError, match="strict=False is not supported"):
        KIT.load(tmp_path / "s1", AptConfig(stage=1), strict=False)
    stock = KIT.build(None)
    stock.save_pretrained(tmp_path / "plain")
    loaded = KIT.load(tmp_path / "plain", AptConfig(stage=1))  # a plain checkpoint is a complete Stage-1 one
    assert loaded.apt_load_report.fresh == []


@pytest.mark.parametrize("variant", ["swapped", "empty", "shuffled"])
def test_probe_batch_variants_stage1_exact(variant):
    policy = KIT.build(AptConfig(stage=1)).eval()
    ref = KIT.actions(policy, _adapter().probe_batch(policy))
    assert torch.equal(ref, KIT.actions(policy, _adapter().probe_batch(policy, variant=variant)))


def test_bfloat16_vlm_trains_and_samples():
    """SmolVLA loads its pretrained VLM in bfloat16 and keeps the rest in float32: APT runs that mix."""
    policy = KIT.build(AptConfig(stage=2))
    policy.model.vlm_with_expert.vlm.to(torch.bfloat16)
    KIT.perturb_fusion(policy)
    batch = KIT.make_batch()
    loss = KIT.loss(policy, batch)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for n, p in policy.named_parameters() if ".apt_fusion." in n and "o_proj" in n)
    assert torch.isfinite(KIT.actions(policy, batch).float()).all()
    stage1 = KIT.build(AptConfig(stage=1))
    stage1.model.vlm_with_expert.vlm.to(torch.bfloat16)
    assert torch.equal(KIT.actions(stage1, KIT.make_batch(0)), KIT.actions(stage1, KIT.make_batch(1)))


# ----------------------------------------------------------------------------------- processor
def test_stage1_through_the_real_smolvla_processor():
    """LeRobot's own SmolVLA pre-processor (tiny local tokenizer): any instruction, same actions."""
    from apt_plugins_lerobot_smolvla.processor_apt_smolvla import make_apt_smolvla_pre_post_processors

    policy = KIT.build(AptConfig(stage=1)).eval()
    pre, post = make_apt_smolvla_pre_post_processors(policy.config, dataset_stats=unit_stats(6))
    image = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0))

    def act(task, state=None):
        raw = {IMAGE_KEY: image, "task": task,
               "observation.state": state if state is not None else torch.linspace(-0.9, 0.9, 6)}
        torch.manual_seed(0)
        policy.reset()
        return post(policy.predict_action_chunk(pre(raw)))

    a = act("pick the red cube")
    for other in ("open the green drawer", "", "cube red the pick", "put the blue cup on the yellow plate"):
        assert torch.equal(a, act(other)), other
    assert not torch.equal(a, act("pick the red cube", state=-torch.linspace(-0.9, 0.9, 6)))


# ----------------------------------------------------------------------------------- retrofit
def test_retrofit_plain_smolvla_checkpoint(tmp_path):
    from apt_plugins.lerobot.retrofit import retrofit

    from apt_plugins_lerobot_smolvla.modeling_apt_smolvla import APTSmolVLAPolicy

    stock = KIT.build(None)
    with torch.no_grad():  # a "fine-tuned" expert, so the retrofit carries trained weights over
        for p in stock.model.vlm_with_expert.lm_expert.parameters():
            p.add_(0.01)
    stock.save_pretrained(tmp_path / "plain")
    # Stage 2 keeping the stock paths: the probe must reproduce the source exactly, or nothing is written.
    report = retrofit(tmp_path / "plain", tmp_path / "s2", stage=2,
                      apt_overrides={"inherited_layers_keep_language_mask": False})
    assert report.probe["must_match"] and report.probe["identical"], report.probe
    assert report.added and all(".apt_fusion." in k for k in report.added)
    config = json.loads((tmp_path / "s2" / "config.json").read_text())
    assert config["type"] == "apt_smolvla" and config["apt"]["stage"] == 2
    # Stage 1: loads strictly as an APT policy, carries every tensor, and ignores the instruction.
    retrofit(tmp_path / "plain", tmp_path / "s1", stage=1)
    loaded = APTSmolVLAPolicy.from_pretrained(tmp_path / "s1")
    assert loaded.apt_load_report.fresh == []
    src = dict(stock.state_dict())
    for name, value in loaded.state_dict().items():
        assert torch.equal(src[name], value), name
    assert torch.equal(KIT.actions(loaded, KIT.make_batch(0)), KIT.actions(loaded, KIT.make_batch(1)))
    # ... and promotes strictly into Stage 2 (only the fusion tensors are new), closed = Stage 1.
    promoted = APTSmolVLAPolicy.from_pretrained(tmp_path / "s1", config=KIT.policy_config(AptConfig(stage=2)))
    assert promoted.apt_load_report.fresh and all(".apt_fusion." in k for k in promoted.apt_load_report.fresh)
    assert torch.equal(KIT.actions(loaded, KIT.make_batch()), KIT.actions(promoted, KIT.make_batch()))


# ----------------------------------------------------------------------------------- lerobot-train
BIN = Path(sys.executable).parent
TINY = ["--policy.device=cpu", "--policy.push_to_hub=false", "--policy.chunk_size=4", "--policy.n_action_steps=4",
        "--policy.max_state_dim=8", "--policy.max_action_dim=8", "--policy.load_vlm_weights=false",
        "--policy.num_vlm_layers=4", "--policy.resize_imgs_with_padding=[32,32]", "--policy.num_steps=2"]


@pytest.mark.e2e
@pytest.mark.slow
def test_two_stages_through_lerobot_train(tmp_path):
    """Stage 1 -> Stage 2 (strict promotion) through ``lerobot-train --policy.type=apt_smolvla``, offline,
    then ``apt-plugins verify`` on the Stage-2 checkpoint against its parent."""
    from apt_plugins.lerobot.data import make_synthetic_dataset

    make_synthetic_dataset(tmp_path / "data", episodes_per_task=1, frames_per_episode=8)
    backbone = write_tiny_backbone(tmp_path / "smolvlm")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_LEROBOT_HOME": str(tmp_path / "home"), "WANDB_MODE": "disabled",
           "TOKENIZERS_PARALLELISM": "false"}

    def run(*args):
        proc = subprocess.run([*args], env=env, capture_output=True, text=True, timeout=600)
        out_text = proc.stdout + proc.stderr
        assert proc.returncode == 0, out_text[-4000:]
        return out_text

    def train(out, *extra):
        return run(str(BIN / "lerobot-train"), "--policy.type=apt_smolvla", f"--policy.vlm_model_name={backbone}",
                   *TINY, *extra, "--dataset.repo_id=local/apt_demo", f"--dataset.root={tmp_path / 'data'}",
                   "--batch_size=2", "--steps=2", "--num_workers=0", "--save_freq=2", "--log_freq=1",
                   f"--output_dir={tmp_path / out}", "--wandb.enable=false")

    s1 = train("s1", "--policy.apt.stage=1", "--policy.apt.check_frozen=true")
    assert "APT stage 1 on adapter 'lerobot_smolvla'" in s1 and "frozen tensors unchanged at this checkpoint" in s1
    ckpt1 = tmp_path / "s1" / "checkpoints" / "last" / "pretrained_model"
    assert json.loads((ckpt1 / "config.json").read_text())["type"] == "apt_smolvla"
    s2 = train("s2", "--policy.apt.stage=2", f"--policy.pretrained_path={ckpt1}")
    assert "APT promotion Stage 1 -> Stage 2" in s2 and "new (fresh) tensors: 16" in s2
    assert "apt/gate_mean/0:" in s2
    ckpt2 = tmp_path / "s2" / "checkpoints" / "last" / "pretrained_model"
    manifest = json.loads((ckpt2 / "apt_manifest.json").read_text())
    assert manifest["stage"] == 2 and manifest["parent"]["stage"] == 1
    verify = run(str(BIN / "apt-plugins"), "verify", str(ckpt2), "--parent", str(ckpt1))
    assert "FAIL" not in verify, verify[-3000:]
