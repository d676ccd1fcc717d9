"""DeepSpeed recipes and the training entry point, run for real on CPU (gloo, 2 processes, tiny models).

What this proves on CPU: the recipes parse and resolve; ZeRO-2 and ZeRO-3 (with real parameter
partitioning) train only what APT makes trainable; frozen tensors stay bit-identical and hold no
optimizer state; ranks agree; a 2-process run follows the 1-process loss trajectory; ZeRO-3
checkpoints consolidate into normal LeRobot checkpoints that promote, resume and load. What it
cannot prove (NCCL, CUDA kernels, GPU memory and speed) is listed in docs/deepspeed.md.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from apt_plugins import AptConfigError
from apt_plugins.deepspeed import load_recipe, recipe_names, resolve_recipe, validate_recipe
from apt_plugins.deepspeed.train import split_args

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "--policy.device=cpu", "--policy.push_to_hub=false", "--policy.chunk_size=4", "--policy.n_action_steps=4",
    "--policy.max_state_dim=8", "--policy.max_action_dim=8", "--policy.image_resolution=[28,28]",
    "--policy.tokenizer_max_length=16",
]
needs_deepspeed = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None or shutil.which("g++") is None,
    reason="needs deepspeed (pip install 'apt-plugins[deepspeed]') and a C++ compiler for its JIT ops",
)


# ------------------------------------------------------------------------------------------ recipes
def test_shipped_recipes_validate_and_resolve():
    assert set(recipe_names()) == {"stage1_zero2", "stage2_zero2", "stage2_full_zero2_offload", "stage2_full_zero3"}
    for name in recipe_names():
        recipe = load_recipe(name)
        validate_recipe(recipe, name)
        resolved = resolve_recipe(recipe, micro_batch_size=8, grad_clip_norm=10.0)
        assert "auto" not in json.dumps(resolved), name
        assert resolved["train_micro_batch_size_per_gpu"] == 8
        assert resolved["gradient_accumulation_steps"] == 1
        # LeRobot's clip value, not DeepSpeed's silent default of 1.0.
        assert resolved["gradient_clipping"] == 10.0
        assert "optimizer" not in resolved and "scheduler" not in resolved
    assert resolve_recipe(load_recipe("stage2_full_zero3"), micro_batch_size=1, grad_clip_norm=1.0)[
        "zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


def test_precision_blocks():
    recipe = load_recipe("stage1_zero2")
    fp32 = resolve_recipe(recipe, micro_batch_size=1, grad_clip_norm=1.0, precision="fp32")
    assert fp32["bf16"] == {"enabled": False} and "torch_autocast" not in fp32
    auto = resolve_recipe(recipe, micro_batch_size=1, grad_clip_norm=1.0, precision="autocast_bf16")
    assert auto["bf16"] == {"enabled": False} and auto["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}
    assert resolve_recipe(recipe, micro_batch_size=1, grad_clip_norm=1.0, precision="bf16")["bf16"] == {"enabled": True}
    with pytest.raises(AptConfigError, match=r"ds\.precision='fp16'.*fp32, autocast_bf16, bf16"):
        resolve_recipe(recipe, micro_batch_size=1, grad_clip_norm=1.0, precision="fp16")


@pytest.mark.parametrize("change, match", [
    ({"optimizer": {"type": "AdamW"}}, r"recipe\.optimizer.*parameter groups"),
    ({"scheduler": {"type": "WarmupLR"}}, r"recipe\.scheduler"),
    ({"gradient_accumulation_steps": 4}, r"gradient_accumulation_steps=4.*\"auto\""),
    ({"zero_optimization": {"stage": 2, "reduce_bucket_size": "auto"}}, r"reduce_bucket_size.*hidden_size"),
    ({"zero_optimization": {"stage": 3}}, r"stage3_gather_16bit_weights_on_model_save.*empty tensors"),
    ({"compile": {"deepcompile": True}}, r"deepcompile.*frozen"),
])
def test_recipe_traps_are_refused(change, match):
    recipe = {**load_recipe("stage1_zero2"), **change}
    with pytest.raises(AptConfigError, match=match):
        resolve_recipe(recipe, micro_batch_size=1, grad_clip_norm=1.0)


def test_unknown_recipe_names_the_shipped_ones():
    with pytest.raises(AptConfigError, match=r"ds\.recipe='stage3_zero9'.*stage1_zero2"):
        load_recipe("stage3_zero9")


def test_accelerate_configs_launch_the_shipped_recipes():
    for path in sorted((ROOT / "recipes" / "accelerate").glob("*.yaml")):
        config = yaml.safe_load(path.read_text())
        assert config["distributed_type"] == "DEEPSPEED" and config["use_cpu"] is False, path.name
        assert config["deepspeed_config"]["deepspeed_config_file"] == path.stem
        assert path.stem in recipe_names()
        # accelerate refuses these next to a deepspeed_config_file; APT fills them from LeRobot.
        assert not {"mixed_precision", "gradient_accumulation_steps", "gradient_clipping", "zero_stage"} & set(config)


def test_split_args_keeps_lerobot_flags_and_reads_ds_flags(monkeypatch):
    monkeypatch.delenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", raising=False)
    ds, rest = split_args(["--ds.recipe=stage2_full_zero3", "--policy.type=apt_pi0", "--ds.deterministic_noise=true",
                           "--ds.set.zero_optimization.stage3_param_persistence_threshold=0", "--steps=2"])
    assert rest == ["--policy.type=apt_pi0", "--steps=2"]
    assert ds.recipe == "stage2_full_zero3" and ds.deterministic_noise
    assert ds.overrides == {"zero_optimization.stage3_param_persistence_threshold": 0}
    with pytest.raises(AptConfigError, match=r"ds\.recpie"):
        split_args(["--ds.recpie=x"])
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", "stage2_zero2")
    assert split_args(["--policy.type=apt_pi0"])[0].recipe == "stage2_zero2"


# ------------------------------------------------------------------------------- 2-process runs
@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    from apt_plugins.lerobot.data import make_synthetic_dataset
    from apt_plugins_lerobot_pi.testing import write_tiny_plugin, write_tokenizer_fixture

    root = tmp_path_factory.mktemp("ds")
    make_synthetic_dataset(root / "data", episodes_per_task=2, frames_per_episode=10)
    write_tokenizer_fixture(root / "hub")
    write_tiny_plugin(root / "plugins")
    return root


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(ws: Path, name: str, *args: str, nproc: int = 2, batch: int = 2, steps: int = 4,
           launcher: str = "torchrun") -> list[dict]:
    """Run the entry point under ``launcher`` (torchrun, deepspeed, python, or an accelerate recipe)."""
    env = {**os.environ, "HF_HUB_CACHE": str(ws / "hub"), "HF_HUB_OFFLINE": "1", "HF_LEROBOT_HOME": str(ws / "home"),
           "PYTHONPATH": str(ws / "plugins"), "WANDB_MODE": "disabled", "DS_ACCELERATOR": "cpu",
           "TORCH_EXTENSIONS_DIR": str(Path.home() / ".cache" / "apt_plugins_torch_extensions")}
    report = ws / f"{name}_{{rank}}.json"
    train_args = ["-m", "apt_plugins.deepspeed.train", f"--ds.report={report}", *args,
                  "--env.discover_packages_path=apt_tiny_pi", "--dataset.repo_id=local/apt_demo",
                  f"--dataset.root={ws / 'data'}", f"--batch_size={batch}", f"--steps={steps}", "--num_workers=0",
                  "--log_freq=1", "--wandb.enable=false"]
    if not any(a.startswith("--config_path") for a in args):
        train_args.append(f"--output_dir={ws / name}")
    if launcher == "torchrun":
        cmd = [str(BIN / "torchrun"), f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
               f"--master_port={_port()}", *train_args]
    elif launcher == "python":
        cmd = [sys.executable, *train_args]
    elif launcher == "deepspeed":
        cmd = [str(BIN / "deepspeed"), f"--num_gpus={nproc}", "--no_local_rank", "--master_addr=127.0.0.1",
               f"--master_port={_port()}", "--module", *train_args[1:]]
    else:
        cmd = [str(BIN / "accelerate"), "launch", "--config_file", str(ROOT / "recipes" / "accelerate" / f"{launcher}.yaml"),
               "--num_processes", str(nproc), "--main_process_port", str(_port()), *train_args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    errors = [line for line in out.splitlines() if re.search(r"\b\w+Error\b", line) and "torchcodec" not in line
              and "OSError" not in line and "libtorchcodec" not in line]
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n" + "\n".join(errors[-20:]) + out[-3000:]
    return [json.loads(Path(str(report).replace("{rank}", str(r))).read_text()) for r in range(nproc)]


def _tensors(ckpt: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(ckpt / "model.safetensors"))


@needs_deepspeed
@pytest.mark.e2e
def test_stage1_zero2_two_processes(ws):
    reports = launch(ws, "s1", "--ds.recipe=stage1_zero2", "--policy.type=apt_pi0", "--policy.apt.stage=1",
                     "--policy.apt.check_frozen=true", *TINY, "--save_freq=4")
    r0, r1 = reports
    assert r0["world"] == r1["world"] == 2 and r0["zero_stage"] == 2
    assert r0["frozen_unchanged"] and r1["frozen_unchanged"] and r0["frozen_checked"] > 0
    assert r0["checksum"] == r1["checksum"], "ranks disagree on the trained weights"
    assert r0["losses"] == r1["losses"]
    # Optimizer state only for the trainable expert, split across the two ranks.
    states = r0["optimizer_state_elements"] + r1["optimizer_state_elements"]
    assert r0["trainable_elements"] <= states <= r0["trainable_elements"] + 2 * 64
    ckpt = ws / "s1" / "checkpoints" / "last" / "pretrained_model"
    tensors = _tensors(ckpt)
    assert tensors and min(v.numel() for v in tensors.values()) > 0
    manifest = json.loads((ckpt / "apt_manifest.json").read_text())
    assert manifest["stage"] == 1 and manifest["frozen_check"]["unchanged"]
    assert (ws / "s1" / "checkpoints" / "last" / "training_state" / "deepspeed" / "state").is_dir()


@needs_deepspeed
@pytest.mark.e2e
def test_two_process_loss_trajectory_matches_one_process(ws):
    """fp32, same global batch (2 x 2 vs 1 x 4), noise derived from each sample's index."""
    common = ["--ds.recipe=stage1_zero2", "--ds.deterministic_noise=true", "--ds.shuffle=false",
              "--policy.type=apt_pi0", "--policy.apt.stage=1", *TINY, "--save_checkpoint=false"]
    one = launch(ws, "eq1", *common, nproc=1, batch=4, steps=5)[0]
    two = launch(ws, "eq2", *common, nproc=2, batch=2, steps=5)[0]
    # Tolerance: fp32 reduction order differs (one 4-sample mean vs two 2-sample means all-reduced).
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-5, abs=1e-6)
    assert two["checksum"] == pytest.approx(one["checksum"], rel=1e-6)


