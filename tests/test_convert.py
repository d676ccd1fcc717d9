"""``apt-plugins convert``: pi0/pi0.5 checkpoints between the LeRobot and openpi layouts, checked on both hosts.

The cross-host test builds tiny real LeRobot policies whose sizes equal the tiny openpi models
(width 64, depth 2, 8 heads of 8, one 32-wide SigLIP layer with 14-pixel patches on 224-pixel
images, three cameras, vocabulary 1024), converts them to openpi's layout and loads them strictly
into openpi's real ``PI0Pytorch`` in ``.venv-openpi`` (a subprocess), and the other way round, then
compares sampled actions and training losses on the same model inputs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from apt_plugins import AptConfig, CheckpointMismatchError
from apt_plugins.convert import convert_checkpoint, lerobot_to_openpi_key, openpi_to_lerobot_key

ROOT = Path(__file__).resolve().parents[1]
OPENPI_PYTHON = ROOT / ".venv-openpi" / "bin" / "python"
IMAGE_KEYS = ("base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb")
SIZES = dict(width=64, depth=2, mlp_dim=128, head_dim=8, vision_width=32, vision_layers=1, vision_heads=2,
             patch_size=14, vocab=1024)
MARKER, STEPS, PROMPT_LEN = 60, 3, 16
#: fp32 agreement of the two hosts (transformers 5.x vs openpi's patched 4.53.2 Gemma/SigLIP).
ATOL = 5e-5  # measured: <= 1.5e-5 for pi0, <= 4e-7 for pi0.5 (actions of magnitude ~1-3)
CASES = {
    "pi0_stock": (False, None), "pi0_s1": (False, {"stage": 1}),
    "pi0_s2_lora": (False, {"stage": 2, "vlm_mode": "lora"}),
    "pi05_stock": (True, None), "pi05_s1": (True, {"stage": 1}),
    "pi05_s2_lora": (True, {"stage": 2, "vlm_mode": "lora"}),
}


def _kit(pi05: bool):
    from apt_plugins_lerobot_pi.testing import PiConformanceKit

    return PiConformanceKit("lerobot_pi05" if pi05 else "lerobot_pi0")


def _overrides() -> dict:
    from lerobot.configs.types import FeatureType, PolicyFeature

    images = {f"observation.images.{k}": PolicyFeature(type=FeatureType.VISUAL, shape=(3, 224, 224))
              for k in IMAGE_KEYS}
    return dict(input_features={**images, "observation.state": PolicyFeature(type=FeatureType.STATE, shape=(8,))},
                output_features={"action": PolicyFeature(type=FeatureType.ACTION, shape=(8,))},
                image_resolution=(224, 224), tokenizer_max_length=PROMPT_LEN)


def _inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    b = 2
    out = {f"image.{k}": torch.rand(b, 3, 224, 224, generator=g) * 2 - 1 for k in IMAGE_KEYS}
    out.update({f"image_mask.{k}": torch.ones(b, dtype=torch.bool) for k in IMAGE_KEYS})
    out["image_mask.right_wrist_0_rgb"] = torch.tensor([True, False])  # a missing camera in one row
    out["state"] = torch.rand(b, 8, generator=g) * 2 - 1
    out["actions"] = torch.rand(b, 4, 8, generator=g) * 2 - 1
    out["noise"] = torch.randn(b, 4, 8, generator=g)
    out["time"] = torch.tensor([0.3, 0.8])
    return out


def _prompt(pi05: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tokens, mask and LeRobot's task mask; pi0.5 rows in openpi's layout with the State marker."""
    rows = ([[2, 50, 51, 101, 102, 103, 52, MARKER, 51, 900, 901, 62, 108, 63, 51], [2, 50, 51, 201, 52, MARKER, 51,
             910, 911, 62, 108, 63, 51]] if pi05 else [[2, 101, 102, 103, 108], [2, 201, 108]])
    tokens = torch.zeros(2, PROMPT_LEN, dtype=torch.long)
    mask = torch.zeros(2, PROMPT_LEN, dtype=torch.bool)
    for i, r in enumerate(rows):
        tokens[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), True
    cols = torch.arange(PROMPT_LEN)[None]
    first = (tokens == MARKER).int().argmax(1)[:, None]
    task = (cols >= 1) & (cols < first) & mask if pi05 else mask  # what openpi's APT adapter hides
    return tokens, mask, task


