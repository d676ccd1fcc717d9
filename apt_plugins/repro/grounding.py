"""A "pretrained VLM" with language ability to keep or lose: grounding pretraining of PaliGemma.

The tiny PaliGemma inside LeRobot's ``PI0Policy`` is trained on random scenes (every colour/shape
combination, every phrasing) to answer *which cell holds the named object*: the LM head predicts
the cell's word ("0".."15") from the instruction tokens' final states. Half the batches hide the instruction
from the image tokens (the order APT's masks impose), half do not (PaliGemma's own prefix), so the
VLM serves both. The result is cached to disk and every arm starts from it.

The same question, asked with the frozen LM head, is the drift probe: grounding accuracy on fresh
scenes before and after an arm trained the VLM.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from . import world
from .data import IMAGE_KEY
from .models import VLM_PREFIX, ModelSize, Tokenizer, build_stock

__all__ = ["scene_batch", "grounding_logits", "pretrain_vlm", "grounding_accuracy"]


def scene_batch(rng: np.random.Generator, n: int, style: str = "any", n_objects: int = 3,
                with_contents: bool = False):
    """``n`` random scenes (all combinations allowed): images, instructions, target cells.

    ``with_contents`` also returns, per scene and cell, the colour in that cell (``None`` if empty).
    """
    images, texts, cells, contents = [], [], [], []
    for _ in range(n):
        layout = world.random_layout(rng, allow_held_out=True, n_objects=n_objects)
        offsets = world.object_offsets(rng, n_objects)
        t = int(rng.integers(n_objects))
        images.append(world.render(layout, offsets, rng))
        texts.append(world.instruction(layout.objects[t], rng, style))
        cells.append(layout.cells[t])
        grid: list[str | None] = [None] * (world.GRID * world.GRID)
        for cell, (colour, _) in zip(layout.cells, layout.objects, strict=True):
            grid[cell] = colour
        contents.append(grid)
    imgs = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255
    if with_contents:
        return imgs, texts, torch.tensor(cells), contents
    return imgs, texts, torch.tensor(cells)


def grounding_logits(policy: Any, images: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor,
                     cell_ids: torch.Tensor, image_blind: bool = False, with_image_tokens: bool = False):
    """The VLM's answer logits over the 16 cell words, read by its own LM head.

    Runs LeRobot's prefix embedding and PaliGemma language model directly (no action expert), so it
    works on stock and APT policies alike, LoRA included. ``with_image_tokens`` also returns the LM
    head's cell logits at every image token ``(B, 16 patches, 16 cells)``.
    """
    from lerobot.policies.common.vla_utils import make_att_2d_masks, prepare_attention_masks_4d

    model = policy.model
    imgs, img_masks = policy._preprocess_images({IMAGE_KEY: images})
    embs, pad, att = model.embed_prefix(imgs, img_masks, tokens, mask)
    att_2d = make_att_2d_masks(pad, att)
    n_img = embs.shape[1] - tokens.shape[1]
    if image_blind:
        att_2d = att_2d.clone()
        att_2d[:, :n_img, n_img:] = False
    positions = torch.cumsum(pad, dim=1) - 1
    (hidden, _), _ = model.paligemma_with_expert.forward(
        attention_mask=prepare_attention_masks_4d(att_2d), position_ids=positions, past_key_values=None,
        inputs_embeds=[embs, None], use_cache=False)
    # The answer is read from the mean of the instruction tokens' final states: with two layers, the
    # colour word can look the object up itself instead of first passing its meaning to the last token.
    text = hidden[:, n_img:]
    weights = mask.to(text.dtype)[..., None]
    h = (text * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)
    head = model.paligemma_with_expert.paligemma.lm_head
    if with_image_tokens:
        return head(h)[:, cell_ids], head(hidden[:, :n_img])
    return head(h)[:, cell_ids]


def _cell_ids(tokenizer: Tokenizer) -> torch.Tensor:
    return torch.tensor([tokenizer.token_id(w) for w in world.CELL_WORDS])


@torch.no_grad()
def grounding_accuracy(policy: Any, tokenizer: Tokenizer, n: int = 512, seed: int = 12345) -> dict[str, float]:
    """Grounding accuracy of the VLM's frozen LM head on fresh scenes (canonical / paraphrase)."""
    was_training = policy.training
    policy.eval()
    out = {}
    cell_ids = _cell_ids(tokenizer)
    for style in ("canonical", "paraphrase"):
        rng = np.random.default_rng([seed, len(style)])
        images, texts, cells = scene_batch(rng, n, style)
        tokens, mask = tokenizer(texts)
        correct = 0
        for i in range(0, n, 128):
            sl = slice(i, i + 128)
            logits = grounding_logits(policy, images[sl], tokens[sl], mask[sl], cell_ids)
            correct += int((logits.argmax(-1) == cells[sl]).sum())
        out[style] = correct / n
    policy.train(was_training)
    return out


