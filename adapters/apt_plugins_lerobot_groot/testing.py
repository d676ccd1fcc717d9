"""Tiny, offline, *real* GR00T N1.7 instances for the conformance suite and the tests.

GR00T N1.7 builds its backbone from a Qwen3-VL config (a local directory works offline) and its
action head from a ``GR00TN17Config``; both are written small to a directory once per process, and
``GrootPolicy`` loads them unchanged through ``GR00TN17.from_pretrained``. Nothing is mocked or
patched, and nothing is downloaded. Batches are model-ready (what the groot processor emits), so the
Cosmos-Reason2 processor is only needed by the ``lerobot-train`` tests, which get a tiny copy from
:func:`write_cosmos_fixture`.
"""

from __future__ import annotations

import atexit
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from apt_plugins import AptConfig
from apt_plugins.testing import LeRobotConformanceKit

# Token ids of the tiny backbone and of the tiny Cosmos-Reason2 tokenizer (they must agree).
VOCAB = 512
IMAGE_TOKEN, VIDEO_TOKEN, VISION_START, VISION_END = 500, 501, 502, 503
IM_START, IM_END, NEWLINE, PAD = 504, 505, 506, 507
PATCH, MERGE, TEMPORAL = 8, 2, 2
GRID = (1, 4, 4)  # one 32x32 image: 16 patches, 4 image tokens after the 2x2 merge
IMAGE_KEY = "observation.images.top"

_DIRS: dict[str, Path] = {}


def write_tiny_backbone(directory: Path) -> Path:
    """A Qwen3-VL config directory (Cosmos-Reason2 layout, tiny sizes); no weights are needed."""
    from transformers import Qwen3VLConfig

    cfg = Qwen3VLConfig(
        image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN, vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END, tie_word_embeddings=True,
        text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, vocab_size=VOCAB,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [4, 2, 2],
                                          "mrope_interleaved": True}),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=PATCH,
                           spatial_merge_size=MERGE, temporal_patch_size=TEMPORAL, out_hidden_size=64,
                           num_position_embeddings=16, deepstack_visual_indexes=[0]),
    )
    Path(directory).mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(directory)
    return Path(directory)


def write_tiny_groot(directory: Path, backbone: Path | None = None, seed: int = 0) -> Path:
    """A tiny GR00T N1.7 base-model directory (``config.json`` + ``model.safetensors``).

    Pass it as ``GrootConfig.base_model_path`` (``--policy.base_model_path=``). The backbone config
    directory is written next to it unless ``backbone`` is given.
    """
    from lerobot.policies.groot.groot_n1_7 import GR00TN17, GR00TN17Config

    directory = Path(directory)
    backbone = Path(backbone) if backbone is not None else write_tiny_backbone(directory.parent / f"{directory.name}_qwen3vl")
    cfg = GR00TN17Config(
        model_name=str(backbone), backbone_model_type="qwen", backbone_embedding_dim=64, select_layer=2,
        load_bf16=False, max_state_dim=8, max_action_dim=8, action_horizon=4, hidden_size=32,
        input_embedding_dim=32, max_seq_len=64, max_num_embodiments=16, num_inference_timesteps=2,
        diffusion_model_cfg=dict(num_layers=4, num_attention_heads=2, attention_head_dim=16, output_dim=32,
                                 interleave_self_attention=True, norm_type="ada_norm", positional_embeddings=None,
                                 dropout=0.0, final_dropout=True),
        vl_self_attention_cfg=dict(num_layers=1, num_attention_heads=2, attention_head_dim=32),
    )
    torch.manual_seed(seed)
    GR00TN17(cfg, load_backbone_weights=False).save_pretrained(directory)
    return directory


def tiny_base_model() -> Path:
    """The process-wide tiny GR00T directory (written on first use, removed at exit)."""
    if "base" not in _DIRS:
        root = Path(tempfile.mkdtemp(prefix="apt_tiny_groot_"))
        atexit.register(shutil.rmtree, root, True)
        _DIRS["base"] = write_tiny_groot(root / "groot")
    return _DIRS["base"]


