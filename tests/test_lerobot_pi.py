"""The pi0/pi0.5 adapter beyond the shared suite: processors, LeRobot config parsing, hooks, dtypes."""

from __future__ import annotations

import json

import pytest
from conftest import unit_stats, use_offline_hub
import torch

from apt_plugins import AptConfig, AptConfigError, LanguageMaskError, get_plugin_manager, hookimpl
from apt_plugins_lerobot_pi.testing import PiConformanceKit, tiny_pi_patches, write_tokenizer_fixture


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    write_tokenizer_fixture(root)
    return root


@pytest.fixture
def offline_hub(hub_cache, monkeypatch):
    return use_offline_hub(monkeypatch, hub_cache)


def _stats():
    return unit_stats(6)


def _raw(task, state=None):
    return {
        "observation.images.top": torch.full((3, 28, 28), 0.5),
        "observation.state": state if state is not None else torch.linspace(-0.9, 0.9, 6),
        "task": task,
    }


def test_pi05_processor_marks_exactly_the_task_clause(offline_hub):
    from apt_plugins_lerobot_pi.processor_apt_pi05 import make_apt_pi05_pre_post_processors

    kit = PiConformanceKit("lerobot_pi05")
    config = kit.policy_config(AptConfig(stage=1), tokenizer_max_length=24)
    pre, _ = make_apt_pi05_pre_post_processors(config, dataset_stats=_stats())
    out = pre(_raw("pick the red cube"))
    tokens, mask = out["observation.language.tokens"][0], out["observation.language.task_mask"][0]
    tok = pre.steps[[type(s).__name__ for s in pre.steps].index("TaskSpanTokenizerStep")].input_tokenizer
    words = tok.convert_ids_to_tokens(tokens.tolist())
    # The whole "Task: <task>," clause is hidden; "State: <bins>;\nAction:" stays visible.
    assert [w for w, m in zip(words, mask.tolist()) if m] == ["Task", ":", "pick", "the", "red", "cube", ","]
    assert "State" in words and not mask[words.index("State")]


def test_pi05_stage1_end_to_end_with_real_processor(offline_hub):
    """Through the real processor: the instruction is invisible, the state (inside the prompt) is not."""
    from apt_plugins_lerobot_pi.processor_apt_pi05 import make_apt_pi05_pre_post_processors

    kit = PiConformanceKit("lerobot_pi05")
    policy = kit.build(AptConfig(stage=1), tokenizer_max_length=24).eval()
    pre, _ = make_apt_pi05_pre_post_processors(policy.config, dataset_stats=_stats())

    def act(task, state=None):
        torch.manual_seed(0)
        policy.reset()
        return policy.predict_action_chunk(pre(_raw(task, state)))

    a = act("pick the red cube")
    for other in ("open the green drawer", "", "cube red the pick", "put the blue cup on the yellow plate"):
        assert torch.equal(a, act(other)), other  # swapped, empty, shuffled, longer
    assert not torch.equal(a, act("pick the red cube", state=-torch.linspace(-0.9, 0.9, 6)))


def test_pi0_stage1_end_to_end_with_real_processor(offline_hub):
    from apt_plugins_lerobot_pi.processor_apt_pi0 import make_apt_pi0_pre_post_processors

    kit = PiConformanceKit("lerobot_pi0")
    policy = kit.build(AptConfig(stage=1), tokenizer_max_length=16).eval()
    stock = kit.build(None, tokenizer_max_length=16).eval()
    pre, _ = make_apt_pi0_pre_post_processors(policy.config, dataset_stats=_stats())

    def act(p, task):
        torch.manual_seed(0)
        p.reset()
        return p.predict_action_chunk(pre(_raw(task)))

    a = act(policy, "pick the red cube")
    for other in ("open the green drawer", "", "cube red the pick", "put the blue cup on the yellow plate"):
        assert torch.equal(a, act(policy, other)), other
    assert not torch.equal(act(stock, "pick the red cube"), act(stock, "open the green drawer"))


def test_pi05_without_task_mask_fails_clearly():
    kit = PiConformanceKit("lerobot_pi05")
    policy = kit.build(AptConfig(stage=1))
    batch = kit.make_batch()
    del batch["observation.language.task_mask"]
    with pytest.raises(LanguageMaskError, match="task_mask"):
        kit.loss(policy, batch)
    # Hiding the whole prompt is an explicit choice, and then no task mask is needed.
    whole = kit.build(AptConfig(stage=1, language_mask_scope="prompt"))
    assert torch.isfinite(kit.loss(whole, batch))


