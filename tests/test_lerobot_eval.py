"""``lerobot-eval`` on an APT checkpoint, offline on CPU, with the blocks-reach env of the synthetic dataset.

Fast tests check the env itself (reset/step/success/determinism, the ``apt_blocks`` config and the
vector env LeRobot builds from it); the ``dataset`` tests check that it shows the dataset's scenes;
the e2e test trains a tiny Stage-1 checkpoint with ``lerobot-train`` and evaluates it with
``lerobot-eval --env.type=apt_blocks``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from lerobot.envs.configs import EnvConfig

from apt_plugins.lerobot.data import COLORS, TASKS
from apt_plugins.lerobot.env import GYM_ID, AptBlocksEnvConfig, BlocksReachEnv, dataset_layouts

BIN = Path(sys.executable).parent


def _close_to_target(env: BlocksReachEnv) -> np.ndarray:
    action = env.state.copy()
    action[:2] = env.target
    return action


# ---------------------------------------------------------------------- the env
def test_reset_observation_and_task():
    env = BlocksReachEnv()
    obs, info = env.reset(seed=0)
    assert set(obs) == {"pixels", "agent_pos"} and set(obs["pixels"]) == {"top"}
    assert obs["pixels"]["top"].shape == (32, 32, 3) and obs["pixels"]["top"].dtype == np.uint8
    assert obs["agent_pos"].shape == (6,) and obs["agent_pos"].dtype == np.float32
    assert env.observation_space.contains(obs)
    assert env.task in TASKS and env.task_description == env.task == info["task"]
    assert env.layout in env.layouts and np.allclose(env.target, env.layout[env.task.split()[2]])
    assert info["is_success"] is False
    assert np.array_equal(env.render(), obs["pixels"]["top"])


def test_step_moves_the_gripper_and_succeeds_at_the_named_block():
    env = BlocksReachEnv(task="green")
    env.reset(seed=3)
    start = env.state.copy()
    far = start.copy()
    far[:2] = 1.0 - env.target  # at least 0.5 away for every layout spot
    obs, reward, terminated, truncated, info = env.step(far)
    assert np.allclose(obs["agent_pos"], np.clip(far, env.action_space.low, env.action_space.high))
    assert (reward, terminated, info["is_success"]) == (0.0, False, False)
    obs, reward, terminated, truncated, info = env.step(_close_to_target(env))
    assert (reward, terminated, truncated, info["is_success"]) == (1.0, True, False, True)
    assert info["distance"] == pytest.approx(0.0, abs=1e-6)
    # another block is not the named one
    env.reset(seed=3)
    action = env.state.copy()
    action[:2] = env.layout["red"]
    *_, terminated, _, info = env.step(action)
    assert not terminated and not info["is_success"]


def test_deterministic_given_a_seed():
    a, b = BlocksReachEnv(), BlocksReachEnv()
    for seed in (0, 1, 2):
        (oa, ia), (ob, ib) = a.reset(seed=seed), b.reset(seed=seed)
        assert a.task == b.task and np.array_equal(oa["pixels"]["top"], ob["pixels"]["top"])
        assert np.array_equal(oa["agent_pos"], ob["agent_pos"])
        action = a.action_space.sample()
        sa, sb = a.step(action), b.step(action)
        assert np.array_equal(sa[0]["pixels"]["top"], sb[0]["pixels"]["top"]) and sa[1:4] == sb[1:4]
    starts = {(BlocksReachEnv().reset(seed=s)[0]["agent_pos"][:2].tobytes()) for s in range(5)}
    assert len(starts) == 5


def test_choosing_the_task_and_layout():
    env = BlocksReachEnv(task="pick the blue block")
    assert all(env.reset(seed=s)[1]["task"] == "pick the blue block" for s in range(4))
    _, info = env.reset(seed=0, options={"task": "red", "layout": 2})
    assert env.task == "pick the red block" == info["task"]
    assert env.layout == env.layouts[2] and np.allclose(env.target, env.layouts[2]["red"])
    # random task per episode when none is fixed: all three come up
    free = BlocksReachEnv()
    assert {free.reset(seed=s)[1]["task"] for s in range(30)} == set(TASKS)
    with pytest.raises(ValueError, match="unknown task"):
        BlocksReachEnv(task="yellow")
    with pytest.raises(ValueError, match="unknown task"):
        env.reset(options={"task": "pick the yellow block"})


@dataclass
class _EnvOnly:
    env: EnvConfig


def test_config_features_and_cli_parsing():
    import draccus
    from lerobot.envs.utils import env_to_policy_features

    cfg = draccus.parse(_EnvOnly, args=["--env.type=apt_blocks", "--env.task=red", "--env.episode_length=5"]).env
    assert isinstance(cfg, AptBlocksEnvConfig) and cfg.type == "apt_blocks"
    assert cfg.gym_id == GYM_ID and cfg.gym_kwargs["task"] == "red" and cfg.gym_kwargs["max_episode_steps"] == 5
    features = env_to_policy_features(cfg)
    assert {k: (v.type.name, tuple(v.shape)) for k, v in features.items()} == {
        "observation.images.top": ("VISUAL", (3, 32, 32)),
        "observation.state": ("STATE", (6,)),
        "action": ("ACTION", (6,)),
    }
    with pytest.raises(draccus.utils.ParsingError):
        draccus.parse(_EnvOnly, args=["--env.type=apt_blocks", "--env.task=yellow"])


def test_lerobot_vector_env_the_way_lerobot_eval_uses_it():
    from lerobot.envs.factory import make_env, make_env_config
    from lerobot.envs.utils import preprocess_observation

    envs = make_env(make_env_config("apt_blocks", episode_length=6), n_envs=2)
    vec = envs["apt_blocks"][0]
    try:
        obs, _ = vec.reset(seed=[10, 11])
        batch = preprocess_observation(obs)
        assert batch["observation.images.top"].shape == (2, 3, 32, 32)
        assert batch["observation.state"].shape == (2, 6)
        assert all(t in TASKS for t in vec.call("task")) and vec.call("task_description") == vec.call("task")
        assert vec.call("_max_episode_steps") == (6, 6)
        assert vec.metadata["render_fps"] == 10 and vec.call("render")[0].shape == (128, 128, 3)
        # the sub-env that reaches its block reports success through final_info
        actions = np.stack([obs["agent_pos"][0], obs["agent_pos"][1]])
        actions[0, :2] = vec.envs[0].unwrapped.target
        _, reward, terminated, _, info = vec.step(actions)
        assert terminated.tolist()[0] and reward[0] == 1.0
        assert info["final_info"]["is_success"][0]
    finally:
        vec.close()


# ---------------------------------------------------------------------- env vs dataset
@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from apt_plugins.lerobot.data import make_synthetic_dataset

    root = tmp_path_factory.mktemp("apt_eval") / "data"
    return make_synthetic_dataset(root, episodes_per_task=1, frames_per_episode=8)


def test_env_shows_the_dataset_scenes(dataset):
    """Same layouts (block colours where the env puts them), same features, same start-pose range."""
    layouts = dataset_layouts()
    env = BlocksReachEnv()
    assert env.layouts == layouts
    half = 32 // 12
    for episode in range(dataset.meta.total_episodes):
        frame = dataset[episode * 8]
        assert int(frame["episode_index"]) == episode
        image = (frame["observation.images.top"].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        for color, (x, y) in layouts[episode % len(layouts)].items():
            cx, cy = int(x * 31), int(y * 31)
            patch = image[cy - half : cy + half + 1, cx - half : cx + half + 1].reshape(-1, 3)
            # the gripper dot (3x3) may cover part of a block
            assert (np.abs(patch.astype(int) - COLORS[color]).max(axis=1) <= 1).sum() >= 16, (episode, color)


def test_env_features_match_the_dataset_features(dataset):
    from lerobot.utils.feature_utils import dataset_to_policy_features
    from lerobot.envs.utils import env_to_policy_features

    from_env = env_to_policy_features(AptBlocksEnvConfig())
    from_data = dataset_to_policy_features(dataset.meta.features)
    assert {k: (v.type, tuple(v.shape)) for k, v in from_env.items()} == {
        k: (v.type, tuple(v.shape)) for k, v in from_data.items()
    }


# ---------------------------------------------------------------------- lerobot-eval end to end
# One loader key per plugin CLI argument and no --policy.discover_packages_path next to --policy.path:
# this scratch package loads the tiny-model patches and the env module, and records the instructions
# the policy's preprocessor receives (to prove the env's ``task`` reaches the policy).
EVAL_PLUGIN = '''"""Scratch plugin for the lerobot-eval test (never used in real runs)."""
import json
import os

import apt_tiny_pi  # noqa: F401  (tiny pi0 at construction)
import apt_plugins.lerobot.env  # noqa: F401  (--env.type=apt_blocks)
import lerobot.scripts.lerobot_eval as _eval

_make = _eval.make_env_pre_post_processors


def _recording(env_cfg, policy_cfg):
    pre, post = _make(env_cfg=env_cfg, policy_cfg=policy_cfg)

    def record(observation):
        with open(os.environ["APT_TASK_LOG"], "a") as f:
            f.write(json.dumps(list(observation["task"])) + "\\n")
        return pre(observation)

    return record, post


_eval.make_env_pre_post_processors = _recording
'''


def _run(cmd: list[str], env: dict[str, str], log: Path) -> None:
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    log.write_text(result.stdout + "\n" + result.stderr)
    assert result.returncode == 0, f"{cmd[0]} failed ({result.returncode}); log: {log}\n{result.stderr[-4000:]}"


@pytest.mark.e2e
def test_lerobot_eval_on_an_apt_checkpoint(tmp_path, dataset):
    from apt_plugins_lerobot_pi.testing import write_tiny_plugin, write_tokenizer_fixture

    write_tokenizer_fixture(tmp_path / "hub")
    tiny = write_tiny_plugin(tmp_path / "plugins")
    (tmp_path / "plugins" / "apt_eval_plugin").mkdir()
    (tmp_path / "plugins" / "apt_eval_plugin" / "__init__.py").write_text(EVAL_PLUGIN)
    env = {
        **os.environ,
        "HF_HUB_CACHE": str(tmp_path / "hub"),
        "HF_HUB_OFFLINE": "1",
        "HF_LEROBOT_HOME": str(tmp_path / "home"),
        "PYTHONPATH": str(tmp_path / "plugins"),
        "WANDB_MODE": "disabled",
        "TOKENIZERS_PARALLELISM": "false",
        "APT_TASK_LOG": str(tmp_path / "tasks.jsonl"),
    }
    _run([
        str(BIN / "lerobot-train"), "--policy.type=apt_pi0", "--policy.apt.stage=1",
        f"--env.discover_packages_path={tiny}", "--policy.device=cpu", "--policy.push_to_hub=false",
        "--policy.chunk_size=4", "--policy.n_action_steps=4", "--policy.max_state_dim=8",
        "--policy.max_action_dim=8", "--policy.image_resolution=[28,28]", "--policy.tokenizer_max_length=16",
        "--dataset.repo_id=local/apt_demo", f"--dataset.root={dataset.root}", "--batch_size=4", "--steps=2",
        "--num_workers=0", "--save_freq=2", "--log_freq=1", f"--output_dir={tmp_path / 's1'}",
        "--wandb.enable=false",
    ], env, tmp_path / "train.log")
    checkpoint = tmp_path / "s1" / "checkpoints" / "last" / "pretrained_model"
    assert (checkpoint / "model.safetensors").is_file()

    _run([
        str(BIN / "lerobot-eval"), f"--policy.path={checkpoint}", "--env.type=apt_blocks",
        "--env.discover_packages_path=apt_eval_plugin", "--env.episode_length=8", "--eval.n_episodes=2",
        "--eval.batch_size=1", "--policy.device=cpu", f"--output_dir={tmp_path / 'eval'}",
    ], env, tmp_path / "eval.log")

    info = json.loads((tmp_path / "eval" / "eval_info.json").read_text())
    assert info["overall"]["n_episodes"] == 2
    assert 0.0 <= info["overall"]["pc_success"] <= 100.0
    (task,) = info["per_task"]
    assert task["task_group"] == "apt_blocks"
    assert len(task["metrics"]["successes"]) == 2 and len(task["metrics"]["sum_rewards"]) == 2
    assert all(Path(p).is_file() for p in info["overall"]["video_paths"])
    seen = [json.loads(line) for line in (tmp_path / "tasks.jsonl").read_text().splitlines()]
    assert seen and all(len(batch) == 1 and batch[0] in TASKS for batch in seen)
