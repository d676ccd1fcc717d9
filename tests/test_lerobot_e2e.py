"""End to end through LeRobot's own CLIs on tiny real models (marked e2e; run in CI).

One workspace per module: a synthetic dataset, a tokenizer in a scratch hub cache and the
throw-away tiny-model plugin. Every command runs as a subprocess, exactly as a user types it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

pytestmark = pytest.mark.e2e

BIN = Path(sys.executable).parent
TINY = [
    "--policy.device=cpu", "--policy.push_to_hub=false", "--policy.chunk_size=4", "--policy.n_action_steps=4",
    "--policy.max_state_dim=8", "--policy.max_action_dim=8", "--policy.image_resolution=[28,28]",
    "--policy.tokenizer_max_length=16",
]


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    from apt_plugins.lerobot.data import make_synthetic_dataset
    from apt_plugins_lerobot_pi.testing import write_tiny_plugin, write_tokenizer_fixture

    root = tmp_path_factory.mktemp("e2e")
    make_synthetic_dataset(root / "data", episodes_per_task=2, frames_per_episode=10)
    write_tokenizer_fixture(root / "hub")
    write_tiny_plugin(root / "plugins")
    return root


def env_for(ws: Path) -> dict[str, str]:
    return {**os.environ, "HF_HUB_CACHE": str(ws / "hub"), "HF_HUB_OFFLINE": "1", "HF_LEROBOT_HOME": str(ws / "home"),
            "PYTHONPATH": str(ws / "plugins"), "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}


def run(ws: Path, *args: str, ok: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([*args], env=env_for(ws), capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    if ok:
        assert proc.returncode == 0, f"{' '.join(args)} failed ({proc.returncode}):\n{out[-4000:]}"
    else:
        assert proc.returncode != 0, f"{' '.join(args)} should have failed:\n{out[-2000:]}"
    proc.out = out  # type: ignore[attr-defined]
    return proc


def train(ws: Path, out: str, *extra: str, steps: int = 2, ok: bool = True) -> subprocess.CompletedProcess:
    return run(ws, str(BIN / "lerobot-train"), *extra, "--env.discover_packages_path=apt_tiny_pi",
               "--dataset.repo_id=local/apt_demo", f"--dataset.root={ws / 'data'}", "--batch_size=4",
               f"--steps={steps}", "--num_workers=0", f"--save_freq={steps}", "--log_freq=1",
               f"--output_dir={ws / out}", "--wandb.enable=false", ok=ok)


def ckpt(ws: Path, out: str) -> Path:
    return ws / out / "checkpoints" / "last" / "pretrained_model"


def test_two_stages_resume_and_reload_through_lerobot_train(ws):
    # Stage 1: no --policy.discover_packages_path, the lerobot_policy_apt shim makes the type known.
    s1 = train(ws, "s1", "--policy.type=apt_pi0", "--policy.apt.stage=1", "--policy.apt.check_frozen=true", *TINY)
    assert "APT stage 1 on adapter 'lerobot_pi0'" in s1.out and "language masking:" in s1.out
    assert "frozen tensors unchanged at this checkpoint" in s1.out
    saved = json.loads((ckpt(ws, "s1") / "config.json").read_text())
    assert saved["type"] == "apt_pi0" and saved["apt"]["stage"] == 1 and saved["apt"]["check_frozen"] is True
    assert json.loads((ckpt(ws, "s1") / "apt_manifest.json").read_text())["stage"] == 1

    # Resume Stage 1 for two more steps (the promotion below starts from the resumed checkpoint).
    run(ws, str(BIN / "lerobot-train"), f"--config_path={ckpt(ws, 's1') / 'train_config.json'}",
        "--resume=true", "--steps=4", "--env.discover_packages_path=apt_tiny_pi")
    assert json.loads((ws / "s1" / "checkpoints" / "last" / "training_state" / "training_step.json").read_text())["step"] == 4

    # Stage 2 from the Stage-1 checkpoint: automatic, strict promotion, printed.
    s2 = train(ws, "s2", "--policy.type=apt_pi0", "--policy.apt.stage=2", *TINY,
               f"--policy.pretrained_path={ckpt(ws, 's1')}")
    assert "APT promotion Stage 1 -> Stage 2" in s2.out and "new (fresh) tensors: 8" in s2.out
    assert "apt/gate_mean/0:" in s2.out  # gate values in the training log
    manifest = json.loads((ckpt(ws, "s2") / "apt_manifest.json").read_text())
    assert manifest["parent"]["stage"] == 1 and all(".apt_fusion." in k for k in manifest["fresh_at_last_load"])
    first = load_file(str(ckpt(ws, "s2") / "model.safetensors"))

    # Resume Stage 2 for two more steps.
    run(ws, str(BIN / "lerobot-train"), f"--config_path={ckpt(ws, 's2') / 'train_config.json'}",
        "--resume=true", "--steps=4", "--env.discover_packages_path=apt_tiny_pi")
    assert json.loads((ws / "s2" / "checkpoints" / "last" / "training_state" / "training_step.json").read_text())["step"] == 4
    after = load_file(str(ckpt(ws, "s2") / "model.safetensors"))
    assert any(not (first[k] == after[k]).all() for k in first if ".apt_fusion." in k)

    # A checkpoint of either stage loads with --policy.path (processors included).
    for name in ("s1", "s2"):
        train(ws, f"{name}_reload", f"--policy.path={ckpt(ws, name)}", "--policy.push_to_hub=false")

    # The user-facing invariant checks on these very checkpoints.
    v1 = run(ws, str(BIN / "apt-plugins"), "verify", str(ckpt(ws, "s1")), "--import=apt_tiny_pi",
             "--dataset-repo-id=local/apt_demo", f"--dataset-root={ws / 'data'}")
    assert re.search(r"stage 1 ignores empty instruction\s+PASS", v1.out)
    v2 = run(ws, str(BIN / "apt-plugins"), "verify", str(ckpt(ws, "s2")), f"--parent={ckpt(ws, 's1')}",
             "--import=apt_tiny_pi")
    assert re.search(r"stage 2 at step 0 equals the stage-1 parent\s+PASS", v2.out)


def test_verify_fails_when_a_frozen_tensor_was_changed(ws, tmp_path):
    if not ckpt(ws, "s2").exists():
        pytest.skip("needs the two-stage run")
    tampered = tmp_path / "tampered"
    shutil.copytree(ckpt(ws, "s2"), tampered)
    weights = load_file(str(tampered / "model.safetensors"))
    key = next(k for k in weights if "vision_tower" in k and k.endswith("weight"))
    weights[key] = weights[key] + 1e-3
    save_file(weights, str(tampered / "model.safetensors"))
    v = run(ws, str(BIN / "apt-plugins"), "verify", str(tampered), f"--parent={ckpt(ws, 's1')}",
            "--import=apt_tiny_pi", ok=False)
    assert re.search(r"frozen tensors identical to the parent\s+FAIL", v.out) and key in v.out


def test_discovery_with_and_without_the_flag(ws):
    # Without any flag the shim distribution (metadata Name literally lerobot_policy_apt) registers the types.
    probe = ("import importlib.metadata as m; from lerobot.configs.policies import PreTrainedConfig as C;"
             "assert 'apt_pi0' not in C.get_known_choices();"
             "from lerobot.utils.import_utils import register_third_party_plugins as r; r();"
             "assert any(d.metadata['Name'] == 'lerobot_policy_apt' for d in m.distributions());"
             "print(sorted(c for c in C.get_known_choices() if c.startswith('apt_')))")
    out = run(ws, sys.executable, "-c", probe).out
    from apt_plugins import get_plugin_manager

    expected = sorted(t for a in get_plugin_manager().registry if a.host == "lerobot" for t in a.apt_policy_types)
    assert len(expected) >= 4 and str(expected) in out  # every registered LeRobot adapter's types, no list to edit
    # The explicit flag keeps working (and does not clash with the shim's registration).
    train(ws, "flag", "--policy.type=apt_pi05", "--policy.discover_packages_path=apt_plugins_lerobot_pi",
          "--policy.apt.stage=1", *TINY[:-1], "--policy.tokenizer_max_length=32")


def test_apt_fields_from_a_json_config_file(ws, tmp_path):
    """Every APT field can come from a LeRobot --config_path file as well as from the CLI."""
    config = {
        "dataset": {"repo_id": "local/apt_demo", "root": str(ws / "data")},
        "policy": {"type": "apt_pi0", "device": "cpu", "push_to_hub": False, "chunk_size": 4, "n_action_steps": 4,
                   "max_state_dim": 8, "max_action_dim": 8, "image_resolution": [28, 28], "tokenizer_max_length": 16,
                   "apt": {"stage": 1, "gate_granularity": "scalar", "check_frozen": True}},
        "output_dir": str(tmp_path / "out"), "batch_size": 4, "steps": 2, "num_workers": 0, "save_freq": 2,
        "log_freq": 1, "wandb": {"enable": False},
    }
    path = tmp_path / "train.json"
    path.write_text(json.dumps(config))
    run(ws, str(BIN / "lerobot-train"), f"--config_path={path}", "--env.discover_packages_path=apt_tiny_pi")
    saved = json.loads((tmp_path / "out" / "checkpoints" / "last" / "pretrained_model" / "config.json").read_text())
    assert saved["apt"]["gate_granularity"] == "scalar" and saved["apt"]["check_frozen"] is True


def test_bad_apt_value_on_the_cli_names_the_field(ws):
    bad = train(ws, "bad", "--policy.type=apt_pi0", "--policy.apt.stage=3", *TINY, ok=False)
    assert "policy.apt.stage=3" in bad.out and "allowed values: 1, 2" in bad.out
    assert not (ws / "bad" / "checkpoints").exists()


def test_retrofit_round_trip_and_bad_inputs(ws):
    train(ws, "stock", "--policy.type=pi0", *TINY)  # a plain LeRobot pi0 checkpoint
    src = ckpt(ws, "stock")
    cli = [str(BIN / "apt-plugins"), "retrofit", "--import=apt_tiny_pi"]
    # SRC may also be a repo id already in the local hub cache (never downloaded).
    cached = ws / "hub" / "models--local--stock-pi0" / "snapshots" / ("1" * 40)
    shutil.copytree(src, cached)
    (cached.parent.parent / "refs").mkdir(exist_ok=True)
    (cached.parent.parent / "refs" / "main").write_text("1" * 40)
    exact = run(ws, *cli, "local/stock-pi0", str(ws / "rt2"), "--stage=2", "--keep-language-paths")
    assert "sampled actions identical to the source policy" in exact.out
    manifest = json.loads((ws / "rt2" / "apt_manifest.json").read_text())
    assert manifest["retrofit"]["added_tensors"] and all(".apt_fusion." in k for k in manifest["retrofit"]["added_tensors"])
    assert (ws / "rt2" / "policy_preprocessor.json").exists()
    masked = run(ws, *cli, str(src), str(ws / "rt1"), "--stage=1", "--reinit-expert")
    assert "re-initialised expert tensors: 29" in masked.out
    # The retrofitted checkpoints train with --policy.path (Stage 2) and promote (Stage 1 -> 2).
    train(ws, "rt2_train", f"--policy.path={ws / 'rt2'}", "--policy.push_to_hub=false")
    train(ws, "rt1_train", f"--policy.path={ws / 'rt1'}", "--policy.push_to_hub=false")
    promoted = train(ws, "rt1_s2", "--policy.type=apt_pi0", "--policy.apt.stage=2", *TINY,
                     f"--policy.pretrained_path={ckpt(ws, 'rt1_train')}")
    assert "APT promotion Stage 1 -> Stage 2" in promoted.out

    # Bad inputs: a clear message, and nothing written to OUT.
    broken = ws / "broken"
    cases = {}
    (broken / "no_weights").mkdir(parents=True)
    shutil.copy(src / "config.json", broken / "no_weights" / "config.json")
    cases["no_weights"] = "wrong file layout: model.safetensors not found"
    shutil.copytree(src, broken / "corrupt_weights")
    (broken / "corrupt_weights" / "model.safetensors").write_bytes(b"not a safetensors file")
    cases["corrupt_weights"] = "model.safetensors is corrupt"
    shutil.copytree(src, broken / "corrupt_config")
    (broken / "corrupt_config" / "config.json").write_text("{ not json")
    cases["corrupt_config"] = "config.json is corrupt"
    shutil.copytree(src, broken / "unknown_arch")
    cfg = json.loads((src / "config.json").read_text())
    (broken / "unknown_arch" / "config.json").write_text(json.dumps({**cfg, "type": "act"}))
    cases["unknown_arch"] = "no APT adapter handles LeRobot policy type 'act'"
    cases["already_apt"] = "already an APT checkpoint"
    for name, message in cases.items():
        source = ws / "rt2" if name == "already_apt" else broken / name
        out_dir = ws / f"out_{name}"
        result = run(ws, *cli, str(source), str(out_dir), "--stage=2", ok=False)
        assert message in result.out, (name, result.out[-1500:])
        assert not out_dir.exists(), f"{name}: OUT was written"
        assert not list(ws.glob(f".out_{name}*")), f"{name}: a temporary directory was left behind"
    occupied = run(ws, *cli, str(src), str(ws / "rt2"), "--stage=2", ok=False)
    assert "already exists and is not empty" in occupied.out


def test_demo_command(tmp_path):
    """The README's first command, shortened: both stages through lerobot-train, then verify."""
    proc = subprocess.run([str(BIN / "apt-plugins"), "demo", f"--workdir={tmp_path / 'demo'}", "--steps=12"],
                          capture_output=True, text=True, timeout=900, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    report = (tmp_path / "demo" / "report.md").read_text()
    assert re.search(r"stage 2 at step 0 equals the stage-1 parent\s+PASS", report)
    assert re.search(r"stage 1 ignores empty instruction\s+PASS", report)
    assert (tmp_path / "demo" / "report.png").stat().st_size > 10_000
