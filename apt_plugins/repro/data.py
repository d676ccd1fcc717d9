"""The repro's datasets, written as real LeRobotDatasets and read back through ``LeRobotDataset``.

Splits (each a LeRobotDataset directory under ``<workdir>/data/<split>``):

- ``pretrain``: robot pretraining, one episode per fresh layout (many layouts), canonical phrasing;
- ``posttrain``: robot post-training, a few layouts, each paired with one instruction (a fraction
  with a second one), many episodes each: vision alone predicts the action (the shortcut);
- ``eval_id``: post-training layouts and instructions, fresh episodes;
- ``eval_task``: post-training layouts, an object that was never named for that layout (LIBERO-PRO
  "Task" perturbation);
- ``eval_paraphrase``: post-training layouts and targets, paraphrased instructions (verbs, colour
  and noun synonyms seen only in VLM pretraining);
- ``eval_unseen``: fresh layouts whose named object is a held-out (colour, shape) combination;
- ``eval_newscene``: fresh layouts, seen combinations, canonical phrasing.

An episode is one reach: the gripper starts at a random point and follows the scripted expert;
frame ``t`` stores the gripper position as the state and the next position as the action, so
LeRobot's ``delta_timestamps`` chunking yields exactly the expert's chunk. Training uses the frames
whose chunk is complete; evaluation uses the first frame of each episode (a random start, which
reveals nothing about the target).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import world

__all__ = ["SplitSizes", "SPLITS", "EVAL_SPLITS", "write_splits", "load_split", "IMAGE_KEY"]

IMAGE_KEY = "observation.images.top"
FPS = 10
EPISODE_FRAMES = world.CHUNK + 2
EVAL_SPLITS = ("eval_id", "eval_task", "eval_paraphrase", "eval_unseen", "eval_newscene")
SPLITS = ("pretrain", "posttrain", *EVAL_SPLITS)


@dataclass(frozen=True)
class SplitSizes:
    """How many layouts and episodes each split gets."""

    pretrain_layouts: int
    posttrain_layouts: int
    posttrain_episodes: int  # per (layout, instruction)
    second_instruction: float  # fraction of post-training layouts with a second named object
    eval_episodes: int  # per evaluation split


def _features() -> dict:
    xy = ["x", "y"]
    return {
        IMAGE_KEY: {"dtype": "image", "shape": (world.IMAGE_SIZE, world.IMAGE_SIZE, 3),
                    "names": ["height", "width", "channels"]},
        "observation.state": {"dtype": "float32", "shape": (2,), "names": xy},
        "action": {"dtype": "float32", "shape": (2,), "names": xy},
        # Scoring metadata (not a policy input): object centres and which one is named.
        "meta.centres": {"dtype": "float32", "shape": (6,), "names": [f"{c}{i}" for i in range(3) for c in xy]},
        "meta.target_index": {"dtype": "float32", "shape": (1,), "names": ["index"]},
    }


def _episodes(split: str, sizes: SplitSizes, rng: np.random.Generator, post_layouts: list) -> list[tuple]:
    """(layout, target index, instruction) per episode of ``split``."""
    out = []
    if split == "pretrain":
        for _ in range(sizes.pretrain_layouts):
            layout = world.random_layout(rng)
            t = int(rng.integers(3))
            out.append((layout, t, world.instruction(layout.objects[t])))
    elif split == "posttrain":
        for layout, named in post_layouts:
            for t in named:
                out += [(layout, t, world.instruction(layout.objects[t]))] * sizes.posttrain_episodes
    elif split in ("eval_id", "eval_task", "eval_paraphrase"):
        for i in range(sizes.eval_episodes):
            layout, named = post_layouts[i % len(post_layouts)]
            if split == "eval_task":
                t = int(rng.choice([j for j in range(3) if j not in named]))
            else:
                t = named[int(rng.integers(len(named)))]
            style = "paraphrase" if split == "eval_paraphrase" else "canonical"
            out.append((layout, t, world.instruction(layout.objects[t], rng, style)))
    else:
        held = sorted(world.HELD_OUT)
        for i in range(sizes.eval_episodes):
            if split == "eval_unseen":
                obj = held[i % len(held)]
                layout = world.random_layout(rng, must_hold=obj)
                t = layout.objects.index(obj)
            else:
                layout = world.random_layout(rng)
                t = int(rng.integers(3))
            out.append((layout, t, world.instruction(layout.objects[t])))
    return out


def post_layouts(sizes: SplitSizes, rng: np.random.Generator) -> list[tuple[world.Layout, list[int]]]:
    """The post-training layouts and the object indices named for each (one, sometimes two)."""
    result = []
    for _ in range(sizes.posttrain_layouts):
        layout = world.random_layout(rng)
        named = [int(i) for i in rng.permutation(3)[: 2 if rng.random() < sizes.second_instruction else 1]]
        result.append((layout, named))
    return result


def write_splits(root: Path, sizes: SplitSizes, seed: int = 0, splits: tuple[str, ...] = SPLITS) -> dict[str, Path]:
    """Write every split as a LeRobotDataset under ``root``; return ``{split: directory}``.

    The data depend only on ``sizes`` and ``seed``; a split already written with the same
    parameters is kept (``<split>/repro_split.json`` records them).
    """
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    root = Path(root)
    rng = np.random.default_rng(seed)
    layouts = post_layouts(sizes, rng)
    out = {}
    for split in splits:
        directory = root / split
        stamp = {"sizes": vars(sizes), "seed": seed, "split": split, "format": 1}
        marker = directory / "repro_split.json"
        out[split] = directory
        split_rng = np.random.default_rng([seed, SPLITS.index(split)])
        episodes = _episodes(split, sizes, split_rng, layouts)
        if marker.exists() and json.loads(marker.read_text()) == stamp:
            continue
        if directory.exists():
            shutil.rmtree(directory)
        ds = LeRobotDataset.create(repo_id=f"local/apt_repro_{split}", fps=FPS, features=_features(),
                                   root=directory, use_videos=False)
        for layout, t, text in episodes:
            offsets = world.object_offsets(split_rng, 3)
            centres = world.object_centres(layout, offsets).astype(np.float32)
            position = split_rng.uniform(-0.9, 0.9, 2).astype(np.float32)
            for _ in range(EPISODE_FRAMES):
                nxt = world.expert_chunk(position, centres[t])[0]
                ds.add_frame({
                    IMAGE_KEY: world.render(layout, offsets, split_rng),
                    "observation.state": position,
                    "action": nxt,
                    "meta.centres": centres.reshape(-1),
                    "meta.target_index": np.asarray([t], dtype=np.float32),
                    "task": text,
                })
                position = nxt
            ds.save_episode()
        ds.finalize()
        marker.write_text(json.dumps(stamp))
    return out


def load_split(directory: Path, first_frame_only: bool = False) -> dict:
    """Read a split back through ``LeRobotDataset`` (with action chunking) into tensors.

    Returns images ``(N, 3, 56, 56)`` float in [0, 1], state ``(N, 2)``, action ``(N, CHUNK, 2)``,
    centres ``(N, 3, 2)``, target ``(N,)`` and the instruction strings. Only frames whose chunk is
    complete are kept (or only the first frame of each episode). Cached next to the dataset.
    """
    import torch
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    directory = Path(directory)
    cache = directory / f"tensors_{'first' if first_frame_only else 'train'}.pt"
    if cache.exists():
        # Tensors, lists and strings only: no pickle of arbitrary objects, like every other load here.
        return torch.load(cache, weights_only=True)
    ds = LeRobotDataset(f"local/{directory.name}", root=directory,
                        delta_timestamps={"action": [i / FPS for i in range(world.CHUNK)]})
    frame_index = np.asarray(ds.hf_dataset["frame_index"])
    last = 0 if first_frame_only else EPISODE_FRAMES - world.CHUNK
    keep = np.nonzero(frame_index <= last)[0]
    items = [ds[int(i)] for i in keep]
    if any(bool(it["action_is_pad"].any()) for it in items):
        raise RuntimeError(f"{directory}: a kept frame has a padded action chunk (episode too short)")
    data = {
        "images": torch.stack([it[IMAGE_KEY] for it in items]),
        "state": torch.stack([it["observation.state"] for it in items]),
        "action": torch.stack([it["action"] for it in items]),
        "centres": torch.stack([it["meta.centres"] for it in items]).view(-1, 3, 2),
        "target": torch.stack([it["meta.target_index"] for it in items]).view(-1).long(),
        "task": [it["task"] for it in items],
    }
    torch.save(data, cache)
    return data
