"""Tiny, offline, *real* SmolVLA instances for the conformance suite and the tests.

SmolVLA builds its VLM from ``config.vlm_model_name`` with ``AutoConfig``/``AutoProcessor`` (and,
with ``load_vlm_weights=False``, no weights), so a local directory holding a tiny ``SmolVLMConfig``
and a tiny word-level ``SmolVLMProcessor`` is enough: nothing is patched, mocked or downloaded.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from apt_plugins import AptConfig
from apt_plugins.testing import LeRobotConformanceKit

IMAGE_KEY = "observation.images.top"
TOKENS_KEY = "observation.language.tokens"
MASK_KEY = "observation.language.attention_mask"
TINY_VOCAB = 512
#: tiny text model: 4 layers (alternating self/cross attention in the expert), 4 query and 2 KV heads
TEXT_CONFIG = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=TINY_VOCAB)
VISION_CONFIG = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                     patch_size=8, image_size=32)
_SPECIAL = {"fake_image_token": "<fake_token_around_image>", "image_token": "<image>",
            "global_image_token": "<global-img>", "end_of_utterance_token": "<end_of_utterance>",
            "video_token": "<video>"}
DEFAULT_WORDS = ("pick place push open close the a red green blue yellow cube bowl plate block drawer cup "
                 "left right up down into on of and to lift move grasp put stack").split()


def write_tiny_backbone(directory: Path, words: list[str] | None = None, vision: dict[str, Any] | None = None,
                        scale_factor: int = 2, **text_overrides: Any) -> Path:
    """Write a tiny SmolVLM backbone directory (``config.json`` + processor + tokenizer) for ``vlm_model_name``.

    The vocabulary holds the special tokens, ``DEFAULT_WORDS``, ``words`` and fillers up to
    ``TINY_VOCAB`` ids. ``text_overrides`` and ``vision`` change the text and vision models and
    ``scale_factor`` the connector's pixel shuffle (the benchmarks use larger sizes); each image
    becomes ``(image_size / patch_size)**2 / scale_factor**2`` tokens.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, SmolVLMConfig
    from transformers.models.smolvlm import SmolVLMImageProcessor, SmolVLMProcessor, SmolVLMVideoProcessor

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    base = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>", "\n", *_SPECIAL.values()]
    vocab_words = list(dict.fromkeys(base + DEFAULT_WORDS + list(words or [])))
    text = {**TEXT_CONFIG, **text_overrides}
    if len(vocab_words) > text["vocab_size"]:
        raise ValueError(f"{len(vocab_words)} words do not fit vocab_size={text['vocab_size']}")
    vocab_words += [f"<unused{i}>" for i in range(text["vocab_size"] - len(vocab_words))]
    vocab = {w: i for i, w in enumerate(vocab_words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                   bos_token="<|im_start|>", eos_token="<|im_end|>", extra_special_tokens=_SPECIAL)
    config = SmolVLMConfig(text_config=text, vision_config={**VISION_CONFIG, **(vision or {})}, scale_factor=scale_factor,
                           image_token_id=vocab["<image>"])
    config.save_pretrained(directory)
    image = SmolVLMImageProcessor(size={"longest_edge": 32}, max_image_size={"longest_edge": 32},
                                  do_image_splitting=False)
    SmolVLMProcessor(image_processor=image, tokenizer=fast, video_processor=SmolVLMVideoProcessor(),
                     image_seq_len=4).save_pretrained(directory)
    return directory


_DIRS: dict[str, Path] = {}


def tiny_backbone() -> Path:
    """The process-wide tiny backbone directory (written on first use, removed at exit)."""
    if "base" not in _DIRS:
        root = Path(tempfile.mkdtemp(prefix="apt_tiny_smolvla_"))
        atexit.register(shutil.rmtree, root, True)
        _DIRS["base"] = write_tiny_backbone(root / "smolvlm")
    return _DIRS["base"]


def tiny_features() -> tuple[dict, dict]:
    """Input/output features of the tiny policies: one 32x32 camera, 6-D state and action."""
    from lerobot.configs.types import FeatureType, PolicyFeature

    inputs = {
        IMAGE_KEY: PolicyFeature(type=FeatureType.VISUAL, shape=(3, 32, 32)),
        "observation.state": PolicyFeature(type=FeatureType.STATE, shape=(6,)),
    }
    return inputs, {"action": PolicyFeature(type=FeatureType.ACTION, shape=(6,))}


#: 4 VLM layers, so the expert alternates self-attention (layers 0, 2) and cross-attention (1, 3).
TINY_FIELDS = dict(device="cpu", load_vlm_weights=False, num_vlm_layers=4, resize_imgs_with_padding=(32, 32),
                   chunk_size=4, n_action_steps=4, max_state_dim=8, max_action_dim=8, num_steps=2)


class SmolVLAConformanceKit(LeRobotConformanceKit):
    """Builds tiny real ``SmolVLAPolicy``/``APTSmolVLAPolicy`` instances and batches.

    Everything but the batches, the probes, gradient checkpointing and the adapter's error cases
    comes from :class:`~apt_plugins.testing.LeRobotConformanceKit`.
    """

    prompt_len = 8
    stock_config = "lerobot.policies.smolvla.configuration_smolvla:SmolVLAConfig"
    stock_policy = "lerobot.policies.smolvla.modeling_smolvla:SmolVLAPolicy"
    apt_config = "apt_plugins_lerobot_smolvla.configuration_apt_smolvla:APTSmolVLAConfig"
    apt_policy = "apt_plugins_lerobot_smolvla.modeling_apt_smolvla:APTSmolVLAPolicy"
    tiny_fields = TINY_FIELDS

    def __init__(self, adapter_name: str = "lerobot_smolvla"):
        super().__init__(adapter_name)

    def features(self) -> tuple[dict, dict]:
        return tiny_features()

    def policy_config(self, apt: AptConfig | None, **overrides: Any):
        """The tiny host config, its VLM the process-wide tiny backbone directory."""
        return super().policy_config(apt, **{"vlm_model_name": str(tiny_backbone()), **overrides})

    # ------------------------------------------------------------------ batches
    def make_batch(self, instruction: int = 0, seed: int = 0) -> dict[str, torch.Tensor]:
        """A training batch; ``instruction`` changes only the prompt tokens, their ids *and* count
        (4-6 tokens, right-padded as LeRobot's tokenizer step pads), so the state token moves too."""
        g = torch.Generator().manual_seed(seed)
        b, length = self.batch_size, self.prompt_len
        n = 6 - instruction % 3
        task = torch.randint(10, TINY_VOCAB, (b, n), generator=torch.Generator().manual_seed(1000 + instruction))
        tokens = torch.cat([task, torch.zeros(b, length - n, dtype=torch.long)], dim=1)
        mask = torch.zeros(b, length, dtype=torch.bool)
        mask[:, :n] = True
        return {
            IMAGE_KEY: torch.rand(b, 3, 32, 32, generator=g),
            "observation.state": torch.rand(b, 6, generator=g) * 2 - 1,
            "action": torch.rand(b, 4, 6, generator=g) * 2 - 1,
            TOKENS_KEY: tokens,
            MASK_KEY: mask,
        }

    def probes(self, batch: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
        """Non-language changes a Stage-1 policy must still react to (it is not a constant)."""
        return {"image": dict(batch, **{IMAGE_KEY: 1.0 - batch[IMAGE_KEY]}),
                "state": dict(batch, **{"observation.state": -batch["observation.state"]})}

    def set_gradient_checkpointing(self, policy: Any, enabled: bool) -> None:
        # SmolVLA has no gradient-checkpointing switch; the APT model checkpoints per layer itself.
        policy.model.apt_gradient_checkpointing = enabled

    def error_cases(self) -> list[dict[str, Any]]:
        """Adapter-specific documented errors (run by the documented-errors check)."""
        from apt_plugins import AptConfigError, LanguageMaskError

        def stock_cache():
            policy = self.build(AptConfig(stage=1))
            policy.model.denoise_step(torch.ones(2, 5, dtype=torch.bool), None, torch.zeros(2, 4, 8), torch.ones(2))

        return [
            {"error": AptConfigError, "match": r"fusion_source_layers.*one VLM layer index",
             "trigger": lambda: self.build(AptConfig(stage=2, fusion_source_layers=(0, 1)))},
            {"error": AptConfigError, "match": r"compile_model.*bypass",
             "trigger": lambda: self.build(AptConfig(stage=1), compile_model=True)},
            {"error": LanguageMaskError, "match": r"needs the PrefixContext", "trigger": stock_cache},
            {"error": AptConfigError, "match": r"apt\.attention='sdpa'.*eager attention",
             "trigger": lambda: self.build(AptConfig(stage=1, attention="sdpa"))},
            {"error": AptConfigError, "match": r"apt\.prefix_cache=.*no prefix cache",
             "trigger": lambda: self.build(AptConfig(stage=1, prefix_cache="memory:1GB"))},
        ]

    def cli_workspace(self, root: Path) -> Any:
        """A tiny SmolVLM backbone under ``root`` for lerobot-train & co. (see
        :class:`apt_plugins.testing.cli.CliWorkspace`). No plugin: the saved config names the backbone."""
        from apt_plugins.testing.cli import CliWorkspace

        backbone = write_tiny_backbone(Path(root) / "smolvlm")
        args = ["--policy.device=cpu", "--policy.push_to_hub=false", "--policy.chunk_size=4",
                "--policy.n_action_steps=4", "--policy.max_state_dim=8", "--policy.max_action_dim=8",
                "--policy.load_vlm_weights=false", "--policy.num_vlm_layers=4",
                "--policy.resize_imgs_with_padding=[32,32]", "--policy.num_steps=2",
                f"--policy.vlm_model_name={backbone}"]
        return CliWorkspace(env={}, policy_args=args)


def probe_batch(policy: Any, variant: str = "original", seed: int = 0, batch_size: int = 2, prompt_len: int = 16,
                task_len: int = 8) -> dict[str, torch.Tensor]:
    """A model-ready batch for any SmolVLA policy (real or tiny): images, state, action, prompt.

    The prompt is ``[task tokens, 1 scaffolding token (SmolVLA's trailing newline), padding]``.
    ``variant`` changes only the task tokens: ``original``, ``swapped`` (other ids), ``empty``
    (none) or ``shuffled`` (permuted). Token ids stay below 400 (and the backbone's vocabulary).
    """
    if variant not in ("original", "swapped", "empty", "shuffled"):
        raise ValueError(f"unknown probe variant {variant!r}")
    config = policy.config
    top = min(400, policy.model.vlm_with_expert.config.text_config.vocab_size)
    g = torch.Generator().manual_seed(seed)
    batch: dict[str, torch.Tensor] = {}
    for key, feature in config.image_features.items():
        batch[key] = torch.rand(batch_size, *feature.shape, generator=g)
    state_dim = config.robot_state_feature.shape[0] if config.robot_state_feature else config.max_state_dim
    batch["observation.state"] = torch.rand(batch_size, state_dim, generator=g) * 2 - 1
    batch["action"] = torch.rand(batch_size, config.chunk_size, config.action_feature.shape[0], generator=g) * 2 - 1
    words = torch.Generator().manual_seed(1001 if variant == "swapped" else 1000)
    task = torch.randint(10, top, (batch_size, task_len), generator=words)
    if variant == "shuffled":
        task = task[:, torch.randperm(task_len, generator=torch.Generator().manual_seed(seed))]
    if variant == "empty":
        task = task[:, :0]
    scaffold = torch.randint(10, top, (batch_size, 1), generator=g)
    used = task.shape[1] + 1
    batch[TOKENS_KEY] = torch.cat([task, scaffold, torch.zeros(batch_size, prompt_len - used, dtype=torch.long)], 1)
    batch[MASK_KEY] = torch.zeros(batch_size, prompt_len, dtype=torch.bool)
    batch[MASK_KEY][:, :used] = True
    return batch
