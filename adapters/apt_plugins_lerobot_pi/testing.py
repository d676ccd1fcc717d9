"""Tiny, offline, *real* pi0/pi0.5 instances for the conformance suite and the tests.

LeRobot has no tiny Gemma variant, so the construction-time lookups of ``modeling_pi0`` and
``modeling_pi05`` are patched to shrink the real classes (``PI0Policy``, ``PaliGemma...``,
``PiGemma...``); nothing is mocked, and nothing is downloaded. The patches matter only while a
policy is being constructed.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any
from unittest import mock

import torch

from apt_plugins.testing import LeRobotConformanceKit

TINY_VOCAB = 1024
IMAGE_KEY = "observation.images.top"
TOKENS_KEY = "observation.language.tokens"
MASK_KEY = "observation.language.attention_mask"
TASK_MASK_KEY = "observation.language.task_mask"


@contextlib.contextmanager
def tiny_pi_patches(width: int = 64, depth: int = 2, mlp_dim: int = 128, head_dim: int = 8,
                    vision_width: int = 32, vision_layers: int = 1, *, expert_width: int | None = None,
                    expert_mlp: int | None = None, vision_mlp: int | None = None, vision_heads: int = 2,
                    vocab: int = TINY_VOCAB):
    """Shrink LeRobot's pi0/pi0.5 at construction time (8 heads: LeRobot hard-codes them).

    ``width``/``mlp_dim`` size the VLM (LeRobot's ``gemma_2b`` variant); ``expert_width``/``expert_mlp``
    the action expert (``gemma_300m``), by default the same. Depth and head_dim are shared, as LeRobot
    requires. The benchmarks use the keyword sizes; tests use the defaults.
    """
    from lerobot.policies.pi0 import modeling_pi0
    from lerobot.policies.pi05 import modeling_pi05

    def gemma_config(variant: str, mod: Any = modeling_pi0):
        expert = variant == "gemma_300m"
        return mod.GemmaConfig(width=(expert_width or width) if expert else width, depth=depth,
                               mlp_dim=(expert_mlp or mlp_dim) if expert else mlp_dim, num_heads=8,
                               num_kv_heads=1, head_dim=head_dim)

    def shrink(real_cls: type, vlm: bool):
        def factory(config: Any, **kw: Any):
            if vlm:
                vc = config.vision_config
                vc.hidden_size, vc.intermediate_size = vision_width, vision_mlp or 2 * vision_width
                vc.num_hidden_layers, vc.num_attention_heads, vc.patch_size = vision_layers, vision_heads, 14
                vc.projection_dim = config.text_config.hidden_size
                config.text_config.vocab_size = config._vocab_size = vocab
            else:
                config.vocab_size = vocab
            return real_cls(config=config, **kw)

        return factory

    with contextlib.ExitStack() as stack:
        for mod in (modeling_pi0, modeling_pi05):
            stack.enter_context(mock.patch.object(mod, "get_gemma_config", lambda v, m=mod: gemma_config(v, m)))
            stack.enter_context(mock.patch.object(
                mod, "PaliGemmaForConditionalGenerationWithPiGemma",
                shrink(mod.PaliGemmaForConditionalGenerationWithPiGemma, vlm=True)))
            stack.enter_context(mock.patch.object(mod, "PiGemmaForCausalLM", shrink(mod.PiGemmaForCausalLM, vlm=False)))
        yield


_PERMANENT: contextlib.ExitStack | None = None


def apply_tiny_patches(**sizes: Any) -> None:
    """Apply :func:`tiny_pi_patches` for the rest of the process (a ``lerobot-train`` subprocess).

    Only for tests and the demo: a throw-away module that calls this is put on the subprocess's
    path and loaded with ``--env.discover_packages_path``. Never import it in a real run.
    """
    global _PERMANENT
    if _PERMANENT is None:
        _PERMANENT = contextlib.ExitStack()
        _PERMANENT.enter_context(tiny_pi_patches(**sizes))


TINY_PLUGIN_SOURCE = (
    '"""Throw-away plugin: shrink LeRobot pi0/pi0.5 to test size in this process (tests/demo only)."""\n'
    "from apt_plugins_lerobot_pi.testing import apply_tiny_patches\n\napply_tiny_patches()\n"
)


def write_tiny_plugin(directory: Path, name: str = "apt_tiny_pi") -> str:
    """Write the throw-away tiny-model plugin package under ``directory``; return its import name."""
    package = Path(directory) / name
    package.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text(TINY_PLUGIN_SOURCE)
    return name


def tiny_features() -> tuple[dict, dict]:
    """Input/output features of the tiny policies: one 28x28 camera, 6-D state and action."""
    from lerobot.configs.types import FeatureType, PolicyFeature

    inputs = {
        IMAGE_KEY: PolicyFeature(type=FeatureType.VISUAL, shape=(3, 28, 28)),
        "observation.state": PolicyFeature(type=FeatureType.STATE, shape=(6,)),
    }
    outputs = {"action": PolicyFeature(type=FeatureType.ACTION, shape=(6,))}
    return inputs, outputs


TINY_FIELDS = dict(device="cpu", chunk_size=4, n_action_steps=4, max_state_dim=8, max_action_dim=8,
                   num_inference_steps=2, image_resolution=(28, 28))


class PiConformanceKit(LeRobotConformanceKit):
    """Builds tiny real pi0 (``lerobot_pi0``) or pi0.5 (``lerobot_pi05``) policies and batches.

    Everything but the batches, the probes and gradient checkpointing comes from
    :class:`~apt_plugins.testing.LeRobotConformanceKit`.
    """

    prompt_len = 8
    tiny_fields = TINY_FIELDS

    def __init__(self, adapter_name: str):
        super().__init__(adapter_name)
        self.is_pi05 = adapter_name == "lerobot_pi05"
        kind = "pi05" if self.is_pi05 else "pi0"
        host = "PI05" if self.is_pi05 else "PI0"
        self.stock_config = f"lerobot.policies.{kind}.configuration_{kind}:{host}Config"
        self.stock_policy = f"lerobot.policies.{kind}.modeling_{kind}:{host}Policy"
        self.apt_config = f"apt_plugins_lerobot_pi.configuration_apt_{kind}:APT{host}Config"
        self.apt_policy = f"apt_plugins_lerobot_pi.modeling_apt_{kind}:APT{host}Policy"

    def features(self) -> tuple[dict, dict]:
        return tiny_features()

    def construction(self):
        return tiny_pi_patches()

    # ------------------------------------------------------------------ batches
    def make_batch(self, instruction: int = 0, seed: int = 0) -> dict[str, torch.Tensor]:
        """A training batch; ``instruction`` changes only the task tokens, their ids *and* count.

        pi0: ``[task (4-6 tokens), pad...]``. pi0.5: ``[task (2-4 tokens), state tokens (3), pad...]``,
        so a shorter task also moves the state tokens, as a real prompt would.
        """
        g = torch.Generator().manual_seed(seed)
        b, length = self.batch_size, self.prompt_len
        n_task = (4 if self.is_pi05 else 6) - instruction % 3
        n_rest = 3 if self.is_pi05 else 0
        task = torch.randint(10, TINY_VOCAB, (b, n_task), generator=torch.Generator().manual_seed(1000 + instruction))
        rest = torch.randint(10, TINY_VOCAB, (b, n_rest), generator=g)
        pad = torch.zeros(b, length - n_task - n_rest, dtype=torch.long)  # right padding, as LeRobot tokenizes
        tokens = torch.cat([task, rest, pad], dim=1)
        mask = torch.zeros(b, length, dtype=torch.bool)
        mask[:, : n_task + n_rest] = True
        task_mask = torch.zeros(b, length, dtype=torch.bool)
        task_mask[:, :n_task] = True
        return {
            IMAGE_KEY: torch.rand(b, 3, 28, 28, generator=g),
            "observation.state": torch.rand(b, 6, generator=g) * 2 - 1,
            "action": torch.rand(b, 4, 6, generator=g) * 2 - 1,
            TOKENS_KEY: tokens,
            MASK_KEY: mask,
            TASK_MASK_KEY: task_mask,
        }

    def probes(self, batch: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
        """Non-language changes a Stage-1 policy must still react to (it is not a constant)."""
        image = dict(batch)
        image[IMAGE_KEY] = 1.0 - batch[IMAGE_KEY]
        probes = {"image": image}
        state = dict(batch)
        if self.is_pi05:  # the state is in the prompt: change the state tokens, keep the task
            tokens = batch[TOKENS_KEY].clone()
            state_tokens = batch[MASK_KEY] & ~batch[TASK_MASK_KEY]
            tokens[state_tokens] = (tokens[state_tokens] + 7) % TINY_VOCAB
            state[TOKENS_KEY] = tokens
        else:
            state["observation.state"] = -batch["observation.state"]
        probes["state"] = state
        return probes

    def set_gradient_checkpointing(self, policy: Any, enabled: bool) -> None:
        if enabled:
            policy.model.gradient_checkpointing_enable()
        else:
            policy.model.gradient_checkpointing_disable()

    # ------------------------------------------------------------------ CLI runs
    def cli_workspace(self, root: Path) -> Any:
        """The tokenizer fixture and the tiny-model plugin under ``root``, for lerobot-train & co.

        See :class:`apt_plugins.testing.cli.CliWorkspace`.
        """
        from apt_plugins.testing.cli import CliWorkspace

        write_tokenizer_fixture(Path(root) / "hub")
        plugin = write_tiny_plugin(Path(root) / "plugins")
        return CliWorkspace(env={"HF_HUB_CACHE": str(Path(root) / "hub"), "PYTHONPATH": str(Path(root) / "plugins")},
                            policy_args=list(TINY_CLI_ARGS), plugin=plugin)


#: ``--policy.*`` flags of a tiny ``lerobot-train --policy.type=[apt_]pi0[5]`` run (with the plugin loaded).
#: 32 tokens hold pi0.5's longest synthetic prompt (task, 8 state bins, scaffolding): a truncated
#: prompt loses state tokens depending on the task's length, which no language mask can undo.
TINY_CLI_ARGS = ("--policy.device=cpu", "--policy.push_to_hub=false", "--policy.chunk_size=4",
                 "--policy.n_action_steps=4", "--policy.max_state_dim=8", "--policy.max_action_dim=8",
                 "--policy.image_resolution=[28,28]", "--policy.tokenizer_max_length=32")


def probe_batch(config: Any, variant: str = "original", seed: int = 0, batch_size: int = 2, prompt_len: int = 16,
                task_len: int = 8, vocab: int = TINY_VOCAB) -> dict[str, torch.Tensor]:
    """A model-ready batch for any pi0/pi0.5 config (real or tiny): images, state, action, prompt.

    The prompt is ``[task tokens, 4 scaffolding tokens, padding]``; the task tokens are marked in
    ``task_mask``. ``variant`` changes only them: ``original``, ``swapped`` (other ids), ``empty``
    (none) or ``shuffled`` (permuted). Token ids stay below ``vocab`` so the batch suits tiny and full
    vocabularies.
    """
    if variant not in ("original", "swapped", "empty", "shuffled"):
        raise ValueError(f"unknown probe variant {variant!r}")
    g = torch.Generator().manual_seed(seed)
    batch: dict[str, torch.Tensor] = {}
    for key, feature in config.image_features.items():
        batch[key] = torch.rand(batch_size, *feature.shape, generator=g)
    state_dim = config.robot_state_feature.shape[0] if config.robot_state_feature else config.max_state_dim
    batch["observation.state"] = torch.rand(batch_size, state_dim, generator=g) * 2 - 1
    action_dim = config.action_feature.shape[0]
    batch["action"] = torch.rand(batch_size, config.chunk_size, action_dim, generator=g) * 2 - 1
    words = torch.Generator().manual_seed(1001 if variant == "swapped" else 1000)
    task = torch.randint(10, vocab, (batch_size, task_len), generator=words)
    if variant == "shuffled":
        task = task[:, torch.randperm(task_len, generator=torch.Generator().manual_seed(seed))]
    if variant == "empty":
        task = task[:, :0]
    scaffold = torch.randint(10, vocab, (batch_size, 4), generator=g)
    used = task.shape[1] + scaffold.shape[1]
    pad = torch.zeros(batch_size, prompt_len - used, dtype=torch.long)
    batch[TOKENS_KEY] = torch.cat([task, scaffold, pad], dim=1)
    batch[MASK_KEY] = torch.zeros(batch_size, prompt_len, dtype=torch.bool)
    batch[MASK_KEY][:, :used] = True
    task_mask = torch.zeros(batch_size, prompt_len, dtype=torch.bool)
    task_mask[:, : task.shape[1]] = True
    batch[TASK_MASK_KEY] = task_mask
    return batch


# ---------------------------------------------------------------------- tokenizer fixture
PALIGEMMA_REPO = "google/paligemma-3b-pt-224"


def write_tokenizer_fixture(hub_cache: Path, repo_id: str = PALIGEMMA_REPO, words: list[str] | None = None) -> Path:
    """Install a tiny word-level tokenizer under ``repo_id`` in a scratch hub cache.

    LeRobot's pi0/pi0.5 processors load ``google/paligemma-3b-pt-224`` by name; with
    ``HF_HUB_CACHE=<hub_cache> HF_HUB_OFFLINE=1`` they get this one instead, so the real processor
    code runs offline. The vocabulary holds the digits 0..255 (pi0.5 state bins), the prompt
    scaffolding and ``words``.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    base = ["<pad>", "<eos>", "<bos>", "<unk>", "Task", "State", "Action", ":", ",", ";", "\n"]
    default_words = ("pick place push open close the a red green blue yellow cube bowl plate block drawer "
                     "cup left right up down into on of and to lift move grasp put stack").split()
    vocab_words = base + [str(i) for i in range(256)] + default_words + list(words or [])
    vocab = {w: i for i, w in enumerate(dict.fromkeys(vocab_words))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
                                   unk_token="<unk>")
    org, name = repo_id.split("/")
    root = Path(hub_cache) / f"models--{org}--{name}"
    commit = "0" * 40
    snapshot = root / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(snapshot)
    (snapshot / "config.json").write_text(json.dumps({}))  # AutoTokenizer resolves a model config first
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / "main").write_text(commit)
    return snapshot
