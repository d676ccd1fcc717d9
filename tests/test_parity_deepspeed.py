"""Every LeRobot adapter under DeepSpeed on CPU, as pi0 is in test_deepspeed.py (gloo, tiny models).

Parametrized over the registered LeRobot adapters whose kit has ``cli_workspace`` (pi0 is covered
by ``test_deepspeed.py``). One test per adapter shares its runs:

1. Stage 1 under ZeRO-2 on 2 processes (fixed per-sample noise, no shuffling): only the expert
   trains and holds optimizer state, frozen tensors stay bit-identical, ranks agree, and the
   consolidated checkpoint is a normal APT checkpoint;
2. the same run on 1 process with the same global batch follows the 2-process loss trajectory;
3. Stage 2 with the full VLM under ZeRO-3 (every parameter really partitioned), promoted from (1):
   the consolidated checkpoint has no empty tensors, keeps the fusion layers, and ``apt-plugins
   verify`` finds it equal to its Stage-1 parent at step 0 with the frozen tensors unchanged.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from test_parity_cli import lerobot_adapters

from apt_plugins import get_plugin_manager

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None or shutil.which("g++") is None,
                       reason="needs deepspeed (pip install 'apt-plugins[deepspeed]') and a C++ compiler"),
]

BIN = Path(sys.executable).parent


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Launcher:
    """Runs ``apt_plugins.deepspeed.train`` under torchrun with an adapter's CLI workspace."""

    def __init__(self, root: Path, adapter_name: str):
        from apt_plugins.lerobot.data import make_synthetic_dataset

        adapter = get_plugin_manager().get_adapter(adapter_name)
        kit = adapter.conformance_kit()
        if not hasattr(kit, "cli_workspace"):
            pytest.fail(f"the conformance kit of {adapter_name!r} has no cli_workspace(root) "
                        "(see apt_plugins.testing.cli)")
        self.root, self.apt_type = root, adapter.apt_policy_types[0]
        self.ws = kit.cli_workspace(root)
        # 16 frames: the 3 steps x 4 samples below stay inside the first episode, where no action chunk
        # is padded. GR00T normalises its loss by the batch's valid action steps, so with padded samples
        # a mean of per-process losses is not the global one (a host property, not an APT one).
        make_synthetic_dataset(root / "data", episodes_per_task=1, frames_per_episode=16)
        self.env = self.ws.environ(HF_LEROBOT_HOME=str(root / "home"), DS_ACCELERATOR="cpu",
                                   TORCH_EXTENSIONS_DIR=str(Path.home() / ".cache" / "apt_plugins_torch_extensions"))

    def launch(self, name: str, *args: str, nproc: int, batch: int, steps: int) -> list[dict]:
        report = self.root / f"{name}_{{rank}}.json"
        cmd = [str(BIN / "torchrun"), f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
               f"--master_port={_port()}", "-m", "apt_plugins.deepspeed.train", f"--ds.report={report}",
               f"--policy.type={self.apt_type}", *self.ws.policy_args, *args, *self.ws.discover_args(),
               "--dataset.repo_id=local/apt_demo", f"--dataset.root={self.root / 'data'}", f"--batch_size={batch}",
               f"--steps={steps}", "--num_workers=0", "--log_freq=1", "--wandb.enable=false",
               f"--output_dir={self.root / name}"]
        proc = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=900)
        out = proc.stdout + proc.stderr
        if proc.returncode != 0:
            errors = [line for line in out.splitlines() if re.search(r"\b\w+Error\b", line) and "torchcodec" not in line
                      and "OSError" not in line and "libtorchcodec" not in line]
            pytest.fail(f"{' '.join(cmd)} failed:\n" + "\n".join(errors[-20:]) + "\n" + out[-3000:])
        return [json.loads(Path(str(report).replace("{rank}", str(r))).read_text()) for r in range(nproc)]

    def checkpoint(self, name: str) -> Path:
        return self.root / name / "checkpoints" / "last" / "pretrained_model"