@needs_deepspeed
@pytest.mark.e2e
def test_stage2_full_vlm_zero3_partitions_consolidates_promotes_and_resumes(ws):
    stage1 = ws / "s1" / "checkpoints" / "last" / "pretrained_model"
    if not stage1.exists():
        pytest.skip("needs the Stage-1 ZeRO-2 run")
    # Threshold 0: every parameter is really partitioned (the default keeps tiny ones resident).
    zero3 = ["--ds.recipe=stage2_full_zero3", "--ds.set.zero_optimization.stage3_param_persistence_threshold=0"]
    r0, r1 = launch(ws, "s2", *zero3, "--policy.type=apt_pi0", "--policy.apt.stage=2", "--policy.apt.vlm_mode=full",
                    "--policy.apt.check_frozen=true", f"--policy.pretrained_path={stage1}", *TINY, "--save_freq=4")
    assert r0["zero_stage"] == 3 and r0["params_partitioned"] and r1["params_partitioned"]
    assert r0["frozen_unchanged"]
    states = r0["optimizer_state_elements"] + r1["optimizer_state_elements"]
    assert r0["trainable_elements"] <= states <= r0["trainable_elements"] + 2 * 64
    ckpt = ws / "s2" / "checkpoints" / "last" / "pretrained_model"
    tensors = _tensors(ckpt)
    assert min(v.numel() for v in tensors.values()) > 0, "empty tensors in a consolidated ZeRO-3 checkpoint"
    assert any(".apt_fusion." in k for k in tensors)
    assert json.loads((ckpt / "apt_manifest.json").read_text())["parent"]["stage"] == 1

    env = {**os.environ, "HF_HUB_CACHE": str(ws / "hub"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ws / "plugins"),
           "HF_LEROBOT_HOME": str(ws / "home"), "WANDB_MODE": "disabled"}
    verify = subprocess.run([str(BIN / "apt-plugins"), "verify", str(ckpt), f"--parent={stage1}", "--import=apt_tiny_pi"],
                            env=env, capture_output=True, text=True, timeout=600)
    assert verify.returncode == 0, verify.stdout + verify.stderr[-2000:]
    assert re.search(r"stage 2 at step 0 equals the stage-1 parent\s+PASS", verify.stdout)

    # Resume under ZeRO-3 from the consolidated weights + the partitioned optimizer state.
    resumed = launch(ws, "s2", *zero3, f"--config_path={ckpt / 'train_config.json'}", "--resume=true", steps=6)
    assert resumed[0]["steps"] == 6 and len(resumed[0]["losses"]) == 2

    # The DeepSpeed checkpoint is a plain LeRobot checkpoint: lerobot-eval and lerobot-train load it.
    evaluation = subprocess.run([str(BIN / "lerobot-eval"), f"--policy.path={ckpt}", "--env.type=apt_blocks",
                                 "--env.discover_packages_path=apt_tiny_pi", "--env.episode_length=4",
                                 "--eval.n_episodes=1", "--eval.batch_size=1", "--policy.device=cpu",
                                 f"--output_dir={ws / 's2_eval'}"], env=env, capture_output=True, text=True, timeout=600)
    assert evaluation.returncode == 0, (evaluation.stdout + evaluation.stderr)[-3000:]
    assert (ws / "s2_eval" / "eval_info.json").is_file()
    run = subprocess.run([str(BIN / "lerobot-train"), f"--policy.path={ckpt}", "--env.discover_packages_path=apt_tiny_pi",
                          "--policy.push_to_hub=false", "--dataset.repo_id=local/apt_demo", f"--dataset.root={ws / 'data'}",
                          "--batch_size=2", "--steps=1", "--num_workers=0", f"--output_dir={ws / 's2_lerobot'}",
                          "--wandb.enable=false"], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]


