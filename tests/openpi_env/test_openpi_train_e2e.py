"""End to end through openpi's own PyTorch trainer (``apt-plugins openpi-train``), tiny real models, CPU.

Every command is a subprocess, as a user types it; the throw-away module on ``PYTHONPATH`` only
shrinks openpi's model at construction and gives its fake dataset uint8 images (see
``apt_plugins_openpi_pi.testing``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

BIN = Path(sys.executable).parent
COMMON = ["--num_workers=0", "--pytorch_training_precision=float32", "--save_interval=2"]


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    from apt_plugins_openpi_pi.testing import write_tiny_module

    root = tmp_path_factory.mktemp("openpi_e2e")
    write_tiny_module(root / "plugins")
    return root


def run(ws: Path, *args: str, ok: bool = True) -> str:
    env = {**os.environ, "PYTHONPATH": str(ws / "plugins"), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled",
           "OMP_NUM_THREADS": "1", "OPENPI_DATA_HOME": str(ws / "openpi_cache")}
    proc = subprocess.run([str(BIN / "apt-plugins"), *args], env=env, capture_output=True, text=True, timeout=600,
                          cwd=ws)
    out = proc.stdout + proc.stderr
    assert (proc.returncode == 0) == ok, f"apt-plugins {' '.join(args)} exited {proc.returncode}:\n{out[-5000:]}"
    return out


def train(ws: Path, config: str, exp: str, steps: int, *extra: str, ok: bool = True) -> str:
    return run(ws, "openpi-train", "--import", "apt_tiny_openpi", config, f"--exp_name={exp}",
               f"--checkpoint_base_dir={ws / 'ck'}", f"--num_train_steps={steps}", *COMMON, *extra, ok=ok)


def test_two_stages_through_openpi_train(ws):
    s1 = train(ws, "debug", "s1", 4, "--apt.stage=1", "--apt.check_frozen=true")
    assert "APT stage 1 on adapter 'openpi_pi0'" in s1 and "language masking: prompt tokens hidden" in s1
    assert "APT optimizer groups: action_expert" in s1 and "vlm" not in s1.split("APT optimizer groups:")[1].split("\n")[0]
    last1 = ws / "ck" / "debug" / "s1" / "4"
    assert {"model.safetensors", "optimizer.pt", "metadata.pt", "apt_manifest.json", "config.json"} <= {
        p.name for p in last1.iterdir()}
    manifest1 = json.loads((last1 / "apt_manifest.json").read_text())
    assert manifest1["stage"] == 1 and manifest1["frozen_check"]["unchanged"] is True

    # Stage 2 promoted from Stage 1 with openpi's own --pytorch_weight_path, LoRA on the VLM.
    s2 = train(ws, "debug", "s2", 3, f"--pytorch_weight_path={last1}", "--apt.stage=2", "--apt.vlm_mode=lora")
    assert "APT promotion Stage 1 -> Stage 2" in s2 and "apt_fusion" in s2
    assert "vlm (" in s2 and "lr x0.1" in s2
    last2 = ws / "ck" / "debug" / "s2" / "2"
    manifest2 = json.loads((last2 / "apt_manifest.json").read_text())
    assert manifest2["stage"] == 2 and manifest2["parent"] == {"path": str(last1), "stage": 1}
    w1, w2 = load_file(str(last1 / "model.safetensors")), load_file(str(last2 / "model.safetensors"))
    fusion = [k for k in w2 if ".apt_" in k]
    lora = [k for k in w2 if ".lora_" in k]
    assert fusion and lora
    # The frozen VLM base weights carried over bit for bit; the expert kept training.
    for key, value in w1.items():
        base = key.replace(".weight", ".base_layer.weight") if key not in w2 else key
        if "paligemma.model" in key:
            assert torch.equal(value, w2[base]), f"frozen VLM tensor {key} changed in Stage 2"
    assert any(not torch.equal(w1[k], w2[k]) for k in w1 if "gemma_expert" in k)
    assert any(w2[k].abs().sum() > 0 for k in fusion if k.endswith("o_proj.weight")), "fusion output never left zero"

    # Resume Stage 2 (openpi's --resume goes through the strict APT loader) and load the result strictly.
    resumed = train(ws, "debug", "s2", 5, "--resume", "--no-overwrite", "--apt.stage=2", "--apt.vlm_mode=lora")
    assert "Resumed training from step 2" in resumed
    from apt_plugins import AptConfig
    from apt_plugins_openpi_pi.testing import OpenpiConformanceKit

    kit = OpenpiConformanceKit("openpi_pi0")
    model = kit.load(ws / "ck" / "debug" / "s2" / "4", AptConfig(stage=2, vlm_mode="lora"))
    assert model.apt_load_report.fresh == []


def test_pi05_stage1_through_openpi_train(ws):
    # openpi's fake data draws random prompt tokens (no 'State' marker), so the whole prompt is hidden.
    out = train(ws, "debug_pi05", "p1", 2, "--apt.stage=1", "--apt.language_mask_scope=prompt")
    assert "APT stage 1 on adapter 'openpi_pi05'" in out
    assert json.loads((ws / "ck" / "debug_pi05" / "p1" / "1" / "apt_manifest.json").read_text())["stage"] == 1


def test_openpi_retrofit_cli(ws):
    from apt_plugins_openpi_pi.checkpoints import save_checkpoint
    from apt_plugins_openpi_pi.testing import OpenpiConformanceKit, tiny_model_config

    # A plain openpi checkpoint of the `debug` config's model (what openpi's trainer writes).
    import dataclasses

    kit = OpenpiConformanceKit("openpi_pi0")
    plain = kit.construct(dataclasses.replace(tiny_model_config(False), action_dim=32, action_horizon=50,
                                              max_token_len=48, pytorch_compile_mode=None))
    save_checkpoint(plain, ws / "plain")
    (ws / "plain" / "config.json").unlink()  # openpi writes none: the config comes from --openpi-config
    out = run(ws, "retrofit", "--import", "apt_tiny_openpi", str(ws / "plain"), str(ws / "retro"), "--stage", "2",
              "--keep-language-paths", "--openpi-config", "debug")
    assert "probe: max |actions(source) - actions(retrofit)|" in out
    assert json.loads((ws / "retro" / "apt_manifest.json").read_text())["stage"] == 2


def test_stage1_ddp_two_processes(ws):
    # openpi's own DDP path (gloo on CPU): torchrun starts the same openpi-train command per process.
    env = {**os.environ, "PYTHONPATH": str(ws / "plugins"), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled",
           "OMP_NUM_THREADS": "1"}
    cmd = [str(BIN / "torchrun"), "--standalone", "--nnodes=1", "--nproc_per_node=2", str(BIN / "apt-plugins"),
           "openpi-train", "--import", "apt_tiny_openpi", "debug", "--exp_name=ddp", f"--checkpoint_base_dir={ws / 'ck'}",
           "--num_train_steps=2", *COMMON, "--apt.stage=1"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ws)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    assert "world_size=2" in out and out.count("APT stage 1 on adapter 'openpi_pi0'") == 2
    assert json.loads((ws / "ck" / "debug" / "ddp" / "1" / "apt_manifest.json").read_text())["stage"] == 1