def _tensors(ckpt: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(ckpt / "model.safetensors"))


@pytest.mark.parametrize("adapter_name", lerobot_adapters())
def test_deepspeed_parity(adapter_name, tmp_path):
    ds = Launcher(tmp_path, adapter_name)
    # Fixed per-sample noise and data order: the 1- and 2-process runs see the same global batches.
    same = ["--ds.recipe=stage1_zero2", "--ds.deterministic_noise=true", "--ds.shuffle=false", "--policy.apt.stage=1"]

    # 1. Stage 1, ZeRO-2, 2 processes x 2 samples.
    r0, r1 = ds.launch("s1", *same, "--policy.apt.check_frozen=true", "--save_freq=3", nproc=2, batch=2, steps=3)
    assert r0["world"] == r1["world"] == 2 and r0["zero_stage"] == 2
    assert r0["frozen_unchanged"] and r1["frozen_unchanged"] and r0["frozen_checked"] > 0
    assert r0["checksum"] == r1["checksum"] and r0["losses"] == r1["losses"], "ranks disagree"
    states = r0["optimizer_state_elements"] + r1["optimizer_state_elements"]
    assert r0["trainable_elements"] <= states <= r0["trainable_elements"] + 2 * 64, "optimizer state beyond the expert"
    ckpt1 = ds.checkpoint("s1")
    assert min(v.numel() for v in _tensors(ckpt1).values()) > 0
    manifest = json.loads((ckpt1 / "apt_manifest.json").read_text())
    assert manifest["stage"] == 1 and manifest["frozen_check"]["unchanged"]

    # 2. The same global batches on 1 process x 4 samples: the same loss trajectory.
    one = ds.launch("one", *same, "--save_checkpoint=false", nproc=1, batch=4, steps=3)[0]
    # fp32 reduction order differs (one 4-sample mean vs two 2-sample means all-reduced).
    assert r0["losses"] == pytest.approx(one["losses"], rel=1e-5, abs=1e-6)
    assert r0["checksum"] == pytest.approx(one["checksum"], rel=1e-6)

    # 3. Stage 2, full VLM, ZeRO-3 with every parameter partitioned, promoted from (1), consolidated.
    r0, r1 = ds.launch("s2", "--ds.recipe=stage2_full_zero3",
                       "--ds.set.zero_optimization.stage3_param_persistence_threshold=0", "--policy.apt.stage=2",
                       "--policy.apt.vlm_mode=full", "--policy.apt.check_frozen=true",
                       f"--policy.pretrained_path={ckpt1}", "--save_freq=2", nproc=2, batch=2, steps=2)
    assert r0["zero_stage"] == 3 and r0["params_partitioned"] and r1["params_partitioned"]
    assert r0["frozen_unchanged"] and r0["losses"] == r1["losses"]
    states = r0["optimizer_state_elements"] + r1["optimizer_state_elements"]
    assert r0["trainable_elements"] <= states <= r0["trainable_elements"] + 2 * 64
    ckpt2 = ds.checkpoint("s2")
    tensors = _tensors(ckpt2)
    assert min(v.numel() for v in tensors.values()) > 0, "empty tensors in a consolidated ZeRO-3 checkpoint"
    assert any(".apt_fusion." in k for k in tensors)
    assert json.loads((ckpt2 / "apt_manifest.json").read_text())["parent"]["stage"] == 1
    verify = subprocess.run([str(BIN / "apt-plugins"), "verify", str(ckpt2), f"--parent={ckpt1}",
                             *ds.ws.import_args()], env=ds.env, capture_output=True, text=True, timeout=600)
    assert verify.returncode == 0, verify.stdout + verify.stderr[-2000:]
    assert re.search(r"stage 2 at step 0 equals the stage-1 parent\s+PASS", verify.stdout), verify.stdout
    assert re.search(r"frozen tensors identical to the parent\s+PASS", verify.stdout), verify.stdout
