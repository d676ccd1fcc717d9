"""Every LeRobot adapter through LeRobot's and apt-plugins' CLIs, as pi0 is in test_lerobot_e2e.py.

Parametrized over the registered LeRobot adapters (a new one joins by registering with a kit that
has ``cli_workspace``; pi0 is covered by ``test_lerobot_e2e.py`` and ``test_lerobot_eval.py``). One
test per adapter shares its runs, in the order a user would type them:

1. ``lerobot-train --policy.type=<stock>``: a plain host checkpoint;
2. ``lerobot-train --policy.type=<apt> --policy.pretrained_path=<plain>`` (Stage 1): the APT
   processors are built from the checkpoint's own ones, the change printed, the source untouched;
3. Stage 2 promoted from it, then ``--resume=true``, then ``--policy.path`` reload;
4. ``apt-plugins verify`` on both checkpoints (Stage-1 invariance on dataset frames, Stage-2 step-0
   equality with its parent);
5. ``lerobot-eval`` on the Stage-2 checkpoint in the blocks-reach env.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from apt_plugins import AptConfig, get_plugin_manager

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

BIN = Path(sys.executable).parent
#: Adapters whose CLI runs are tested elsewhere (the pi0 reference tests).
COVERED_ELSEWHERE = {"lerobot_pi0"}


def lerobot_adapters() -> list[str]:
    """Registered LeRobot adapters with APT policy types, minus those covered elsewhere."""
    return sorted(a.name for a in get_plugin_manager().registry
                  if a.host == "lerobot" and a.apt_policy_types and a.name not in COVERED_ELSEWHERE)


class Runner:
    """Runs the CLIs as subprocesses with an adapter's workspace; keeps each command's output."""

    def __init__(self, root: Path, adapter_name: str):
        from apt_plugins.lerobot.data import make_synthetic_dataset

        adapter = get_plugin_manager().get_adapter(adapter_name)
        kit = adapter.conformance_kit()
        if not hasattr(kit, "cli_workspace"):
            pytest.fail(f"the conformance kit of {adapter_name!r} has no cli_workspace(root): the CLI parity "
                        "tests cannot build its tiny policies in a subprocess (see apt_plugins.testing.cli)")
        self.root, self.adapter = root, adapter
        self.stock_type, self.apt_type = adapter.policy_types[0], adapter.apt_policy_types[0]
        self.ws = kit.cli_workspace(root)
        make_synthetic_dataset(root / "data", episodes_per_task=1, frames_per_episode=8)
        self.dataset = ["--dataset.repo_id=local/apt_demo", f"--dataset.root={root / 'data'}"]

    def run(self, *args: str) -> str:
        proc = subprocess.run([*args], env=self.ws.environ(HF_LEROBOT_HOME=str(self.root / "home")),
                              capture_output=True, text=True, timeout=600)
        out = proc.stdout + proc.stderr
        if proc.returncode != 0:  # drop LeRobot's torchcodec fallback noise from the failure message
            out = "\n".join(line for line in out.splitlines() if "torchcodec" not in line and "libav" not in line)
        assert proc.returncode == 0, f"{self.adapter.name}: {' '.join(args)} failed ({proc.returncode}):\n{out[-4000:]}"
        return out

    def train(self, out: str, *args: str, steps: int = 1) -> str:
        return self.run(str(BIN / "lerobot-train"), *args, *self.ws.discover_args(), *self.dataset,
                        "--batch_size=2", f"--steps={steps}", "--num_workers=0", f"--save_freq={steps}",
                        "--log_freq=1", f"--output_dir={self.root / out}", "--wandb.enable=false")

    def checkpoint(self, out: str) -> Path:
        return self.root / out / "checkpoints" / "last" / "pretrained_model"

    def step(self, out: str) -> int:
        state = self.root / out / "checkpoints" / "last" / "training_state" / "training_step.json"
        return json.loads(state.read_text())["step"]


def _digests(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()}


@pytest.mark.parametrize("adapter_name", lerobot_adapters())
def test_cli_parity(adapter_name, tmp_path):
    from apt_plugins.lerobot.processors import apt_processor_configs

    r = Runner(tmp_path, adapter_name)
    tiny = r.ws.policy_args

    # 1. A plain host checkpoint, and what the adapter says its processors need.
    r.train("stock", f"--policy.type={r.stock_type}", *tiny)
    plain = r.checkpoint("stock")
    before = _digests(plain)
    _, expected_changes = apt_processor_configs(r.adapter, plain, AptConfig())

    # 2. --policy.pretrained_path=<plain checkpoint> into the APT type (Stage 1): trains past the first
    #    batch with processors built from the checkpoint's own, the change printed.
    s1 = r.train("s1", f"--policy.type={r.apt_type}", "--policy.apt.stage=1", "--policy.apt.check_frozen=true",
                 *tiny, f"--policy.pretrained_path={plain}")
    assert f"APT stage 1 on adapter '{adapter_name}'" in s1 and "frozen tensors unchanged at this checkpoint" in s1
    for line in expected_changes:
        assert line in s1, f"processor change not printed: {line!r}"
    assert ("APT processors:" in s1) == bool(expected_changes)
    assert _digests(plain) == before, "the plain checkpoint was modified"
    ckpt1 = r.checkpoint("s1")
    saved = json.loads((ckpt1 / "train_config.json").read_text())
    assert Path(saved["policy"]["pretrained_path"]) == plain, "train_config.json must record the user's source"
    assert apt_processor_configs(r.adapter, ckpt1, AptConfig()) == ({}, []), "the run saved non-APT processors"
    assert json.loads((ckpt1 / "config.json").read_text())["type"] == r.apt_type

    # 3. Stage 2 promoted from Stage 1, resumed, reloaded with --policy.path.
    s2 = r.train("s2", f"--policy.type={r.apt_type}", "--policy.apt.stage=2", *tiny, f"--policy.pretrained_path={ckpt1}")
    assert "APT promotion Stage 1 -> Stage 2" in s2 and "apt/gate_mean/0:" in s2
    ckpt2 = r.checkpoint("s2")
    manifest = json.loads((ckpt2 / "apt_manifest.json").read_text())
    assert manifest["stage"] == 2 and manifest["parent"]["stage"] == 1 and manifest["fresh_at_last_load"]
    r.run(str(BIN / "lerobot-train"), f"--config_path={ckpt2 / 'train_config.json'}", "--resume=true", "--steps=2",
          *r.ws.discover_args())
    assert r.step("s2") == 2
    resumed = json.loads((r.checkpoint("s2") / "apt_manifest.json").read_text())
    assert resumed["stage"] == 2 and resumed["parent"]["stage"] == 1
    r.train("s2_reload", f"--policy.path={r.checkpoint('s2')}", "--policy.push_to_hub=false")
    assert json.loads((r.checkpoint("s2_reload") / "config.json").read_text())["apt"]["stage"] == 2

    # 4. The invariant checks on these checkpoints (Stage 2 against its Stage-1 parent).
    v1 = r.run(str(BIN / "apt-plugins"), "verify", str(ckpt1), *r.ws.import_args(), "--dataset-repo-id=local/apt_demo",
               f"--dataset-root={tmp_path / 'data'}")
    for variant in ("swapped", "empty", "shuffled"):
        assert re.search(rf"stage 1 ignores {variant} instruction\s+PASS", v1), v1[-3000:]
    v2 = r.run(str(BIN / "apt-plugins"), "verify", str(ckpt2), f"--parent={ckpt1}", *r.ws.import_args())
    assert re.search(r"stage 2 at step 0 equals the stage-1 parent\s+PASS", v2), v2[-3000:]
    assert re.search(r"frozen tensors identical to the parent\s+PASS", v2), v2[-3000:]

    # 5. lerobot-eval on the (resumed) Stage-2 checkpoint.
    r.run(str(BIN / "lerobot-eval"), f"--policy.path={r.checkpoint('s2')}", "--env.type=apt_blocks",
          *r.ws.discover_args(), "--env.episode_length=4", "--eval.n_episodes=1", "--eval.batch_size=1",
          "--policy.device=cpu", f"--output_dir={tmp_path / 'eval'}")
    info = json.loads((tmp_path / "eval" / "eval_info.json").read_text())
    assert info["overall"]["n_episodes"] == 1 and 0.0 <= info["overall"]["pc_success"] <= 100.0
