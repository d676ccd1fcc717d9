"""A tiny "blocks reach" gym environment matching the synthetic dataset, for ``lerobot-eval``.

The scene is the one :mod:`apt_plugins.lerobot.data` records: three coloured blocks at one of the
dataset's shared layouts, a gripper drawn as a dark dot, and an instruction naming one block. The
6-D action is the absolute target pose ``[x, y, z, roll, pitch, gripper]`` (exactly what the
dataset's ``action`` holds: the next ``observation.state``); the episode succeeds and ends when the
gripper's xy is within ``success_radius`` of the named block.

Importing this module registers the gym id :data:`GYM_ID` and the LeRobot env type ``apt_blocks``,
so ``lerobot-eval --policy.path=<APT checkpoint> --env.type=apt_blocks`` evaluates a policy trained
on the synthetic dataset.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from lerobot.configs import FeatureType, PolicyFeature
from lerobot.envs.configs import EnvConfig
from lerobot.utils.constants import ACTION, OBS_IMAGES, OBS_STATE

from .data import COLORS, JOINTS, TASKS, _render
from .data import make_layouts as _make_layouts

__all__ = ["GYM_ID", "CAMERA", "BlocksReachEnv", "AptBlocksEnvConfig", "dataset_layouts", "instruction_for"]

GYM_ID = "apt_plugins/BlocksReach-v0"
CAMERA = "top"  # observation["pixels"]["top"] -> "observation.images.top", the dataset's image key
STATE_LOW = np.array([0.0, 0.0, 0.0, -1.0, -1.0, -1.0], dtype=np.float32)
STATE_HIGH = np.ones(len(JOINTS), dtype=np.float32)


def dataset_layouts(layouts: int = 3, seed: int = 0) -> list[dict[str, tuple[float, float]]]:
    """The block layouts of ``make_synthetic_dataset(..., layouts=layouts, seed=seed)``."""
    return _make_layouts(np.random.default_rng(seed), layouts)


def instruction_for(task: str) -> str:
    """The instruction for ``task``: a colour (``"red"``) or an instruction (``"pick the red block"``)."""
    if task in COLORS:
        return f"pick the {task} block"
    if task in TASKS:
        return task
    raise ValueError(f"unknown task {task!r}; expected one of {list(COLORS)} or {TASKS}")


class BlocksReachEnv(gym.Env):
    """Move the gripper to the block the instruction names.

    Observation: ``{"pixels": {"top": uint8 (H, W, 3)}, "agent_pos": float32 (6,)}``, the layout
    LeRobot's ``preprocess_observation`` maps to ``observation.images.top`` and ``observation.state``.
    ``task``/``task_description`` hold the instruction of the current episode.

    ``task=None`` draws the task of each episode from the seeded RNG; ``reset(options={"task": ...,
    "layout": i})`` chooses the task and/or the layout index of one episode. Everything (layout,
    task, start pose, image noise) comes from the RNG seeded by ``reset(seed=...)``.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 10}

    def __init__(
        self,
        task: str | None = None,
        image_size: int = 32,
        layouts: int = 3,
        layout_seed: int = 0,
        success_radius: float = 0.05,
        render_mode: str | None = "rgb_array",
        render_scale: int = 1,
        fps: int = 10,
    ):
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"render_mode must be 'rgb_array' or None, got {render_mode!r}")
        self.fixed_task = None if task is None else instruction_for(task)
        self.image_size = image_size
        self.layouts = dataset_layouts(layouts, layout_seed)
        self.success_radius = success_radius
        self.render_mode = render_mode
        self.render_scale = render_scale
        self.metadata = {**self.metadata, "render_fps": fps}
        self.observation_space = spaces.Dict({
            "pixels": spaces.Dict({CAMERA: spaces.Box(0, 255, (image_size, image_size, 3), dtype=np.uint8)}),
            "agent_pos": spaces.Box(STATE_LOW, STATE_HIGH, dtype=np.float32),
        })
        self.action_space = spaces.Box(STATE_LOW, STATE_HIGH, dtype=np.float32)
        self.task = self.fixed_task or TASKS[0]
        self.layout: dict[str, tuple[float, float]] = self.layouts[0]
        self.target = np.zeros(2)
        self.state = np.zeros(len(JOINTS), dtype=np.float32)
        self._frame = np.zeros((image_size, image_size, 3), dtype=np.uint8)

    @property
    def task_description(self) -> str:
        return self.task

    def _observation(self) -> dict[str, Any]:
        self._frame = _render(self.image_size, self.layout, self.state, self.np_random)
        return {"pixels": {CAMERA: self._frame.copy()}, "agent_pos": self.state.copy()}

    def _info(self) -> dict[str, Any]:
        distance = float(np.linalg.norm(self.state[:2] - self.target))
        return {"is_success": distance <= self.success_radius, "distance": distance, "task": self.task}

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        options = options or {}
        rng = self.np_random
        if options.get("task") is not None:
            self.task = instruction_for(options["task"])
        elif self.fixed_task is not None:
            self.task = self.fixed_task
        else:
            self.task = TASKS[int(rng.integers(len(TASKS)))]
        index = options.get("layout")
        self.layout = self.layouts[int(rng.integers(len(self.layouts))) if index is None else int(index)]
        self.target = np.array(self.layout[self.task.split()[2]])
        # The dataset's start pose: gripper open above a random point.
        self.state = np.concatenate([rng.uniform(0.1, 0.9, 2), [0.5, 0.0, 0.0, 1.0]]).astype(np.float32)
        return self._observation(), self._info()

    def step(self, action: np.ndarray):
        action = np.asarray(action, dtype=np.float32).reshape(len(JOINTS))
        self.state = np.clip(action, STATE_LOW, STATE_HIGH)
        info = self._info()
        success = bool(info["is_success"])
        return self._observation(), float(success), success, False, info

    def render(self) -> np.ndarray | None:
        if self.render_mode is None:
            return None
        s = self.render_scale
        return self._frame if s == 1 else self._frame.repeat(s, axis=0).repeat(s, axis=1)


