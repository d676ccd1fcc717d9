"""The language evaluator on tiny *real* LeRobot policies, stock and APT, through their own processors.

Stock pi0, pi0.5, SmolVLA and GR00T must react to the instruction (non-zero divergence under every
changed variant, tokens changed for every frame); every registered LeRobot APT type in Stage 1 must
score exactly zero under every variant; ACT (no language input) gets ``NoLanguageInputError``; a
tokenizer that truncates the instruction trips the token-delivery guard. The closed loop runs
LeRobot's own ``eval_policy`` in the ``apt_blocks`` env with the override, and its guard catches a
harness that never shows the policy the changed instruction.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import use_offline_hub

from apt_plugins import AptConfig, get_plugin_manager
from apt_plugins.errors import InstructionNotDeliveredError, NoLanguageInputError
from apt_plugins.lerobot.language_eval import VARIANTS, evaluate_language

CHANGED = [v for v in VARIANTS if v != "original"]
FRAMES = 4


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from apt_plugins.lerobot.data import make_synthetic_dataset

    return make_synthetic_dataset(tmp_path_factory.mktemp("lang_eval") / "data", episodes_per_task=1,
                                  frames_per_episode=8)


@pytest.fixture(autouse=True)
def offline_hub(monkeypatch, tmp_path):
    """The tokenizer/processor fixtures of every host under a scratch hub cache."""
    from apt_plugins_lerobot_pi.testing import write_tokenizer_fixture

    torch.set_num_threads(1)
    hub = use_offline_hub(monkeypatch, tmp_path / "hub")
    write_tokenizer_fixture(hub)
    try:
        from apt_plugins_lerobot_groot.testing import write_cosmos_fixture

        write_cosmos_fixture(hub)
    except ImportError:  # groot extra not installed
        pass
    return hub


# ------------------------------------------------------------------------------ tiny stock policies
def _features(size: int):
    from lerobot.configs.types import FeatureType, PolicyFeature

    inputs = {"observation.images.top": PolicyFeature(type=FeatureType.VISUAL, shape=(3, size, size)),
              "observation.state": PolicyFeature(type=FeatureType.STATE, shape=(6,))}
    return inputs, {"action": PolicyFeature(type=FeatureType.ACTION, shape=(6,))}


def build_stock(kind: str, tmp_path: Path):
    """A tiny real stock LeRobot policy of type ``kind``."""
    torch.manual_seed(0)
    if kind in ("pi0", "pi05"):
        from apt_plugins_lerobot_pi.testing import PiConformanceKit

        return PiConformanceKit("lerobot_pi05" if kind == "pi05" else "lerobot_pi0").build(None).eval()
    if kind == "groot":
        pytest.importorskip("diffusers")
        from apt_plugins_lerobot_groot.testing import GrootConformanceKit

        return GrootConformanceKit().build(None).eval()
    if kind == "smolvla":  # the apt_smolvla adapter's kit builds the stock SmolVLAPolicy too
        return get_plugin_manager().get_adapter("lerobot_smolvla").conformance_kit().build(None).eval()
    if kind == "act":
        from lerobot.policies.act.configuration_act import ACTConfig
        from lerobot.policies.act.modeling_act import ACTPolicy

        inputs, outputs = _features(32)
        config = ACTConfig(input_features=inputs, output_features=outputs, chunk_size=4, n_action_steps=4,
                           dim_model=32, n_heads=2, dim_feedforward=64, n_encoder_layers=1, n_decoder_layers=1,
                           use_vae=False, pretrained_backbone_weights=None, device="cpu")
        return ACTPolicy(config).eval()
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["pi0", "pi05", "smolvla", "groot"])
def test_a_stock_policy_reacts_to_every_changed_instruction(kind, dataset, tmp_path):
    report = evaluate_language(build_stock(kind, tmp_path), dataset, frames=FRAMES, seed=0)
    assert report.policy["type"] == kind and report.settings["frames"] == FRAMES
    assert report.per_variant["original"]["divergence_max"] == 0.0  # the noise really is fixed
    for variant in CHANGED:
        row = report.per_variant[variant]
        assert row["tokens_changed"] == FRAMES, variant  # the tokens the policy saw changed, every frame
        assert row["divergence_mean"] > 0.0, variant
    assert report.summary["sensitivity"] > 0.0 and report.index is not None and report.index != 0.0
    tasks = {f["task"] for f in report.frames}
    assert tasks == set(report.dataset["tasks"])  # frames come from every task
    for frame in report.frames:
        assert frame["instructions"]["task_swap"] in report.dataset["tasks"]
        assert frame["instructions"]["task_swap"] != frame["task"]
        assert frame["instructions"]["empty"] == ""


def _lerobot_apt_kits():
    kits = []
    for adapter in get_plugin_manager().registry:
        if adapter.host != "lerobot":
            continue
        kit = adapter.conformance_kit()
        if kit is not None:
            kits.append(pytest.param(adapter.name, id=adapter.name))
    return kits


@pytest.mark.parametrize("adapter_name", _lerobot_apt_kits())
def test_every_apt_type_in_stage_1_scores_exactly_zero(adapter_name, dataset):
    if adapter_name == "lerobot_groot":
        pytest.importorskip("diffusers")
    kit = get_plugin_manager().get_adapter(adapter_name).conformance_kit()
    policy = kit.build(AptConfig(stage=1)).eval()
    report = evaluate_language(policy, dataset, frames=FRAMES, seed=1)
    assert report.policy["type"].startswith("apt_")
    for variant in VARIANTS:
        row = report.per_variant[variant]
        assert row["divergence_max"] == 0.0, (variant, row)
        if variant != "original":
            assert row["tokens_changed"] == FRAMES, variant  # zero although the policy saw other tokens
    assert report.index == 0.0 and report.summary["sensitivity"] == 0.0


def test_a_policy_without_language_input_gets_a_clear_error(dataset, tmp_path):
    with pytest.raises(NoLanguageInputError, match=r"policy 'act' takes no instruction: its pre-processor produced "
                       r"the same model inputs for 'pick the \w+ block', ''"):
        evaluate_language(build_stock("act", tmp_path), dataset, frames=2)


def test_a_truncating_tokenizer_trips_the_delivery_guard(dataset, tmp_path):
    """Negative control: tokens cut after two words make every task read 'pick the'."""
    from lerobot.policies.factory import make_pre_post_processors

    policy = build_stock("pi0", tmp_path)
    policy.config.tokenizer_max_length = 2
    pre, post = make_pre_post_processors(policy.config, dataset_stats=dataset.meta.stats)
    with pytest.raises(InstructionNotDeliveredError, match=r"variant 'task_swap' \(dataset frame \d+\): the changed "
                       r"instruction 'pick the \w+ block' never reached the policy .*truncated"):
        evaluate_language(policy, dataset, frames=2, variants=["task_swap"], preprocessor=pre, postprocessor=post)


def test_frames_seed_and_variant_texts_are_reproducible_and_ci_logs_get_no_progress_bar(dataset, tmp_path, capsys):
    policy = build_stock("pi0", tmp_path)
    a = evaluate_language(policy, dataset, frames=3, seed=5, variants=["paraphrase", "corrupted"])
    b = evaluate_language(policy, dataset, frames=3, seed=5, variants=["paraphrase", "corrupted"])
    assert a.to_dict() == b.to_dict()
    assert list(a.per_variant) == ["original", "paraphrase", "corrupted"]
    assert "eval-language" not in capsys.readouterr().err  # stderr is not a terminal here: no bar
    c = evaluate_language(policy, dataset, frames=3, seed=6, variants=["paraphrase", "corrupted"], progress=True)
    assert [f["instructions"] for f in c.frames] != [f["instructions"] for f in a.frames]
    assert "eval-language" in capsys.readouterr().err  # the bar itself works when asked for


# ------------------------------------------------------------------------------------ closed loop
def _blocks_env():
    from apt_plugins.lerobot.env import AptBlocksEnvConfig

    return AptBlocksEnvConfig(episode_length=3)


def test_closed_loop_override_reaches_the_policy_and_rescores_the_swapped_task(dataset):
    from apt_plugins_lerobot_pi.testing import PiConformanceKit

    from apt_plugins.lerobot.language_eval.closed_loop import evaluate_closed_loop

    policy = PiConformanceKit("lerobot_pi0").build(AptConfig(stage=1)).eval()
    report = evaluate_closed_loop(policy, _blocks_env(), episodes=2, variants=["task_swap", "paraphrase"],
                                  dataset_stats=dataset.meta.stats)
    swap = report.per_variant["task_swap"]
    assert swap["episodes"] == 2 and swap["retargeted"] == 2
    for episode in swap["instructions"]:
        assert episode["shown"] != episode["original"] and episode["scored_task"] == episode["shown"]
    # 3 steps x 2 episodes, every step's tokens checked against the original's
    assert swap["tokens_checked"] == 6 and report.per_variant["paraphrase"]["tokens_checked"] == 6
    assert report.per_variant["paraphrase"]["retargeted"] == 0
    assert report.per_variant["original"]["tokens_checked"] == 0
    assert "task_swap" in report.format_table()


def test_closed_loop_guard_catches_a_harness_that_never_shows_the_new_instruction(dataset, monkeypatch):
    """Negative control: the harness reads the env's own task, as the LIBERO-PRO runners did."""
    from apt_plugins_lerobot_pi.testing import PiConformanceKit

    from apt_plugins.lerobot.language_eval.closed_loop import InstructionOverride, evaluate_closed_loop

    monkeypatch.setattr(InstructionOverride, "task_description", property(lambda self: self.original_instruction))
    monkeypatch.setattr(InstructionOverride, "task", property(lambda self: self.original_instruction))
    policy = PiConformanceKit("lerobot_pi0").build(None).eval()
    with pytest.raises(InstructionNotDeliveredError, match=r"variant 'empty' \(episode step 0, env 0\).*carried "
                       r"'pick the \w+ block' instead"):
        evaluate_closed_loop(policy, _blocks_env(), episodes=1, variants=["empty"], dataset_stats=dataset.meta.stats)


@pytest.mark.parametrize("kind", ["pi05", "smolvla", "groot"])
def test_a_saved_checkpoint_is_evaluated_with_its_own_processors(kind, dataset, tmp_path):
    """pi0 through a path is covered by the CLI test; these hosts load their processors differently."""
    from apt_plugins_lerobot_pi.testing import tiny_pi_patches
    from lerobot.policies.factory import make_pre_post_processors

    policy = build_stock(kind, tmp_path)
    pre, post = make_pre_post_processors(policy.config, dataset_stats=dataset.meta.stats)
    directory = tmp_path / f"{kind}_run" / "pretrained_model"
    policy.save_pretrained(directory)
    pre.save_pretrained(directory)
    post.save_pretrained(directory)
    with tiny_pi_patches():  # the pi0.5 config records the real Gemma sizes
        report = evaluate_language(directory, dataset.repo_id, dataset_root=dataset.root, frames=2, seed=0,
                                   variants=["task_swap", "empty"])
    assert report.policy == {**report.policy, "name": f"{kind}_run", "type": kind, "source": str(directory)}
    assert report.per_variant["original"]["divergence_max"] == 0.0
    assert report.per_variant["task_swap"]["tokens_changed"] == 2 and report.divergence("empty") > 0.0