def pretrain_vlm(cache: Path, tokenizer: Tokenizer, size: ModelSize, steps: int, batch_size: int = 32,
                 lr: float = 3e-3, seed: int = 0, log=print) -> dict[str, torch.Tensor]:
    """Train (or load from ``cache``) the grounding VLM; return its PaliGemma state dict."""
    from safetensors.torch import load_file, save_file

    cache = Path(cache)
    weights, info_path = cache / "vlm.safetensors", cache / "vlm.json"
    stamp = {"size": vars(size), "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "format": 3}
    if weights.exists() and info_path.exists() and json.loads(info_path.read_text()).get("stamp") == stamp:
        log(f"VLM: cached grounding pretraining ({cache})")
        return load_file(str(weights))
    start = time.time()
    policy = build_stock(size, seed, train_expert_only=False)
    vlm = policy.model.paligemma_with_expert.paligemma
    params = [p for p in vlm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + np.cos(np.pi * min(1.0, s / max(1, steps)))))
    cell_ids = _cell_ids(tokenizer)
    colour_ids = {None: tokenizer.token_id("the"), **{c: tokenizer.token_id(c) for c in world.COLOURS}}
    rng = np.random.default_rng([seed, 77])
    for step in range(steps):
        # Curriculum: scenes with one object teach where things are, two and then three objects which
        # one is named; without it the tiny model sits on a long plateau at chance.
        n_objects = 1 if step < steps * 0.2 else (2 if step < steps * 0.4 else 3)
        images, texts, cells, contents = scene_batch(rng, batch_size, n_objects=n_objects, with_contents=True)
        tokens, mask = tokenizer(texts)
        logits, patch_logits = grounding_logits(policy, images, tokens, mask, cell_ids, image_blind=bool(step % 2),
                                                with_image_tokens=True)
        # Auxiliary captions: every image token names its own cell and the colour it shows ("the" for
        # the bare table). Without a linear path from a patch to its position and colour, attending to
        # the right patch gains nothing at first, and the answer stays at chance for thousands of steps.
        patches = cell_ids.repeat(patch_logits.shape[0])
        colours = torch.tensor([colour_ids[c] for grid in contents for c in grid])
        flat = patch_logits.reshape(-1, patch_logits.shape[-1])
        loss = F.cross_entropy(logits, cells) + F.cross_entropy(flat, patches) + F.cross_entropy(flat, colours)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if (step + 1) % max(1, steps // 5) == 0:
            log(f"VLM grounding pretraining step {step + 1}/{steps}: loss {loss.item():.3f}")
    acc = grounding_accuracy(policy, tokenizer)
    state = {k: v.detach().clone().contiguous() for k, v in policy.state_dict().items() if k.startswith(VLM_PREFIX)}
    cache.mkdir(parents=True, exist_ok=True)
    save_file(state, str(weights))
    info_path.write_text(json.dumps({"stamp": stamp, "accuracy": acc, "seconds": round(time.time() - start, 1)}))
    log(f"VLM: grounding accuracy canonical {acc['canonical']:.3f}, paraphrase {acc['paraphrase']:.3f} "
        f"({time.time() - start:.0f} s)")
    return state