if GYM_ID not in gym.registry:
    gym.register(id=GYM_ID, entry_point=f"{__name__}:BlocksReachEnv")


@EnvConfig.register_subclass("apt_blocks")
@dataclass
class AptBlocksEnvConfig(EnvConfig):
    """``--env.type=apt_blocks``: the blocks-reach env of the synthetic dataset.

    ``task``: a colour or an instruction to evaluate on one task; ``None`` draws it per episode.
    ``layouts``/``layout_seed`` must match the dataset's ``layouts``/``seed`` (defaults do).
    """

    task: str | None = None
    fps: int = 10
    episode_length: int = 30
    image_size: int = 32
    layouts: int = 3
    layout_seed: int = 0
    success_radius: float = 0.05
    render_mode: str = "rgb_array"
    render_scale: int = 4
    features: dict[str, PolicyFeature] = field(
        default_factory=lambda: {
            ACTION: PolicyFeature(type=FeatureType.ACTION, shape=(len(JOINTS),)),
            "agent_pos": PolicyFeature(type=FeatureType.STATE, shape=(len(JOINTS),)),
        }
    )
    features_map: dict[str, str] = field(
        default_factory=lambda: {
            ACTION: ACTION,
            "agent_pos": OBS_STATE,
            f"pixels/{CAMERA}": f"{OBS_IMAGES}.{CAMERA}",
        }
    )

    def __post_init__(self):
        if self.task is not None:
            instruction_for(self.task)  # fail at parse time on an unknown task
        self.features[f"pixels/{CAMERA}"] = PolicyFeature(
            type=FeatureType.VISUAL, shape=(self.image_size, self.image_size, 3)
        )

    @property
    def package_name(self) -> str:
        return __name__

    @property
    def gym_id(self) -> str:
        return GYM_ID

    @property
    def gym_kwargs(self) -> dict:
        return {
            "task": self.task,
            "image_size": self.image_size,
            "layouts": self.layouts,
            "layout_seed": self.layout_seed,
            "success_radius": self.success_radius,
            "render_mode": self.render_mode,
            "render_scale": self.render_scale,
            "fps": self.fps,
            "max_episode_steps": self.episode_length,
        }
