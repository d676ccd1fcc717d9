"""APT processors built on the fly from a plain checkpoint's own processors (``--policy.pretrained_path``).

In process and fast; the same path through ``lerobot-train`` for every LeRobot adapter is in
``test_parity_cli.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import unit_stats, use_offline_hub

from apt_plugins import Adapter, AptConfig, CheckpointMismatchError, get_plugin_manager
from apt_plugins.lerobot.processors import PROCESSOR_FILES, apt_processor_configs, rewrite_processor_files
from apt_plugins_lerobot_pi.testing import PiConformanceKit, write_tokenizer_fixture

PI05 = PiConformanceKit("lerobot_pi05")


@pytest.fixture
def offline_hub(tmp_path_factory, monkeypatch):
    root = tmp_path_factory.mktemp("hub")
    write_tokenizer_fixture(root)
    return use_offline_hub(monkeypatch, root)


def _plain_pi05_checkpoint(directory: Path) -> Path:
    """A stock pi0.5 checkpoint as lerobot-train writes it: weights, config and stock processors."""
    from lerobot.policies.pi05.processor_pi05 import make_pi05_pre_post_processors

    stock = PI05.build(None, tokenizer_max_length=32)
    stock.save_pretrained(directory)
    pre, post = make_pi05_pre_post_processors(stock.config, dataset_stats=unit_stats(6))
    pre.save_pretrained(directory)
    post.save_pretrained(directory)
    return directory


def _digests(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_adapter_default_changes_nothing():
    data = {"name": "policy_preprocessor", "steps": [{"registry_name": "tokenizer_processor"}]}
    new, changes = Adapter.rewrite_processor_config(object.__new__(Adapter), "policy_preprocessor.json", data,
                                                    AptConfig())
    assert new is data and changes == []


def test_pi_adapters_rewrite_only_the_pi05_preprocessor(offline_hub, tmp_path):
    plain = _plain_pi05_checkpoint(tmp_path / "plain")
    pi05, pi0 = (get_plugin_manager().get_adapter(n) for n in ("lerobot_pi05", "lerobot_pi0"))
    rewritten, changes = apt_processor_configs(pi05, plain, AptConfig())
    assert set(rewritten) == {"policy_preprocessor.json"} and len(changes) == 2
    names = [s["registry_name"] for s in rewritten["policy_preprocessor.json"]["steps"]]
    assert names.index("apt_record_task_text") + 1 == names.index("pi05_prepare_state_tokenizer_processor_step")
    assert "apt_task_span_tokenizer" in names and "tokenizer_processor" not in names
    assert apt_processor_configs(pi0, plain, AptConfig()) == ({}, [])  # pi0's prompt is the task alone
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in PROCESSOR_FILES:
        (copy / name).write_text((plain / name).read_text())
    assert rewrite_processor_files(pi05, copy, AptConfig()) == changes
    assert rewrite_processor_files(pi05, copy, AptConfig()) == []  # idempotent


def test_pretrained_path_loads_apt_processors_built_from_the_checkpoint(offline_hub, tmp_path, caplog):
    """What lerobot-train does: the policy from pretrained_path, then processors from the same path."""
    from lerobot.processor import PolicyProcessorPipeline

    plain = _plain_pi05_checkpoint(tmp_path / "plain")
    before = _digests(plain)
    config = PI05.policy_config(AptConfig(stage=1), tokenizer_max_length=32)
    config.pretrained_path = plain
    cls = PI05._resolve(PI05.apt_policy)
    with PI05.construction(), caplog.at_level("INFO", logger="apt_plugins"):
        policy = cls.from_pretrained(plain, config=config)
    assert "APT processors:" in caplog.text and "tokenizer_processor -> apt_task_span_tokenizer" in caplog.text
    view = Path(config.pretrained_path)
    assert view != plain and isinstance(config.pretrained_path, Path)
    pre = PolicyProcessorPipeline.from_pretrained(view, config_filename="policy_preprocessor.json")
    batch = pre({"observation.images.top": torch.full((1, 3, 28, 28), 0.5),
                 "observation.state": torch.linspace(-0.9, 0.9, 6)[None], "task": ["pick the red cube"],
                 "action": torch.zeros(1, 4, 6)})
    assert batch["observation.language.task_mask"].sum() == 7
    policy.train()
    loss, _ = policy.forward(batch)  # the first batch no longer fails
    assert torch.isfinite(loss)
    assert config.pretrained_path == plain, "the user's path must be back once training runs"
    assert _digests(plain) == before, "the source checkpoint was modified"


def test_an_apt_checkpoint_is_left_alone(offline_hub, tmp_path):
    from apt_plugins_lerobot_pi.processor_apt_pi05 import make_apt_pi05_pre_post_processors

    policy = PI05.build(AptConfig(stage=1), tokenizer_max_length=32)
    policy.save_pretrained(tmp_path / "apt")
    pre, _ = make_apt_pi05_pre_post_processors(policy.config, dataset_stats=unit_stats(6))
    pre.save_pretrained(tmp_path / "apt")
    config = PI05.policy_config(AptConfig(stage=1), tokenizer_max_length=32)
    config.pretrained_path = str(tmp_path / "apt")
    with PI05.construction():
        PI05._resolve(PI05.apt_policy).from_pretrained(tmp_path / "apt", config=config)
    assert config.pretrained_path == str(tmp_path / "apt")


def test_a_corrupt_processor_file_names_the_file(offline_hub, tmp_path):
    plain = _plain_pi05_checkpoint(tmp_path / "plain")
    (plain / "policy_preprocessor.json").write_text("{ not json")
    config = PI05.policy_config(AptConfig(stage=1), tokenizer_max_length=32)
    config.pretrained_path = plain
    with PI05.construction(), pytest.raises(CheckpointMismatchError, match=r"policy_preprocessor\.json is corrupt"):
        PI05._resolve(PI05.apt_policy).from_pretrained(plain, config=config)
    assert json.loads((plain / "policy_postprocessor.json").read_text())  # nothing else touched
