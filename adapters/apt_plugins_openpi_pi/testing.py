"""Tiny, offline, *real* openpi ``PI0Pytorch`` instances for the conformance suite, tests and benchmarks.

openpi's PyTorch model hard-codes a full-size SigLIP (``projection_dim=2048``, 27 layers) even for
its ``dummy`` Gemma variant, so the construction-time lookups of ``gemma_pytorch`` (the two HF
model classes) and ``openpi.models.gemma.get_config`` are patched to shrink the real classes:
SigLIP to one narrow layer with 56-pixel patches (16 tokens per 224-pixel image), the vocabulary to
2048 ids (openpi's fake data draws token ids below 2048), the Gemma stacks to the given sizes
(openpi's own ``dummy`` sizes by default). Nothing is mocked and nothing is downloaded; the
patches matter only while a model is being constructed.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Any
from unittest import mock

import torch

from apt_plugins import AptConfig
from apt_plugins.testing import ConformanceKitBase

TINY_VOCAB = 2048
IMAGE_KEYS = ("base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb")
#: Token ids of the tiny prompts (the tiny vocabulary has no tokenizer; only the layout matters).
BOS, NEWLINE, TASK, COLON, COMMA, STATE_MARKER, SEMICOLON, ACTION = 2, 108, 50, 51, 52, 60, 62, 63
INSTRUCTIONS = ([101, 102, 103], [201, 202, 203], [301])  # the third is shorter: length must not leak


@contextlib.contextmanager
def tiny_openpi_patches(width: int | None = None, depth: int | None = None, mlp_dim: int | None = None,
                        head_dim: int | None = None, *, expert_width: int | None = None,
                        expert_mlp: int | None = None, vision_width: int = 32, vision_layers: int = 1,
                        vision_heads: int = 2, vision_mlp: int | None = None, patch_size: int = 56,
                        vocab: int = TINY_VOCAB):
    """Shrink openpi's ``PI0Pytorch`` at construction time (8 query heads: openpi hard-codes them).

    Gemma sizes left at None keep openpi's ``dummy`` variant values (width 64, depth 4, mlp 128,
    head_dim 16) for both stacks. ``expert_width``/``expert_mlp`` size the action expert apart only
    when the model config names it ``action_expert_variant="gemma_300m"`` (the patched ``get_config``
    tells the stacks apart by variant name); with ``"dummy"`` for both, both get the VLM sizes.
    """
    from openpi.models import gemma as openpi_gemma
    from openpi.models_pytorch import gemma_pytorch

    real_get_config = openpi_gemma.get_config
    real_vlm, real_expert = gemma_pytorch.PaliGemmaForConditionalGeneration, gemma_pytorch.GemmaForCausalLM

    def get_config(variant: str):
        base = real_get_config("dummy")
        expert = variant in ("gemma_300m", "gemma_300m_lora") or variant == "dummy_expert"
        w = (expert_width if expert and expert_width else width) or base.width
        m = (expert_mlp if expert and expert_mlp else mlp_dim) or base.mlp_dim
        return dataclasses.replace(base, width=w, mlp_dim=m, depth=depth or base.depth,
                                   head_dim=head_dim or base.head_dim)

    def vlm(config: Any, **kw: Any):
        vc = config.vision_config
        vc.hidden_size, vc.intermediate_size = vision_width, vision_mlp or 2 * vision_width
        vc.num_hidden_layers, vc.num_attention_heads, vc.patch_size = vision_layers, vision_heads, patch_size
        vc.projection_dim = config.text_config.hidden_size
        config.text_config.vocab_size = config._vocab_size = vocab
        config.image_token_index = vocab
        return real_vlm(config=config, **kw)

    def expert(config: Any, **kw: Any):
        config.vocab_size = vocab
        return real_expert(config=config, **kw)

    with mock.patch.object(openpi_gemma, "get_config", get_config), \
            mock.patch.object(gemma_pytorch, "PaliGemmaForConditionalGeneration", vlm), \
            mock.patch.object(gemma_pytorch, "GemmaForCausalLM", expert):
        yield


_PERMANENT: contextlib.ExitStack | None = None


def apply_tiny_patches(**sizes: Any) -> None:
    """Apply :func:`tiny_openpi_patches` for the rest of the process (test/benchmark subprocesses only)."""
    global _PERMANENT
    if _PERMANENT is None:
        _PERMANENT = contextlib.ExitStack()
        _PERMANENT.enter_context(tiny_openpi_patches(**sizes))


def tiny_model_config(pi05: bool, **overrides: Any) -> Any:
    """A ``Pi0Config`` for the tiny models (fp32, no torch.compile, short prompts and chunks)."""
    from openpi.models.pi0_config import Pi0Config

    fields = dict(pi05=pi05, paligemma_variant="dummy", action_expert_variant="dummy", action_dim=8,
                  action_horizon=4, max_token_len=16, dtype="float32", pytorch_compile_mode=None)
    return Pi0Config(**{**fields, **overrides})


def prompt_tokens(pi05: bool, instruction: int, state: torch.Tensor, max_len: int) -> tuple[list[int], list[bool]]:
    """One row of tiny prompt tokens in openpi's layouts, right-padded to ``max_len``.

    pi0: ``BOS <task> \\n``. pi0.5: ``BOS Task : <task> , State : <bins> ; \\n Action :`` with the
    state digitised into 256 bins over [-1, 1] as openpi's tokenizer does (one id per dimension).
    """
    words = INSTRUCTIONS[instruction % len(INSTRUCTIONS)]
    if pi05:
        bins = torch.bucketize(state.clamp(-1, 1), torch.linspace(-1, 1, 257)[1:-1]).tolist()
        tokens = [BOS, TASK, COLON, *words, COMMA, STATE_MARKER, COLON, *(1000 + b for b in bins[:3]),
                  SEMICOLON, NEWLINE, ACTION, COLON]
    else:
        tokens = [BOS, *words, NEWLINE]
    assert len(tokens) <= max_len, f"tiny prompt of {len(tokens)} tokens exceeds max_token_len={max_len}"
    return tokens + [0] * (max_len - len(tokens)), [True] * len(tokens) + [False] * (max_len - len(tokens))


def make_batch(model_config: Any, instruction: int = 0, seed: int = 0, batch_size: int = 2) -> dict[str, Any]:
    """An openpi batch dict (``Observation.to_dict()`` keys plus ``actions``) for the tiny models."""
    g = torch.Generator().manual_seed(seed)
    state = torch.rand(batch_size, model_config.action_dim, generator=g) * 2 - 1
    rows = [prompt_tokens(model_config.pi05, instruction, state[b], model_config.max_token_len)
            for b in range(batch_size)]
    return {
        "image": {k: torch.rand(batch_size, 3, 224, 224, generator=g) * 2 - 1 for k in IMAGE_KEYS},
        "image_mask": {k: torch.ones(batch_size, dtype=torch.bool) for k in IMAGE_KEYS},
        "state": state,
        "tokenized_prompt": torch.tensor([r[0] for r in rows], dtype=torch.int32),
        "tokenized_prompt_mask": torch.tensor([r[1] for r in rows], dtype=torch.bool),
        "actions": torch.rand(batch_size, model_config.action_horizon, model_config.action_dim, generator=g) * 2 - 1,
    }


def observation(batch: dict[str, Any]) -> Any:
    """openpi's own ``Observation`` from a batch dict (the trainer's data loader builds the same)."""
    from openpi.models.model import Observation

    return Observation.from_dict({k: v for k, v in batch.items() if k != "actions"})


class OpenpiConformanceKit(ConformanceKitBase):
    """Builds tiny real openpi pi0 (``openpi_pi0``) or pi0.5 (``openpi_pi05``) models and batches."""

    num_steps = 2

    def __init__(self, adapter_name: str):
        super().__init__(adapter_name)
        self.pi05 = adapter_name == "openpi_pi05"

    def model_config(self) -> Any:
        return tiny_model_config(self.pi05)

    def construct(self, model_config: Any, seed: int = 0) -> Any:
        """A stock tiny ``PI0Pytorch`` with weights drawn after ``torch.manual_seed(seed)``."""
        from openpi.models_pytorch.pi0_pytorch import PI0Pytorch

        from .modeling import set_state_marker

        torch.manual_seed(seed)
        with tiny_openpi_patches():
            model = PI0Pytorch(model_config)
        set_state_marker(model, STATE_MARKER)
        return model

    def build(self, apt: AptConfig | None, seed: int = 0, **overrides: Any) -> Any:
        from apt_plugins import prepare_stage

        model = self.construct(tiny_model_config(self.pi05, **overrides), seed)
        if apt is not None:
            prepare_stage(model, apt, adapter=self.adapter_name)
        return model.train()

    def save(self, policy: Any, path: Path) -> None:
        from .checkpoints import save_checkpoint

        save_checkpoint(policy, path)

    def load(self, path: Path, apt: AptConfig, **kwargs: Any) -> Any:
        from .checkpoints import load_checkpoint

        return load_checkpoint(path, apt, build=lambda cfg: self.construct(cfg), **kwargs)

    def make_batch(self, instruction: int = 0, seed: int = 0) -> dict[str, Any]:
        return make_batch(self.model_config(), instruction, seed, self.batch_size)

    def probes(self, batch: dict[str, Any]) -> dict[str, dict[str, Any]]:
        image = {**batch, "image": {**batch["image"], "base_0_rgb": -batch["image"]["base_0_rgb"]}}
        state = -batch["state"]
        moved = {**batch, "state": state}
        if self.pi05:  # the state lives in the prompt: re-tokenise it like openpi's tokenizer would
            cfg = self.model_config()
            instruction = next(i for i, w in enumerate(INSTRUCTIONS)
                               if batch["tokenized_prompt"][0, 3:3 + len(w)].tolist() == w)
            rows = [prompt_tokens(True, instruction, state[b], cfg.max_token_len) for b in range(state.shape[0])]
            moved["tokenized_prompt"] = torch.tensor([r[0] for r in rows], dtype=torch.int32)
        return {"image": image, "state": moved}

    def loss(self, policy: Any, batch: dict[str, Any], seed: int = 0) -> Any:
        torch.manual_seed(seed)
        return policy(observation(batch), batch["actions"]).mean()

    def actions(self, policy: Any, batch: dict[str, Any], seed: int = 0) -> Any:
        torch.manual_seed(seed)
        return policy.sample_actions(torch.device("cpu"), observation(batch), num_steps=self.num_steps)

    def set_gradient_checkpointing(self, policy: Any, enabled: bool) -> None:
        if enabled:
            policy.gradient_checkpointing_enable()
        else:
            policy.gradient_checkpointing_disable()


def use_realistic_fake_data(prompt_tokens: int = 8) -> None:
    """Make openpi's ``FakeDataset`` samples look like real ones (tests and benchmarks only).

    Two upstream quirks at the pinned commit make openpi's fake-data ``debug`` configs useless for
    the PyTorch trainer: images are float32 HWC, which ``Observation.from_dict`` leaves channels-last
    (only uint8 images are permuted to CHW), so SigLIP fails; and every bool field is drawn as zeros,
    so every image and prompt token is padding and the model sees neither. Here images become uint8
    HWC (the path real data takes), every camera is valid and the first ``prompt_tokens`` prompt
    tokens are valid. Token ids stay openpi's random draws.
    """
    import numpy as np

    from .train import _ensure_lerobot_data_module

    _ensure_lerobot_data_module()
    from openpi.training import data_loader

    if getattr(data_loader.FakeDataset, "_apt_realistic", False):
        return
    original = data_loader.FakeDataset.__getitem__

    def getitem(self: Any, index: Any) -> dict:
        item = original(self, index)
        item["image"] = {k: ((np.asarray(v) + 1.0) * 127.5).round().astype(np.uint8) for k, v in item["image"].items()}
        item["image_mask"] = {k: np.ones_like(np.asarray(v), dtype=bool) for k, v in item["image_mask"].items()}
        mask = np.zeros_like(np.asarray(item["tokenized_prompt_mask"]), dtype=bool)
        mask[..., :prompt_tokens] = True
        item["tokenized_prompt_mask"] = mask
        return item

    data_loader.FakeDataset.__getitem__ = getitem
    data_loader.FakeDataset._apt_realistic = True


TINY_PLUGIN_SOURCE = (
    '"""Throw-away module: tiny openpi models and realistic fake data in this process (tests/benchmarks only)."""\n'
    "from apt_plugins_openpi_pi.testing import apply_tiny_patches, use_realistic_fake_data\n\n"
    "apply_tiny_patches()\nuse_realistic_fake_data()\n"
)


def write_tiny_module(directory: Path, name: str = "apt_tiny_openpi") -> str:
    """Write the throw-away tiny-model module into ``directory`` (put it on PYTHONPATH); return its name."""
    Path(directory).mkdir(parents=True, exist_ok=True)
    (Path(directory) / f"{name}.py").write_text(TINY_PLUGIN_SOURCE)
    return name