def tiny_features() -> tuple[dict, dict]:
    """Input/output features of the tiny policies: one 32x32 camera, 6-D state and action."""
    from lerobot.configs.types import FeatureType, PolicyFeature

    inputs = {
        IMAGE_KEY: PolicyFeature(type=FeatureType.VISUAL, shape=(3, 32, 32)),
        "observation.state": PolicyFeature(type=FeatureType.STATE, shape=(6,)),
    }
    return inputs, {"action": PolicyFeature(type=FeatureType.ACTION, shape=(6,))}


TINY_FIELDS = dict(device="cpu", chunk_size=4, n_action_steps=4, max_state_dim=8, max_action_dim=8, use_bf16=False)


def model_batch(batch_size: int = 2, instruction: list[list[int]] | torch.Tensor | None = None, seed: int = 0,
                length: int = 20, with_action: bool = True) -> dict[str, torch.Tensor]:
    """A model-ready GR00T batch, laid out as the groot processor lays it out.

    Per sample, left-padded to ``length``: ``<|im_start|> user \\n <|vision_start|> <image>*4
    <|vision_end|> instruction... <|im_end|> \\n`` (one image first, then the text, one chat message).
    ``instruction`` gives each sample's instruction token ids (any lengths, ids below 500).
    """
    g = torch.Generator().manual_seed(seed)
    if instruction is None:
        instruction = torch.randint(10, 400, (batch_size, 5), generator=torch.Generator().manual_seed(1000))
    ids = torch.full((batch_size, length), PAD, dtype=torch.long)
    mask = torch.zeros(batch_size, length, dtype=torch.long)
    n_img = GRID[1] * GRID[2] // (MERGE * MERGE)
    for b in range(batch_size):
        words = [int(t) for t in instruction[b]]
        seq = [IM_START, 11, NEWLINE, VISION_START, *([IMAGE_TOKEN] * n_img), VISION_END, *words, IM_END, NEWLINE]
        if len(seq) > length:
            raise ValueError(f"prompt of {len(seq)} tokens does not fit length={length}")
        ids[b, length - len(seq):] = torch.tensor(seq)
        mask[b, length - len(seq):] = 1
    patches = GRID[0] * GRID[1] * GRID[2]
    batch = {
        "input_ids": ids,
        "attention_mask": mask,
        "pixel_values": torch.randn(batch_size * patches, 3 * TEMPORAL * PATCH * PATCH, generator=g),
        "image_grid_thw": torch.tensor([list(GRID)] * batch_size),
        "state": torch.rand(batch_size, 1, 8, generator=g) * 2 - 1,
        "embodiment_id": torch.full((batch_size,), 10, dtype=torch.long),  # "new_embodiment"
    }
    if with_action:
        batch["action"] = torch.rand(batch_size, 4, 8, generator=g) * 2 - 1
        batch["action_mask"] = torch.ones(batch_size, 4, 8)
        batch["action_mask"][:, :, 6:] = 0  # the 6-D action is padded to max_action_dim=8
    return batch


