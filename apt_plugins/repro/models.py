"""The repro's policies: LeRobot's own ``PI0Policy`` and the APT ``apt_pi0`` type, at CPU size.

Nothing is mocked: the real classes are built with the construction-time size patches of the pi
adapter's conformance kit (``tiny_pi_patches``), and instructions are tokenized by a word-level
tokenizer written as a local hub-cache fixture, the same one the tests and the demo use.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import world
from .data import IMAGE_KEY

__all__ = ["ModelSize", "Tokenizer", "build_stock", "build_apt", "load_apt", "to_batch", "VLM_PREFIX"]

TOKENS_KEY = "observation.language.tokens"
MASK_KEY = "observation.language.attention_mask"
TASK_MASK_KEY = "observation.language.task_mask"
#: every PaliGemma tensor of a pi0 policy (vision tower, projector, language model, LM head)
VLM_PREFIX = "model.paligemma_with_expert.paligemma."


@dataclass(frozen=True)
class ModelSize:
    """Widths of the tiny pi0 (LeRobot hard-codes 8 heads; depth and head width are shared)."""

    width: int = 64
    depth: int = 2
    mlp_dim: int = 128
    head_dim: int = 8
    vision_width: int = 32
    vision_layers: int = 1
    inference_steps: int = 5

    def patches(self):
        """The construction-time size patches (pi adapter conformance kit)."""
        from apt_plugins_lerobot_pi.testing import tiny_pi_patches

        return tiny_pi_patches(width=self.width, depth=self.depth, mlp_dim=self.mlp_dim, head_dim=self.head_dim,
                               vision_width=self.vision_width, vision_layers=self.vision_layers)


class Tokenizer:
    """The word-level tokenizer fixture (every task word, the digits the grounding answers use)."""

    max_length = 6

    def __init__(self, hub_cache: Path):
        from apt_plugins_lerobot_pi.testing import write_tokenizer_fixture
        from transformers import PreTrainedTokenizerFast

        snapshot = write_tokenizer_fixture(Path(hub_cache), words=world.vocabulary())
        self._tok = PreTrainedTokenizerFast.from_pretrained(str(snapshot))

    def __call__(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        enc = self._tok(texts, padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt")
        unknown = self._tok.unk_token_id
        if bool((enc["input_ids"] == unknown).any()):
            raise ValueError(f"a word of {texts!r} is not in the repro tokenizer")
        return enc["input_ids"], enc["attention_mask"].bool()

    def token_id(self, word: str) -> int:
        """The id of one vocabulary word."""
        return int(self._tok.convert_tokens_to_ids(word))


def _fields(size: ModelSize, **extra: Any) -> dict:
    from lerobot.configs.types import FeatureType, PolicyFeature

    res = world.IMAGE_SIZE
    return dict(
        device="cpu", chunk_size=world.CHUNK, n_action_steps=world.CHUNK, max_state_dim=2, max_action_dim=2,
        num_inference_steps=size.inference_steps, image_resolution=(res, res), tokenizer_max_length=Tokenizer.max_length,
        input_features={IMAGE_KEY: PolicyFeature(type=FeatureType.VISUAL, shape=(3, res, res)),
                        "observation.state": PolicyFeature(type=FeatureType.STATE, shape=(2,))},
        output_features={"action": PolicyFeature(type=FeatureType.ACTION, shape=(2,))},
        **extra,
    )


def build_stock(size: ModelSize, seed: int, train_expert_only: bool, **fields: Any):
    """LeRobot's ``PI0Policy`` (the stock way: ``train_expert_only`` freezes the VLM)."""
    from lerobot.policies.pi0.configuration_pi0 import PI0Config
    from lerobot.policies.pi0.modeling_pi0 import PI0Policy

    config = PI0Config(**_fields(size, train_expert_only=train_expert_only, **fields))
    torch.manual_seed(seed)
    with size.patches():
        return PI0Policy(config).train()


def apt_policy_config(size: ModelSize, apt: Any, **fields: Any):
    """The ``apt_pi0`` config (``APTPI0Config``) for ``apt`` (an :class:`~apt_plugins.AptConfig`)."""
    from apt_plugins_lerobot_pi.configuration_apt_pi0 import APTPI0Config

    return APTPI0Config(**_fields(size, **fields), apt=apt.to_settings())


def build_apt(size: ModelSize, seed: int, apt: Any, **fields: Any):
    """A fresh ``APTPI0Policy`` prepared for ``apt``."""
    from apt_plugins_lerobot_pi.modeling_apt_pi0 import APTPI0Policy

    torch.manual_seed(seed)
    with size.patches():
        return APTPI0Policy(apt_policy_config(size, apt, **fields)).train()


def load_apt(size: ModelSize, path: Path, apt: Any, **fields: Any):
    """Load an ``apt_pi0`` checkpoint strictly into a policy configured with ``apt`` (promotes 1 -> 2)."""
    from apt_plugins_lerobot_pi.modeling_apt_pi0 import APTPI0Policy

    with size.patches():
        return APTPI0Policy.from_pretrained(path, config=apt_policy_config(size, apt, **fields)).train()


def load_vlm(policy: Any, vlm_state: dict[str, torch.Tensor]) -> None:
    """Copy the pretrained VLM into ``policy`` (every PaliGemma tensor, strictly)."""
    own = {k: v for k, v in policy.state_dict().items() if k.startswith(VLM_PREFIX)}
    if own.keys() != vlm_state.keys():
        missing, extra = sorted(own.keys() - vlm_state.keys()), sorted(vlm_state.keys() - own.keys())
        raise RuntimeError(f"cached VLM does not match the policy: missing {missing[:3]}, unexpected {extra[:3]}")
    with torch.no_grad():
        for k, v in own.items():
            v.copy_(vlm_state[k])


def to_batch(data: dict, index: torch.Tensor, tokenizer: Tokenizer, texts: list[str] | None = None,
             with_action: bool = True) -> dict[str, torch.Tensor]:
    """A model-ready batch (the keys LeRobot's pi0 processor would produce) for rows ``index``."""
    tokens, mask = tokenizer(texts if texts is not None else [data["task"][int(i)] for i in index])
    batch = {IMAGE_KEY: data["images"][index], "observation.state": data["state"][index],
             TOKENS_KEY: tokens, MASK_KEY: mask, TASK_MASK_KEY: mask.clone()}
    if with_action:
        batch["action"] = data["action"][index]
    return batch