def test_apt_fields_parse_from_the_cli_and_save_in_config_json(tmp_path):
    import draccus

    from apt_plugins_lerobot_pi.configuration_apt_pi0 import APTPI0Config

    cfg = draccus.parse(APTPI0Config, args=["--apt.stage=2", "--apt.vlm_mode=lora", "--apt.gate_granularity=scalar",
                                            "--device=cpu"])
    assert AptConfig.from_settings(cfg.apt) == AptConfig(stage=2, vlm_mode="lora", gate_granularity="scalar")
    with pytest.raises(AptConfigError, match=r"policy\.apt\.stage=3.*allowed values: 1, 2"):
        draccus.parse(APTPI0Config, args=["--apt.stage=3", "--device=cpu"])
    with pytest.raises(AptConfigError, match=r"policy\.apt\.vlm_mode='full'.*not allowed in stage 1"):
        draccus.parse(APTPI0Config, args=["--apt.vlm_mode=full", "--device=cpu"])
    cfg._save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["type"] == "apt_pi0" and saved["apt"]["vlm_mode"] == "lora"


def test_optimizer_groups_follow_the_paper_recipe():
    kit = PiConformanceKit("lerobot_pi0")
    policy = kit.build(AptConfig(stage=2, vlm_mode="full"))
    groups = {g["name"]: g for g in policy.get_optim_params()}
    base = policy.config.optimizer_lr
    assert set(groups) == {"action_expert", "action_expert_no_decay", "fusion", "fusion_no_decay", "fusion_gate",
                           "vlm", "vlm_no_decay"}
    assert groups["vlm"]["lr"] == pytest.approx(base * 0.1) and groups["vlm"]["weight_decay"] == 1e-10
    gate_ids = {id(p) for n, p in policy.named_parameters() if n.endswith("gate.logit")}
    # the gates learn at their own rate (gate_lr_multiplier), without weight decay
    assert gate_ids == {id(p) for p in groups["fusion_gate"]["params"]}
    assert groups["fusion_gate"]["lr"] == pytest.approx(base * AptConfig().gate_lr_multiplier)
    assert groups["fusion_gate"]["weight_decay"] == 0.0
    assert all(g["weight_decay"] == 0.0 for n, g in groups.items() if n.endswith("_no_decay"))
    stage1 = {g["name"] for g in kit.build(AptConfig(stage=1)).get_optim_params()}
    assert stage1 == {"action_expert", "action_expert_no_decay"}


class Recorder:
    def __init__(self):
        self.events = []

    @hookimpl
    def apt_train_step(self, policy, step, metrics):
        self.events.append(("step", dict(metrics)))

    @hookimpl
    def apt_checkpoint_saved(self, policy, path, manifest):
        self.events.append(("saved", manifest))

    @hookimpl
    def apt_stage_promoted(self, policy, path, report):
        self.events.append(("promoted", report))


@pytest.fixture
def recorder():
    pm = get_plugin_manager()
    rec = Recorder()
    pm.register_plugin(rec, name="test-recorder")
    yield rec
    pm.unregister_plugin("test-recorder")


def test_hooks_fire_for_saves_promotion_and_steps(tmp_path, recorder):
    kit = PiConformanceKit("lerobot_pi0")
    stage1 = kit.build(AptConfig(stage=1))
    kit.save(stage1, tmp_path / "s1")
    manifest = json.loads((tmp_path / "s1" / "apt_manifest.json").read_text())
    assert manifest["stage"] == 1 and manifest["apt_tensors"] == {} and manifest["adapter"] == "lerobot_pi0"
    stage2 = kit.load(tmp_path / "s1", AptConfig(stage=2, gate_granularity="scalar"))
    metrics = stage2.update()
    assert set(metrics) == {f"apt/gate_{s}/{i}" for s in ("mean", "std") for i in range(2)}
    assert metrics["apt/gate_mean/0"] == pytest.approx(0.5)
    kinds = [e[0] for e in recorder.events]
    assert kinds == ["saved", "promoted", "step"]
    promoted = recorder.events[1][1]
    assert promoted["fresh"] and all(".apt_fusion." in k for k in promoted["fresh"])
    kit.save(stage2, tmp_path / "s2")
    m2 = json.loads((tmp_path / "s2" / "apt_manifest.json").read_text())
    assert m2["parent"] == {"path": str(tmp_path / "s1"), "stage": 1}
    assert sorted(m2["fresh_at_last_load"]) == sorted(promoted["fresh"])


def test_plain_pi0_checkpoint_loads_into_stage1(tmp_path):
    kit = PiConformanceKit("lerobot_pi0")
    stock = kit.build(None, seed=3)
    stock.save_pretrained(tmp_path / "plain")
    policy = kit.load(tmp_path / "plain", AptConfig(stage=1))
    for name, tensor in stock.state_dict().items():
        assert torch.equal(tensor, policy.state_dict()[name]), name


