"""A small synthetic, language-conditioned LeRobotDataset, written to disk offline.

Every scene shows the same three coloured blocks at positions drawn from a few shared layouts; the
instruction names one of them and the actions move the gripper to it. Scenes overlap across tasks,
so the image alone does not tell which block to go to: the instruction matters, which is exactly
what APT's Stage 1 must ignore and Stage 2 must learn to read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["COLORS", "TASKS", "SPOTS", "make_layouts", "make_synthetic_dataset"]

COLORS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 80, 230)}
TASKS = [f"pick the {c} block" for c in COLORS]
JOINTS = ["x", "y", "z", "roll", "pitch", "gripper"]


SPOTS = [(0.2, 0.25), (0.5, 0.75), (0.8, 0.3), (0.3, 0.7), (0.75, 0.8)]


def make_layouts(rng: np.random.Generator, layouts: int) -> list[dict[str, tuple[float, float]]]:
    """``layouts`` arrangements of the coloured blocks (shared by the dataset and the eval env)."""
    arrangements = []
    for _ in range(layouts):
        spots = rng.permutation(SPOTS)[: len(COLORS)]
        arrangements.append({c: tuple(s) for c, s in zip(COLORS, spots, strict=True)})
    return arrangements


def _render(size: int, layout: dict[str, tuple[float, float]], gripper: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    img = np.full((size, size, 3), 235, dtype=np.uint8)
    img += rng.integers(0, 12, size=img.shape, dtype=np.uint8)  # sensor noise
    half = max(1, size // 12)
    for color, (x, y) in layout.items():
        cx, cy = int(x * (size - 1)), int(y * (size - 1))
        img[max(0, cy - half) : cy + half + 1, max(0, cx - half) : cx + half + 1] = COLORS[color]
    gx, gy = (np.clip(gripper[:2], 0, 1) * (size - 1)).astype(int)
    img[max(0, gy - 1) : gy + 2, max(0, gx - 1) : gx + 2] = (20, 20, 20)
    return img


def make_synthetic_dataset(
    root: str | Path,
    repo_id: str = "local/apt_demo",
    episodes_per_task: int = 4,
    frames_per_episode: int = 24,
    image_size: int = 32,
    layouts: int = 3,
    fps: int = 10,
    seed: int = 0,
) -> Any:
    """Create the dataset under ``root`` (must not exist) and return the ``LeRobotDataset``.

    ``layouts`` block arrangements are shared by all tasks; each episode picks one layout and one
    task, starts the gripper at a random point and moves it to the named block.
    """
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    rng = np.random.default_rng(seed)
    features = {
        "observation.images.top": {"dtype": "image", "shape": (image_size, image_size, 3),
                                   "names": ["height", "width", "channels"]},
        "observation.state": {"dtype": "float32", "shape": (len(JOINTS),), "names": JOINTS},
        "action": {"dtype": "float32", "shape": (len(JOINTS),), "names": JOINTS},
    }
    dataset = LeRobotDataset.create(repo_id=repo_id, fps=fps, features=features, root=root, use_videos=False)
    arrangements = make_layouts(rng, layouts)
    for episode in range(episodes_per_task * len(TASKS)):
        task = TASKS[episode % len(TASKS)]
        target = np.array(arrangements[episode % layouts][task.split()[2]])
        layout = arrangements[episode % layouts]
        pos = np.concatenate([rng.uniform(0.1, 0.9, 2), [0.5, 0.0, 0.0, 1.0]]).astype(np.float32)
        for t in range(frames_per_episode):
            step = np.zeros(len(JOINTS), dtype=np.float32)
            step[:2] = (target - pos[:2]) * 0.25
            step[5] = -1.0 if t > frames_per_episode * 0.7 else 1.0  # close the gripper near the block
            action = pos + step
            action[5] = step[5]
            dataset.add_frame({
                "observation.images.top": _render(image_size, layout, pos, rng),
                "observation.state": pos.copy(),
                "action": action.astype(np.float32),
                "task": task,
            })
            pos = action.copy()
        dataset.save_episode()
    dataset.finalize()
    return dataset
