"""The GR00T N1.7 adapter beyond the shared suite: where language flows, masks, NaN, processor, retrofit, lerobot-train."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import unit_stats, use_offline_hub
import torch

pytest.importorskip("diffusers")
pytest.importorskip("tree")

from apt_plugins import AptConfig  # noqa: E402
from apt_plugins_lerobot_groot.testing import (  # noqa: E402
    IMAGE_TOKEN,
    GrootConformanceKit,
    model_batch,
    write_cosmos_fixture,
    write_tiny_groot,
)

KIT = GrootConformanceKit()
BACKBONE_KEYS = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")


def _words(n: int, seed: int) -> torch.Tensor:
    return torch.randint(10, 400, (2, n), generator=torch.Generator().manual_seed(seed))


def _image_rows(batch):
    """Per sample, the (identical) positions of the image tokens."""
    return [torch.nonzero(row == IMAGE_TOKEN).flatten() for row in batch["input_ids"]]


# ----------------------------------------------------------------------------------- the stock paths
def test_image_tokens_are_language_free_in_the_stock_backbone():
    """Images precede the text under causal attention: the backbone's image features ignore the
    instruction (bit for bit at equal length); the language positions do depend on it (control)."""
    policy = KIT.build(None).eval()
    backbone = policy._groot_model.backbone
    a, b = model_batch(instruction=_words(5, 1)), model_batch(instruction=_words(5, 2))
    with torch.no_grad():
        fa = backbone({k: a[k] for k in BACKBONE_KEYS})["backbone_features"]
        fb = backbone({k: b[k] for k in BACKBONE_KEYS})["backbone_features"]
    image = a["input_ids"] == IMAGE_TOKEN
    assert torch.equal(fa[image], fb[image])
    assert not torch.allclose(fa[:, -3], fb[:, -3])  # an instruction position
    # A different length moves the left padding; the image features agree up to rounding.
    c = model_batch(instruction=_words(3, 3))
    with torch.no_grad():
        fc = backbone({k: c[k] for k in BACKBONE_KEYS})["backbone_features"]
    assert torch.allclose(fa[image], fc[c["input_ids"] == IMAGE_TOKEN], atol=1e-5)


def test_stock_vl_self_attention_mixes_language_into_image_features():
    """The control for the vl_self_attention mask: without it, image features change with the instruction."""
    policy = KIT.build(None).eval()
    model = policy._groot_model
    a, b = model_batch(instruction=_words(5, 1)), model_batch(instruction=_words(5, 2))
    image = a["input_ids"] == IMAGE_TOKEN
    with torch.no_grad():
        outs = [model.action_head.process_backbone_output(model.backbone({k: x[k] for k in BACKBONE_KEYS}))
                ["backbone_features"][image] for x in (a, b)]
    assert not torch.allclose(*outs)


# ----------------------------------------------------------------------------------- the APT paths
def _context(policy, batch):
    with torch.no_grad():
        return policy._groot_model._apt_context({k: batch[k] for k in BACKBONE_KEYS})


@pytest.mark.parametrize("stage", [1, 2])
def test_apt_vl_features_and_masks_ignore_the_instruction(stage):
    """vl_self_attention and everything the DiT reads are bit-identical for any instruction (length too)."""
    policy = KIT.build(AptConfig(stage=stage, fusion_context="language")).eval()
    ref = _context(policy, model_batch(instruction=_words(5, 1)))
    for words in (_words(5, 2), _words(2, 3), _words(9, 4), _words(0, 5)):
        ctx = _context(policy, model_batch(instruction=words))
        assert torch.equal(ctx.features, ref.features) and torch.equal(ctx.valid, ref.valid)
        assert torch.equal(ctx.image, ref.image)
    # The visible tokens: header, vision markers, images; never the instruction or the closing template.
    assert int(ref.valid.sum(dim=1).max()) == 3 + 1 + 4 + 1
    if stage == 2:  # the fusion layers read the language tokens of the full pass
        assert ref.fusion_valid is not None and int(ref.fusion_valid.sum(dim=1)[0]) == 5 + 2


@pytest.mark.parametrize("fusion_context", ["language", "all"])
def test_stage2_language_features_continue_the_visible_pass(fusion_context):
    """Stage 2 runs the language tokens as a KV-cache continuation of the visible pass (no second full
    pass): the vision tower runs once, and the fusion features equal those of the stock full-prompt
    pass up to rounding (a causal LM), with ragged instructions (padding in both passes)."""
    from apt_plugins_lerobot_groot.modeling import language_tokens

    policy = KIT.build(AptConfig(stage=2, fusion_context=fusion_context)).eval()
    model = policy._groot_model
    batch = model_batch(instruction=[[11, 12, 13, 14, 15, 16, 17], [21, 22]])
    calls = []
    handle = model.backbone.visual.register_forward_hook(lambda *args: calls.append(1))
    try:
        ctx = _context(policy, batch)
    finally:
        handle.remove()
    assert len(calls) == 1
    with torch.no_grad():
        full = model.action_head.vlln(model.backbone({k: batch[k] for k in BACKBONE_KEYS})["backbone_features"])
    valid = batch["attention_mask"] == 1
    cfg = model.backbone.model.config
    if fusion_context == "language":
        expected = valid & language_tokens(batch["input_ids"], valid, cfg.image_token_id, cfg.vision_end_token_id)
    else:  # visible tokens then language tokens: the prompt order
        expected = valid
    assert ctx.fusion_valid.sum(dim=1).tolist() == expected.sum(dim=1).tolist()
    for b in range(valid.shape[0]):
        got, want = ctx.fusion_features[b][ctx.fusion_valid[b]], full[b][expected[b]]
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    # Control: the instruction reaches these features.
    other = _context(policy, model_batch(instruction=[[31, 32, 33, 34, 35, 36, 37], [41, 42]]))
    assert not torch.allclose(other.fusion_features[ctx.fusion_valid], ctx.fusion_features[ctx.fusion_valid])


def test_every_dit_cross_attention_row_has_a_valid_key_and_no_language():
    """Capture the masks each DiT block receives: text blocks read non-image visible tokens, image
    blocks the image tokens, every row has a key; the encoder tokens are the visible ones only."""
    policy = KIT.build(AptConfig(stage=1)).eval()
    seen = []

    def hook(module, args, kwargs):
        seen.append((kwargs.get("encoder_hidden_states"), kwargs.get("encoder_attention_mask")))

    blocks = policy._groot_model.action_head.model.transformer_blocks
    handles = [b.register_forward_pre_hook(hook, with_kwargs=True) for b in blocks]
    try:
        KIT.actions(policy, model_batch(instruction=_words(5, 1), with_action=False))
    finally:
        for h in handles:
            h.remove()
    cross = [(enc, mask) for enc, mask in seen if enc is not None]
    assert cross and all(mask is not None and bool(mask.any(dim=1).all()) for _, mask in cross)
    assert all(enc.shape[1] == 9 for enc, _ in cross)  # 3 header + vision start + 4 images + vision end


def test_text_blocks_fall_back_to_the_visible_tokens_without_nan():
    """A prompt with nothing but images before the text: the text blocks read the images (defined, finite)."""
    policy = KIT.build(AptConfig(stage=2)).eval()
    KIT.perturb_fusion(policy)

    def bare(words):
        batch = model_batch(instruction=words, with_action=True)
        ids = torch.full_like(batch["input_ids"], 507)
        mask = torch.zeros_like(batch["attention_mask"])
        for b in range(ids.shape[0]):
            seq = [IMAGE_TOKEN] * 4 + words[b].tolist()
            ids[b, -len(seq):] = torch.tensor(seq)
            mask[b, -len(seq):] = 1
        return dict(batch, input_ids=ids, attention_mask=mask)

    a, b = bare(_words(5, 1)), bare(_words(3, 2))
    stage1 = KIT.build(AptConfig(stage=1)).eval()
    xa, xb = KIT.actions(stage1, a), KIT.actions(stage1, b)
    assert torch.isfinite(xa).all() and torch.equal(xa, xb)
    stage1.train()
    assert torch.isfinite(KIT.loss(stage1, a))
    assert torch.isfinite(KIT.actions(policy, a)).all()


@pytest.mark.parametrize("variant", ["swapped", "empty", "shuffled"])
def test_probe_batch_variants_stage1_exact_and_finite(variant):
    from apt_plugins import get_plugin_manager

    adapter = get_plugin_manager().get_adapter("lerobot_groot")
    policy = KIT.build(AptConfig(stage=1)).eval()
    ref = KIT.actions(policy, adapter.probe_batch(policy))
    got = KIT.actions(policy, adapter.probe_batch(policy, variant=variant))
    assert torch.isfinite(got).all() and torch.equal(ref, got)
    stage2 = KIT.build(AptConfig(stage=2, fusion_context="language")).eval()
    KIT.perturb_fusion(stage2)
    assert torch.isfinite(KIT.actions(stage2, adapter.probe_batch(stage2, variant=variant))).all()


def test_lifted_mask_reproduces_the_stock_policy_exactly():
    """inherited_layers_keep_language_mask=False with closed gates is the stock GR00T function."""
    stock = KIT.build(None)
    policy = KIT.build(AptConfig(stage=2, inherited_layers_keep_language_mask=False))
    batch = KIT.make_batch()
    assert torch.equal(KIT.loss(stock, batch), KIT.loss(policy, batch))
    assert torch.equal(KIT.actions(stock, batch), KIT.actions(policy, batch))


# ----------------------------------------------------------------------------------- processor
@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    write_cosmos_fixture(root)
    return root


@pytest.fixture
def offline_hub(hub_cache, monkeypatch):
    return use_offline_hub(monkeypatch, hub_cache)


def _stats():
    return unit_stats(6)


def test_stage1_through_the_real_groot_processor(offline_hub):
    """The real Cosmos-Reason2/Qwen3-VL processor (tiny fixture): any instruction, same actions."""
    from apt_plugins_lerobot_groot.processor_apt_groot import make_apt_groot_pre_post_processors

    policy = KIT.build(AptConfig(stage=1)).eval()
    pre, _ = make_apt_groot_pre_post_processors(policy.config, dataset_stats=_stats())
    image = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0))

    def act(task, state=None):
        raw = {"observation.images.top": image, "task": task,
               "observation.state": state if state is not None else torch.linspace(-0.9, 0.9, 6)}
        out = pre(raw)
        assert int((out["input_ids"] == IMAGE_TOKEN).sum()) == 4
        torch.manual_seed(0)
        policy.reset()
        return policy.predict_action_chunk(out)

    a = act("pick the red cube")
    for other in ("open the green drawer", "", "cube red the pick", "put the blue cup on the yellow plate"):
        assert torch.equal(a, act(other)), other
    assert not torch.equal(a, act("pick the red cube", state=-torch.linspace(-0.9, 0.9, 6)))


# ----------------------------------------------------------------------------------- retrofit
def test_retrofit_plain_groot_checkpoint(tmp_path):
    from apt_plugins.lerobot.retrofit import retrofit

    from apt_plugins_lerobot_groot.modeling_apt_groot import APTGrootPolicy

    stock = KIT.build(None)
    with torch.no_grad():  # a "fine-tuned" head, so the retrofit carries trained weights over
        for p in stock._groot_model.action_head.parameters():
            p.add_(0.01)
    stock.save_pretrained(tmp_path / "plain")
    # Stage 2 keeping the stock paths: the probe must reproduce the source exactly, or nothing is written.
    report = retrofit(tmp_path / "plain", tmp_path / "s2", stage=2,
                      apt_overrides={"inherited_layers_keep_language_mask": False})
    assert report.probe["must_match"] and report.probe["identical"], report.probe
    assert report.added and all(".apt_fusion." in k for k in report.added)
    config = json.loads((tmp_path / "s2" / "config.json").read_text())
    assert config["type"] == "apt_groot" and config["apt"]["stage"] == 2
    # Stage 1: loads strictly as an APT policy and ignores the instruction.
    retrofit(tmp_path / "plain", tmp_path / "s1", stage=1)
    loaded = APTGrootPolicy.from_pretrained(tmp_path / "s1")
    assert loaded.apt_load_report.fresh == []
    src = dict(stock.state_dict())
    for name, value in loaded.state_dict().items():
        assert torch.equal(src[name], value), name
    assert torch.equal(KIT.actions(loaded, KIT.make_batch(0)), KIT.actions(loaded, KIT.make_batch(1)))


# ----------------------------------------------------------------------------------- lerobot-train
BIN = Path(sys.executable).parent
TINY = ["--policy.device=cpu", "--policy.push_to_hub=false", "--policy.chunk_size=4", "--policy.n_action_steps=4",
        "--policy.max_state_dim=8", "--policy.max_action_dim=8", "--policy.use_bf16=false"]


@pytest.mark.e2e
def test_two_stages_through_lerobot_train(tmp_path):
    """Stage 1 -> Stage 2 (strict promotion) through ``lerobot-train --policy.type=apt_groot``, offline."""
    from apt_plugins.lerobot.data import make_synthetic_dataset

    make_synthetic_dataset(tmp_path / "data", episodes_per_task=1, frames_per_episode=8)
    write_cosmos_fixture(tmp_path / "hub")
    base = write_tiny_groot(tmp_path / "base" / "groot")
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1",
           "HF_LEROBOT_HOME": str(tmp_path / "home"), "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}

    def train(out, *extra):
        args = [str(BIN / "lerobot-train"), "--policy.type=apt_groot", f"--policy.base_model_path={base}", *TINY,
                *extra, "--dataset.repo_id=local/apt_demo", f"--dataset.root={tmp_path / 'data'}", "--batch_size=2",
                "--steps=2", "--num_workers=0", "--save_freq=2", "--log_freq=1", f"--output_dir={tmp_path / out}",
                "--wandb.enable=false"]
        proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
        out_text = proc.stdout + proc.stderr
        assert proc.returncode == 0, out_text[-4000:]
        return out_text

    s1 = train("s1", "--policy.apt.stage=1", "--policy.apt.check_frozen=true")
    assert "APT stage 1 on adapter 'lerobot_groot'" in s1 and "frozen tensors unchanged at this checkpoint" in s1
    ckpt1 = tmp_path / "s1" / "checkpoints" / "last" / "pretrained_model"
    assert json.loads((ckpt1 / "config.json").read_text())["type"] == "apt_groot"
    s2 = train("s2", "--policy.apt.stage=2", f"--policy.pretrained_path={ckpt1}")
    assert "APT promotion Stage 1 -> Stage 2" in s2 and "new (fresh) tensors: 24" in s2
    assert "apt/gate_mean/0:" in s2
    manifest = json.loads((tmp_path / "s2" / "checkpoints" / "last" / "pretrained_model" / "apt_manifest.json").read_text())
    assert manifest["stage"] == 2 and manifest["parent"]["stage"] == 1

    # `apt-plugins retrofit` on a plain groot checkpoint: Stage 2 with the stock paths kept is exact.
    stock = KIT.build(None, base_model_path=str(base))
    stock.save_pretrained(tmp_path / "plain")
    proc = subprocess.run([str(BIN / "apt-plugins"), "retrofit", str(tmp_path / "plain"), str(tmp_path / "retro"),
                           "--stage=2", "--keep-language-paths"], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "sampled actions identical to the source policy" in proc.stdout + proc.stderr