def probe_batch(policy: Any, variant: str = "original", seed: int = 0, batch_size: int = 2,
                task_len: int = 8) -> dict[str, torch.Tensor]:
    """A model-ready batch for any GR00T N1.7 policy (real or tiny), sized from its model config.

    One small image per camera (a 2x2 grid of merged patches), then ``task_len`` instruction tokens.
    ``variant`` changes only the instruction: ``original``, ``swapped`` (other ids), ``empty`` (none)
    or ``shuffled`` (permuted). Token ids of the scaffolding and instruction stay below 400.
    """
    if variant not in ("original", "swapped", "empty", "shuffled"):
        raise ValueError(f"unknown probe variant {variant!r}")
    model = policy._groot_model
    qwen = model.backbone.model.config
    vision = qwen.vision_config
    merge = vision.spatial_merge_size
    grid = (1, 2 * merge, 2 * merge)
    cameras = max(1, len(policy.config.image_features))
    words = torch.Generator().manual_seed(1001 if variant == "swapped" else 1000)
    task = torch.randint(10, 400, (batch_size, task_len), generator=words)
    if variant == "shuffled":
        task = task[:, torch.randperm(task_len, generator=torch.Generator().manual_seed(seed))]
    if variant == "empty":
        task = task[:, :0]
    g = torch.Generator().manual_seed(seed)
    image = [qwen.vision_start_token_id, *([qwen.image_token_id] * 4), qwen.vision_end_token_id]
    length = 3 + cameras * len(image) + task_len + 2
    ids = torch.full((batch_size, length), 0, dtype=torch.long)
    mask = torch.zeros(batch_size, length, dtype=torch.long)
    for b in range(batch_size):
        seq = [1, 2, 3, *(image * cameras), *task[b].tolist(), 4, 5]
        ids[b, length - len(seq):] = torch.tensor(seq)
        mask[b, length - len(seq):] = 1
    patch = getattr(vision, "in_channels", 3) * vision.temporal_patch_size * vision.patch_size ** 2
    cfg = model.config
    batch = {
        "input_ids": ids,
        "attention_mask": mask,
        "pixel_values": torch.randn(batch_size * cameras * grid[0] * grid[1] * grid[2], patch, generator=g),
        "image_grid_thw": torch.tensor([list(grid)] * (batch_size * cameras)),
        "state": torch.rand(batch_size, cfg.state_history_length, cfg.max_state_dim, generator=g) * 2 - 1,
        "action": torch.rand(batch_size, cfg.action_horizon, cfg.max_action_dim, generator=g) * 2 - 1,
        "action_mask": torch.ones(batch_size, cfg.action_horizon, cfg.max_action_dim),
        "embodiment_id": torch.zeros(batch_size, dtype=torch.long),
    }
    return batch


class GrootConformanceKit(LeRobotConformanceKit):
    """Builds tiny real ``GrootPolicy``/``APTGrootPolicy`` instances and model-ready batches.

    Everything but the batches, the probes, gradient checkpointing and the adapter's error cases
    comes from :class:`~apt_plugins.testing.LeRobotConformanceKit`.
    """

    prompt_len = 20
    non_observation_keys = ("action", "action_mask")
    stock_config = "lerobot.policies.groot.configuration_groot:GrootConfig"
    stock_policy = "lerobot.policies.groot.modeling_groot:GrootPolicy"
    apt_config = "apt_plugins_lerobot_groot.configuration_apt_groot:APTGrootConfig"
    apt_policy = "apt_plugins_lerobot_groot.modeling_apt_groot:APTGrootPolicy"
    tiny_fields = TINY_FIELDS

    def __init__(self, adapter_name: str = "lerobot_groot"):
        super().__init__(adapter_name)

    def features(self) -> tuple[dict, dict]:
        return tiny_features()

    def policy_config(self, apt: AptConfig | None, **overrides: Any):
        """The tiny host config, its backbone the process-wide tiny GR00T directory."""
        return super().policy_config(apt, **{"base_model_path": str(tiny_base_model()), **overrides})

    # ------------------------------------------------------------------ batches
    def make_batch(self, instruction: int = 0, seed: int = 0) -> dict[str, torch.Tensor]:
        """A training batch; ``instruction`` changes only the instruction tokens, their ids *and* count
        (4-6 tokens), so the left padding and every later position move too."""
        n = 6 - instruction % 3
        words = torch.randint(10, 400, (self.batch_size, n), generator=torch.Generator().manual_seed(1000 + instruction))
        return model_batch(self.batch_size, words, seed=seed, length=self.prompt_len)

    def probes(self, batch: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
        """Non-language changes a Stage-1 policy must still react to (it is not a constant)."""
        image = dict(batch, pixel_values=-batch["pixel_values"])
        state = dict(batch, state=-batch["state"])
        return {"image": image, "state": state}

    def cli_workspace(self, root: Path) -> Any:
        """The Cosmos-Reason2 processor fixture and a tiny base model under ``root``, for lerobot-train & co.

        See :class:`apt_plugins.testing.cli.CliWorkspace`. No plugin: the saved config names the base model.
        """
        from apt_plugins.testing.cli import CliWorkspace

        write_cosmos_fixture(Path(root) / "hub")
        base = write_tiny_groot(Path(root) / "base" / "groot")
        args = ["--policy.device=cpu", "--policy.push_to_hub=false", "--policy.chunk_size=4",
                "--policy.n_action_steps=4", "--policy.max_state_dim=8", "--policy.max_action_dim=8",
                "--policy.use_bf16=false", f"--policy.base_model_path={base}"]
        return CliWorkspace(env={"HF_HUB_CACHE": str(Path(root) / "hub")}, policy_args=args)

    def set_gradient_checkpointing(self, policy: Any, enabled: bool) -> None:
        # LeRobot's DiT has the flag but never reads it; the APT DiT loop checkpoints per block.
        policy._groot_model.action_head.model.gradient_checkpointing = enabled

    def error_cases(self) -> list[dict[str, Any]]:
        """Adapter-specific documented errors (run by the documented-errors check)."""
        from apt_plugins import AptConfigError, LanguageMaskError

        def no_image():
            policy = self.build(AptConfig(stage=1))
            batch = self.make_batch()
            batch["input_ids"] = torch.where(batch["input_ids"] == IMAGE_TOKEN, 7, batch["input_ids"])
            policy._groot_model._apt_context({k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values",
                                                                   "image_grid_thw")})

        return [
            {"error": AptConfigError, "match": r"fusion_source_layers.*one VL feature tensor",
             "trigger": lambda: self.build(AptConfig(stage=2, fusion_source_layers=(0, 0, 0, 0)))},
            {"error": LanguageMaskError, "match": r"no image token", "trigger": no_image},
        ]