def test_strict_false_is_refused(tmp_path):
    from apt_plugins import CheckpointMismatchError

    kit = PiConformanceKit("lerobot_pi0")
    kit.save(kit.build(AptConfig(stage=1)), tmp_path / "s1")
    with pytest.raises(CheckpointMismatchError, match="strict=False is not supported"):
        kit.load(tmp_path / "s1", AptConfig(stage=1), strict=False)


@pytest.mark.parametrize("adapter", ["lerobot_pi0", "lerobot_pi05"])
def test_bfloat16_policies_train_and_sample(adapter):
    kit = PiConformanceKit(adapter)
    policy = kit.build(AptConfig(stage=2), dtype="bfloat16")
    kit.perturb_fusion(policy)
    loss = kit.loss(policy, kit.make_batch())
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for n, p in policy.named_parameters() if ".apt_fusion." in n and "o_proj" in n)
    assert torch.isfinite(kit.actions(policy, kit.make_batch())).all()


def test_compile_model_is_refused():
    kit = PiConformanceKit("lerobot_pi0")
    with pytest.raises(AptConfigError, match="compile_model"):
        kit.build(AptConfig(stage=1), compile_model=True)


def test_fusion_source_layers_are_validated():
    kit = PiConformanceKit("lerobot_pi0")
    with pytest.raises(AptConfigError, match=r"apt\.fusion_source_layers"):
        kit.build(AptConfig(stage=2, fusion_source_layers=[0]))
    policy = kit.build(AptConfig(stage=2, fusion_source_layers=[1, 1]))
    kit.perturb_fusion(policy)
    assert torch.isfinite(kit.loss(policy, kit.make_batch()))


def test_denoise_step_refuses_a_plain_cache():
    kit = PiConformanceKit("lerobot_pi0")
    policy = kit.build(AptConfig(stage=1))
    with pytest.raises(LanguageMaskError, match="PrefixContext"):
        policy.model.denoise_step(None, None, object(), None, None)


def test_stage2_without_inherited_mask_reads_language_everywhere():
    """inherited_layers_keep_language_mask=False lifts the mask: even closed gates see language."""
    kit = PiConformanceKit("lerobot_pi0")
    policy = kit.build(AptConfig(stage=2, inherited_layers_keep_language_mask=False))
    a, b = kit.make_batch(instruction=0), kit.make_batch(instruction=1)
    assert not torch.equal(kit.actions(policy, a), kit.actions(policy, b))


def test_unmasked_stage2_equals_stock_pi0_inference():
    """With the mask lifted and closed gates, APT sampling reproduces stock LeRobot pi0 exactly."""
    kit = PiConformanceKit("lerobot_pi0")
    stock = kit.build(None, seed=5).eval()
    apt = kit.build(AptConfig(stage=2, inherited_layers_keep_language_mask=False), seed=5).eval()
    missing = apt.load_state_dict(stock.state_dict(), strict=False)
    assert all(".apt_fusion." in k for k in missing.missing_keys)
    batch = kit.make_batch()
    assert torch.equal(kit.actions(stock, batch), kit.actions(apt, batch))
    stock.train(), apt.train()
    assert torch.allclose(kit.loss(stock, batch), kit.loss(apt, batch), atol=1e-6, rtol=1e-6)


def test_retrofit_rewrites_a_stock_pi05_preprocessor(offline_hub, tmp_path):
    """A copied stock pi0.5 preprocessor gains the task-span steps and still loads and runs."""
    from lerobot.policies.pi05.processor_pi05 import make_pi05_pre_post_processors
    from lerobot.processor import PolicyProcessorPipeline

    from apt_plugins_lerobot_pi.processing import rewrite_pi05_preprocessor

    kit = PiConformanceKit("lerobot_pi05")
    config = kit.policy_config(None, tokenizer_max_length=24)
    pre, _ = make_pi05_pre_post_processors(config, dataset_stats=_stats())
    pre.save_pretrained(tmp_path)
    assert rewrite_pi05_preprocessor(tmp_path)
    assert not rewrite_pi05_preprocessor(tmp_path)  # idempotent
    loaded = PolicyProcessorPipeline.from_pretrained(tmp_path, config_filename="policy_preprocessor.json")
    out = loaded(_raw("pick the red cube"))
    mask = out["observation.language.task_mask"][0]
    assert mask.sum() == 7 and not mask[-1]  # "Task : pick the red cube ,"
