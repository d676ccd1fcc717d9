"""The repro task: coloured objects on a table, instructions that name one, a scripted expert.

A 56x56 image holds a 4x4 grid of 14-pixel cells; three objects (distinct colours, a block or a
ring) sit in three distinct cells at a random offset inside their cell. The gripper starts at a
random point. The instruction ``"<verb> the <colour> <noun>"`` names one object; the expert moves
the gripper towards it with a geometric controller, so the action chunk (the next four gripper
positions) depends on *which object is named*. A vision-only policy can only guess, unless a
layout was always paired with one instruction (the shortcut the post-training set contains).

Everything here is numpy and deterministic given a ``numpy.random.Generator``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "IMAGE_SIZE", "GRID", "CHUNK", "GAIN", "COLOURS", "SHAPES", "HELD_OUT", "VERBS", "Layout",
    "instruction", "random_layout", "render", "expert_chunk", "target_from_chunk", "nearest_object",
    "vocabulary", "CELL_WORDS",
]

IMAGE_SIZE = 56
GRID = 4
CELL = IMAGE_SIZE // GRID
OBJECT = 6
CHUNK = 4
#: Fraction of the remaining distance the expert covers per step (geometric approach: Markov, so a
#: chunk is a function of the current position and the target alone).
GAIN = 0.25

#: colour -> (RGB, canonical word, synonyms used only in VLM pretraining and the paraphrase split)
COLOURS: dict[str, tuple[tuple[int, int, int], list[str]]] = {
    "red": ((220, 40, 40), ["red", "crimson", "scarlet"]),
    "green": ((40, 190, 60), ["green", "lime", "emerald"]),
    "blue": ((40, 70, 230), ["blue", "navy", "azure"]),
    "yellow": ((230, 210, 40), ["yellow", "golden", "lemon"]),
    "purple": ((150, 50, 200), ["purple", "violet", "lilac"]),
    "orange": ((245, 140, 20), ["orange", "amber", "tangerine"]),
}
SHAPES: dict[str, list[str]] = {"block": ["block", "cube", "brick"], "ring": ["ring", "hoop", "loop"]}
VERBS = ["pick", "grab", "take", "fetch", "lift", "get"]
#: (colour, shape) objects that never appear in robot data (pretraining or post-training); the VLM
#: saw them in its grounding pretraining. The "unseen combination" split names them.
HELD_OUT: frozenset[tuple[str, str]] = frozenset({("blue", "ring"), ("yellow", "block"), ("purple", "ring")})
#: the grounding answer tokens: the cell index as a word ("0".."15"; the tokenizer has them)
CELL_WORDS = [str(i) for i in range(GRID * GRID)]


@dataclass(frozen=True)
class Layout:
    """Which object sits in which cell: ``objects[i] = (colour, shape)`` in ``cells[i]``."""

    cells: tuple[int, ...]
    objects: tuple[tuple[str, str], ...]


def vocabulary() -> list[str]:
    """Every word an instruction can contain (for the tokenizer)."""
    words = ["the", *VERBS]
    for _, syns in COLOURS.values():
        words += syns
    for syns in SHAPES.values():
        words += syns
    return words


def instruction(obj: tuple[str, str], rng: np.random.Generator | None = None, style: str = "canonical") -> str:
    """The instruction naming ``obj``.

    ``canonical``: ``"pick the <colour> <shape>"`` (the only phrasing in robot data);
    ``paraphrase``: another verb, colour synonym and noun (seen only in VLM pretraining);
    ``any``: every word drawn from all choices (VLM pretraining).
    """
    colour, shape = obj
    if style == "canonical":
        return f"pick the {COLOURS[colour][1][0]} {SHAPES[shape][0]}"
    if rng is None:
        raise ValueError("a random generator is needed for non-canonical instructions")
    start = 1 if style == "paraphrase" else 0
    verb = VERBS[rng.integers(start, len(VERBS))]
    word = COLOURS[colour][1][rng.integers(start, 3)]
    noun = SHAPES[shape][rng.integers(start, 3)]
    return f"{verb} the {word} {noun}"


def random_layout(rng: np.random.Generator, allow_held_out: bool = False, must_hold: tuple[str, str] | None = None,
                  n_objects: int = 3) -> Layout:
    """Three objects with distinct colours in distinct cells.

    :param allow_held_out: whether the held-out (colour, shape) combinations may appear.
    :param must_hold: put this object in the layout (its colour is then not used by the others).
    """
    cells = tuple(int(c) for c in rng.choice(GRID * GRID, size=n_objects, replace=False))
    names = list(COLOURS)
    objects: list[tuple[str, str]] = []
    if must_hold is not None:
        objects.append(must_hold)
        names.remove(must_hold[0])
    while len(objects) < n_objects:
        colour = names.pop(int(rng.integers(len(names))))
        shapes = [s for s in SHAPES if allow_held_out or (colour, s) not in HELD_OUT]
        objects.append((colour, shapes[int(rng.integers(len(shapes)))]))
    order = rng.permutation(n_objects)
    return Layout(cells, tuple(objects[i] for i in order))


def object_offsets(rng: np.random.Generator, n: int) -> np.ndarray:
    """Pixel offsets of each object inside its cell (re-drawn per episode)."""
    return rng.integers(1, CELL - OBJECT, size=(n, 2))


def object_centres(layout: Layout, offsets: np.ndarray) -> np.ndarray:
    """Object centres in [-1, 1] image coordinates ``(x, y)``, shape ``(n, 2)``."""
    cells = np.asarray(layout.cells)
    px = (cells % GRID) * CELL + offsets[:, 0] + OBJECT / 2
    py = (cells // GRID) * CELL + offsets[:, 1] + OBJECT / 2
    return np.stack([px, py], axis=1) / IMAGE_SIZE * 2 - 1


def render(layout: Layout, offsets: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The camera image (uint8, ``(56, 56, 3)``): a noisy table with jittered object colours."""
    img = np.full((IMAGE_SIZE, IMAGE_SIZE, 3), 110, dtype=np.float32) + rng.normal(0, 6, (IMAGE_SIZE, IMAGE_SIZE, 3))
    for cell, (colour, shape), (ox, oy) in zip(layout.cells, layout.objects, offsets, strict=True):
        x0, y0 = (cell % GRID) * CELL + ox, (cell // GRID) * CELL + oy
        rgb = np.asarray(COLOURS[colour][0], dtype=np.float32) + rng.normal(0, 12, 3)
        patch = img[y0:y0 + OBJECT, x0:x0 + OBJECT]
        patch[:] = rgb
        if shape == "ring":  # a hollow square: the inside shows the table again
            patch[2:-2, 2:-2] = 110
    return np.clip(img, 0, 255).astype(np.uint8)


def expert_chunk(position: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The next ``CHUNK`` gripper positions from ``position`` towards ``target`` (``(CHUNK, 2)``)."""
    k = np.arange(1, CHUNK + 1, dtype=np.float32)[:, None]
    return (position + (1 - (1 - GAIN) ** k) * (target - position)).astype(np.float32)


def target_from_chunk(position: np.ndarray, chunk: np.ndarray) -> np.ndarray:
    """Invert the expert: the target a chunk is heading for (from its last waypoint)."""
    reach = 1 - (1 - GAIN) ** CHUNK
    return position + (chunk[..., -1, :] - position) / reach


def nearest_object(point: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """Index of the object nearest to each point: ``point (B, 2)``, ``centres (B, n, 2)``."""
    return np.linalg.norm(centres - point[:, None, :], axis=-1).argmin(axis=1)