# ---------------------------------------------------------------------- Cosmos-Reason2 fixture
COSMOS_REPO = "nvidia/Cosmos-Reason2-2B"
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_SPECIAL = {"<|image_pad|>": IMAGE_TOKEN, "<|video_pad|>": VIDEO_TOKEN, "<|vision_start|>": VISION_START,
            "<|vision_end|>": VISION_END, "<|im_start|>": IM_START, "<|im_end|>": IM_END, "<|endoftext|>": PAD}


def write_cosmos_fixture(hub_cache: Path, repo_id: str = COSMOS_REPO, words: list[str] | None = None) -> Path:
    """Install a tiny Cosmos-Reason2 processor under ``repo_id`` in a scratch hub cache.

    LeRobot's groot processor loads the tokenizer, the Qwen2-VL image processor and the Qwen3-VL
    video processor of ``nvidia/Cosmos-Reason2-2B`` by name; with ``HF_HUB_CACHE=<hub_cache>
    HF_HUB_OFFLINE=1`` it gets these instead, so the real processor code runs offline. The token
    ids of the special tokens are those of the tiny backbone (:func:`write_tiny_backbone`), and the
    image processor resizes every frame to 32x32 (4 image tokens).
    """
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2VLImageProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    default_words = ("user assistant system pick place push open close the a red green blue yellow cube bowl "
                     "plate block drawer cup left right up down into on of and to lift move grasp put stack").split()
    plain = ["<unk>", *dict.fromkeys(default_words + list(words or []))]
    if len(plain) > IMAGE_TOKEN:
        raise ValueError(f"at most {IMAGE_TOKEN} words fit below the special-token ids")
    vocab = {w: i for i, w in enumerate(plain)}
    vocab.update(_SPECIAL)
    taken = set(vocab.values())
    vocab.update({f"<|unused{i}|>": i for i in range(VOCAB) if i not in taken})  # no holes in the id range
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in _SPECIAL])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|endoftext|>", eos_token="<|im_end|>",
                                   unk_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE
    org, name = repo_id.split("/")
    root = Path(hub_cache) / f"models--{org}--{name}"
    commit = "0" * 40
    snapshot = root / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(snapshot)
    pixels = 32 * 32
    size = {"shortest_edge": pixels, "longest_edge": pixels}
    Qwen2VLImageProcessor(size=size, patch_size=PATCH, temporal_patch_size=TEMPORAL, merge_size=MERGE).save_pretrained(snapshot)
    Qwen3VLVideoProcessor(size=size, patch_size=PATCH, temporal_patch_size=TEMPORAL, merge_size=MERGE).save_pretrained(snapshot)
    write_tiny_backbone(snapshot)  # config.json: AutoTokenizer resolves a model config first
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / "main").write_text(commit)
    return snapshot