def _open_apt_layers(policy, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(policy.named_parameters()):
            if name.endswith("gate.logit"):
                p.fill_(2.0)
            elif ".apt_fusion." in name or "lora_B" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


def _lerobot_outputs(policy, inputs, pi05: bool) -> dict[str, torch.Tensor]:
    from apt_plugins_lerobot_pi.modeling import bind_task_mask

    images = [inputs[f"image.{k}"] for k in IMAGE_KEYS]
    masks = [inputs[f"image_mask.{k}"] for k in IMAGE_KEYS]
    tokens, mask, task = inputs["tokens"], inputs["masks"], inputs["task_mask"]
    model = policy.eval().model
    noise = inputs["noise"]
    with torch.no_grad(), bind_task_mask(model, task):
        if pi05:
            actions = model.sample_actions(images, masks, tokens, mask, noise=noise.clone(), num_steps=STEPS)
            loss = model(images, masks, tokens, mask, inputs["actions"], noise.clone(), inputs["time"])
        else:
            actions = model.sample_actions(images, masks, tokens, mask, inputs["state"], noise=noise.clone(),
                                           num_steps=STEPS)
            loss = model(images, masks, tokens, mask, inputs["state"], inputs["actions"], noise.clone(), inputs["time"])
    return {"actions": actions, "loss": loss}


def _load_lerobot(path: Path, pi05: bool, apt: dict | None):
    kit = _kit(pi05)
    config = kit.policy_config(AptConfig.parse(apt) if apt else None, **_overrides())
    cls = kit._resolve(kit.apt_policy if apt else kit.stock_policy)
    with kit.construction():
        policy = cls.from_pretrained(path, config=config)
    # LeRobot's stock from_pretrained only prints a warning when keys do not match, so check the load.
    saved = load_file(str(path / "model.safetensors"))
    state = policy.state_dict()
    for key, tensor in saved.items():
        assert torch.equal(state[key], tensor), key
    return policy


def _assert_same_tensors(a: Path, b: Path) -> None:
    ta, tb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert sorted(ta) == sorted(tb)
    for key in ta:
        assert ta[key].dtype == tb[key].dtype and torch.equal(ta[key], tb[key]), key


def test_key_maps_are_strict_and_inverse():
    for key, pi05 in [("paligemma_with_expert.paligemma.model.language_model.layers.0.self_attn.q_proj.weight", False),
                      ("paligemma_with_expert.apt_fusion.1.gate.logit", True), ("state_proj.weight", False),
                      ("time_mlp_in.bias", True),
                      ("paligemma_with_expert.paligemma.model.language_model.layers.1.mlp.up_proj.lora_A.default.weight",
                       True)]:
        lr = openpi_to_lerobot_key(key, pi05)
        assert lr.startswith("model.") and lerobot_to_openpi_key(lr, pi05) == key
    assert openpi_to_lerobot_key("paligemma_with_expert.apt_fusion.0.q_proj.weight", False) == \
        "model.apt_fusion.0.q_proj.weight"
    with pytest.raises(CheckpointMismatchError, match="time_mlp_in.weight"):
        openpi_to_lerobot_key("time_mlp_in.weight", pi05=False)  # a pi0.5 tensor in a pi0 checkpoint
    with pytest.raises(CheckpointMismatchError, match="normalize_inputs.mean"):
        lerobot_to_openpi_key("normalize_inputs.mean", pi05=False)


def test_convert_refuses_foreign_tensor_and_bad_config(tmp_path):
    src = tmp_path / "op"
    src.mkdir()
    save_file({"action_in_proj.weight": torch.zeros(2, 2), "extra_head.weight": torch.zeros(1)},
              str(src / "model.safetensors"))
    (src / "config.json").write_text(json.dumps({"model": {"pi05": False, "action_dim": 2, "action_horizon": 4,
                                                           "max_token_len": 8}}))
    with pytest.raises(CheckpointMismatchError, match="extra_head.weight"):
        convert_checkpoint(src, tmp_path / "out", "lerobot")
    assert not (tmp_path / "out").exists()
    (src / "config.json").unlink()
    with pytest.raises(CheckpointMismatchError, match="--model-config"):
        convert_checkpoint(src, tmp_path / "out", "lerobot")
    lr = tmp_path / "lr"
    lr.mkdir()
    save_file({"model.state_proj.weight": torch.zeros(2, 2)}, str(lr / "model.safetensors"))
    (lr / "config.json").write_text(json.dumps({"type": "pi0", "max_state_dim": 6, "max_action_dim": 8,
                                                "chunk_size": 4, "tokenizer_max_length": 8}))
    with pytest.raises(CheckpointMismatchError, match="max_state_dim=6"):
        convert_checkpoint(lr, tmp_path / "out", "openpi")
    assert not (tmp_path / "out").exists()
    from apt_plugins.cli import main

    assert main(["convert", str(lr), str(tmp_path / "out"), "--to", "openpi"]) == 2  # the error, no traceback
    assert main(["convert", str(lr), str(tmp_path / "out"), "--to", "lerobot"]) == 2  # already LeRobot
    assert not (tmp_path / "out").exists()


def test_untied_embeddings_need_the_flag(tmp_path):
    head = "model.paligemma_with_expert.paligemma.lm_head.weight"
    embed = "model.paligemma_with_expert.paligemma.model.language_model.embed_tokens.weight"
    lr = tmp_path / "lr"
    lr.mkdir()
    save_file({head: torch.zeros(4, 2), embed: torch.ones(4, 2), "model.state_proj.weight": torch.ones(2, 2)},
              str(lr / "model.safetensors"))
    (lr / "config.json").write_text(json.dumps({"type": "pi0", "max_state_dim": 8, "max_action_dim": 8,
                                                "chunk_size": 4, "tokenizer_max_length": 8}))
    with pytest.raises(CheckpointMismatchError, match="--tie-embeddings"):
        convert_checkpoint(lr, tmp_path / "op", "openpi")
    report = convert_checkpoint(lr, tmp_path / "op", "openpi", tie_embeddings=True)
    tensors = load_file(str(tmp_path / "op" / "model.safetensors"))
    assert sorted(tensors) == [head[6:], "state_proj.weight"] and torch.equal(tensors[head[6:]], torch.ones(4, 2))
    assert report.tensors == 3 and report.written == 2
    back = convert_checkpoint(tmp_path / "op", tmp_path / "lr2", "lerobot")  # the tie is written under both names
    tensors = load_file(str(tmp_path / "lr2" / "model.safetensors"))
    assert torch.equal(tensors[head], tensors[embed]) and back.written == 3


def test_template_features_and_processors_are_taken_over(tmp_path):
    from apt_plugins import AptError

    src, template = tmp_path / "op", tmp_path / "template"
    src.mkdir()
    template.mkdir()
    save_file({"state_proj.weight": torch.ones(2, 8)}, str(src / "model.safetensors"))
    (src / "config.json").write_text(json.dumps({"model": {"pi05": False, "action_dim": 8, "action_horizon": 10,
                                                           "max_token_len": 48, "pytorch_compile_mode": None}}))
    features = {"observation.state": {"type": "STATE", "shape": [6]}}
    (template / "config.json").write_text(json.dumps({"type": "pi0", "input_features": features, "chunk_size": 50,
                                                      "n_action_steps": 50, "optimizer_lr": 1e-4}))
    (template / "policy_preprocessor.json").write_text("{}")
    (template / "policy_preprocessor_step_3_normalizer_processor.safetensors").write_bytes(b"stats")
    with pytest.raises(AptError, match="--policy-type='apt_pi0'"):
        convert_checkpoint(src, tmp_path / "out", "lerobot", policy_type="apt_pi0")  # plain: retrofit instead
    convert_checkpoint(src, tmp_path / "out", "lerobot", lerobot_template=template)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["input_features"] == features and config["optimizer_lr"] == 1e-4
    assert (config["chunk_size"], config["n_action_steps"], config["compile_model"]) == (10, 10, False)
    assert (tmp_path / "out" / "policy_preprocessor_step_3_normalizer_processor.safetensors").read_bytes() == b"stats"
    assert not (tmp_path / "out" / "apt_manifest.json").exists()


@pytest.fixture(scope="module")
def crossed(tmp_path_factory):
    """Every case converted both ways, with the outputs of both hosts (one openpi subprocess)."""
    if not OPENPI_PYTHON.is_file():
        pytest.skip(f"{OPENPI_PYTHON} does not exist (build it: bash scripts/bootstrap_openpi.sh); the LeRobot <-> "
                    "openpi conversion is verified only where both environments exist")
    pytest.importorskip("apt_plugins_lerobot_pi.testing")
    from apt_plugins_lerobot_pi.testing import tiny_pi_patches  # noqa: F401  (LeRobot side present)

    root = tmp_path_factory.mktemp("convert")
    base = _inputs()
    inputs, lerobot, cases = {}, {}, []
    for name, (pi05, apt) in CASES.items():
        tokens, mask, task = _prompt(pi05)
        case_inputs = {**base, "tokens": tokens, "masks": mask, "task_mask": task}
        inputs[name] = case_inputs
        policy = _kit(pi05).build(AptConfig.parse(apt) if apt else None, seed=1, **_overrides())
        if apt:
            _open_apt_layers(policy, seed=2)
        with torch.no_grad():  # as in every LeRobot checkpoint converted from openpi (LeRobot copies the tie)
            vlm = policy.model.paligemma_with_expert.paligemma
            vlm.lm_head.weight.copy_(vlm.model.language_model.embed_tokens.weight)
        policy.save_pretrained(root / name / "lerobot")
        lerobot[name] = _lerobot_outputs(policy, case_inputs, pi05)
        convert_checkpoint(root / name / "lerobot", root / name / "openpi", "openpi")
        cases.append({"name": name, "apt": apt, "seed": 3, "converted": str(root / name / "openpi"),
                      "born": str(root / name / "openpi_born")})
        save_file({**base, "tokens": tokens.to(torch.int32), "masks": mask}, str(root / name / "inputs.safetensors"))
    results = {}
    for pi05 in (False, True):  # one subprocess per prompt layout (the inputs differ only in the prompt)
        job = {"inputs": str(root / ("pi05_stock" if pi05 else "pi0_stock") / "inputs.safetensors"),
               "cases": [c for c in cases if CASES[c["name"]][0] == pi05], "sizes": SIZES, "marker": MARKER,
               "image_keys": list(IMAGE_KEYS), "steps": STEPS, "results": str(root / f"results_{pi05}.safetensors")}
        (root / f"job_{pi05}.json").write_text(json.dumps(job))
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
        proc = subprocess.run([str(OPENPI_PYTHON), str(Path(__file__).with_name("openpi_convert_worker.py")),
                               str(root / f"job_{pi05}.json")], capture_output=True, text=True, env=env, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        results.update(load_file(job["results"]))
    return root, inputs, lerobot, results


@pytest.mark.e2e
@pytest.mark.slow
def test_the_cases_differ(crossed):
    """The comparison has teeth: masks, fusion layers and LoRA change the actions far beyond the tolerance."""
    _, _, lerobot, _ = crossed
    for kind in ("pi0", "pi05"):
        stock, s1, s2 = (lerobot[f"{kind}_{c}"]["actions"] for c in ("stock", "s1", "s2_lora"))
        assert float((stock - s1).abs().max()) > 10 * ATOL and float((s1 - s2).abs().max()) > 10 * ATOL


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_lerobot_to_openpi_matches_on_both_hosts(crossed, name):
    root, _, lerobot, results = crossed
    for what in ("actions", "loss"):
        got, want = results[f"{name}/converted/{what}"], lerobot[name][what]
        assert got.shape == want.shape
        diff = float((got - want).abs().max())
        assert diff <= ATOL, f"{name} {what}: max |openpi - LeRobot| = {diff:.3g}"
    # lerobot -> openpi -> lerobot gives back the same tensors, bit for bit.
    convert_checkpoint(root / name / "openpi", root / name / "lerobot_rt", "lerobot")
    _assert_same_tensors(root / name / "lerobot", root / name / "lerobot_rt")


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_openpi_to_lerobot_matches_on_both_hosts(crossed, name):
    root, inputs, _, results = crossed
    pi05, apt = CASES[name]
    out = root / name / "lerobot_from_openpi"
    report = convert_checkpoint(root / name / "openpi_born", out, "lerobot")
    assert report.written == len(load_file(str(out / "model.safetensors"))) == report.tensors + 1  # + the untied copy
    config = json.loads((out / "config.json").read_text())
    assert config["type"] == ("apt_" if apt else "") + ("pi05" if pi05 else "pi0")
    assert (config["chunk_size"], config["max_action_dim"], config["tokenizer_max_length"]) == (4, 8, PROMPT_LEN)
    policy = _load_lerobot(out, pi05, apt)
    from lerobot.configs.policies import PreTrainedConfig

    parsed = PreTrainedConfig.from_pretrained(out)  # the written config.json is a valid LeRobot config
    assert (parsed.type, parsed.chunk_size, parsed.max_state_dim, parsed.compile_model) == (config["type"], 4, 8, False)
    got = _lerobot_outputs(policy, inputs[name], pi05)
    for what in ("actions", "loss"):
        diff = float((got[what] - results[f"{name}/born/{what}"]).abs().max())
        assert diff <= ATOL, f"{name} {what}: max |LeRobot - openpi| = {diff:.3g}"
    if apt:
        manifest = json.loads((out / "apt_manifest.json").read_text())
        assert manifest["adapter"] == ("lerobot_pi05" if pi05 else "lerobot_pi0")
        assert all(k.startswith("model.") for k in manifest["apt_tensors"])
    # openpi -> lerobot -> openpi gives back the same tensors, bit for bit.
    convert_checkpoint(out, root / name / "openpi_rt", "openpi")
    _assert_same_tensors(root / name / "openpi_born", root / name / "openpi_rt")