@needs_deepspeed
@pytest.mark.e2e
@pytest.mark.parametrize("launcher", ["deepspeed", "stage1_zero2", "python"])
def test_other_launchers(ws, launcher):
    """The same entry point under the deepspeed launcher, accelerate launch (recipe from its yaml), plain python."""
    recipe = [] if launcher == "stage1_zero2" else ["--ds.recipe=stage1_zero2"]
    nproc = 1 if launcher == "python" else 2
    reports = launch(ws, f"launch_{launcher}", *recipe, "--policy.type=apt_pi0", "--policy.apt.stage=1", *TINY,
                     "--save_checkpoint=false", steps=2, launcher=launcher, nproc=nproc)
    assert [r["rank"] for r in reports] == list(range(nproc)) and reports[0]["world"] == nproc
    assert reports[0]["zero_stage"] == 2 and len({r["checksum"] for r in reports}) == 1


@needs_deepspeed
@pytest.mark.e2e
@pytest.mark.slow
def test_stage2_full_vlm_zero2_optimizer_offload(ws):
    """ZeRO-Offload with DeepSpeedCPUAdam (JIT-built on first use) keeps the adapter's per-group lr."""
    stage1 = ws / "s1" / "checkpoints" / "last" / "pretrained_model"
    if not stage1.exists():
        pytest.skip("needs the Stage-1 ZeRO-2 run")
    r0, r1 = launch(ws, "offload", "--ds.recipe=stage2_full_zero2_offload", "--policy.type=apt_pi0",
                    "--policy.apt.stage=2", "--policy.apt.vlm_mode=full", f"--policy.pretrained_path={stage1}",
                    *TINY, "--save_checkpoint=false", steps=2)
    assert r0["optimizer"] == "DeepSpeedCPUAdam" and r0["frozen_unchanged"]
    lrs = r0["group_lrs"]
    assert lrs["vlm"] == pytest.approx(lrs["action_expert"] * 0.1) and lrs["fusion"] == pytest.approx(lrs["action_expert"])
    assert r0["checksum"] == r1["checksum"]
