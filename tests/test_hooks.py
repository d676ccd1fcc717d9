"""Every hook has a test here (``test_hook_<name>``), and a meta-test keeps it that way."""

from __future__ import annotations

import inspect
import sys

import pytest
import torch

import apt_plugins
from apt_plugins import AptConfig, get_plugin_manager, hookimpl, hookspecs
from apt_plugins_lerobot_pi.testing import PiConformanceKit


@pytest.fixture
def plugin():
    """Register a plugin object for one test, then remove it."""
    registered = []

    def register(obj, name):
        get_plugin_manager().register_plugin(obj, name=name)
        registered.append(name)
        return obj

    yield register
    for name in registered:
        get_plugin_manager().unregister_plugin(name)


def test_every_hook_has_a_test():
    specs = [n for n, f in inspect.getmembers(hookspecs, inspect.isfunction) if n.startswith("apt_")]
    tests = {n for n in dir(sys.modules[__name__]) if n.startswith("test_hook_")}
    assert specs and not {f"test_hook_{n}" for n in specs} - tests


def test_hook_apt_register_adapters(plugin):
    from apt_plugins_lerobot_pi.adapter import PI0Adapter

    class Renamed(PI0Adapter):
        name = "renamed_pi0"

    class P:
        @hookimpl
        def apt_register_adapters(self, register):
            register(Renamed)

    plugin(P(), "renamer")
    assert get_plugin_manager().get_adapter("renamed_pi0").name == "renamed_pi0"
    assert get_plugin_manager().plugins["renamer"].adapters == ["renamed_pi0"]


def test_hook_apt_select_adapter(plugin):
    kit = PiConformanceKit("lerobot_pi0")
    policy = kit.build(None)
    pm = get_plugin_manager()
    assert pm.select_adapter(policy).name == "lerobot_pi0"
    chosen = pm.get_adapter("lerobot_pi05")

    class Override:
        @hookimpl
        def apt_select_adapter(self, policy, registry):
            return chosen

    plugin(Override(), "override")
    assert pm.select_adapter(policy) is chosen  # a plugin's answer wins over the built-in one


def test_hook_apt_prepare_stage(plugin):
    seen = []

    class P:
        @hookimpl
        def apt_prepare_stage(self, policy, adapter, config, report):
            seen.append((adapter.name, config.stage, report.stage, report.groups["action_expert"].trainable_tensors))

    plugin(P(), "observer")
    PiConformanceKit("lerobot_pi0").build(AptConfig(stage=1))
    assert len(seen) == 1 and seen[0][:3] == ("lerobot_pi0", 1, 1) and seen[0][3] > 0


def test_hook_apt_param_groups(plugin):
    kit = PiConformanceKit("lerobot_pi0")
    policy = kit.build(AptConfig(stage=1))

    class OneGroup:
        @hookimpl
        def apt_param_groups(self, policy, base_lr, weight_decay):  # fewer args than the spec is allowed
            return [{"name": "all", "params": [p for p in policy.parameters() if p.requires_grad], "lr": base_lr * 2}]

    plugin(OneGroup(), "one-group")
    groups = apt_plugins.param_groups(policy, 1e-3, 0.0)
    assert [g["name"] for g in groups] == ["all"] and groups[0]["lr"] == 2e-3


def test_hook_apt_checkpoint_saved(plugin, tmp_path):
    seen = []

    class P:
        @hookimpl
        def apt_checkpoint_saved(self, path, manifest):
            seen.append((path, manifest["stage"]))

    plugin(P(), "saved")
    kit = PiConformanceKit("lerobot_pi0")
    kit.save(kit.build(AptConfig(stage=1)), tmp_path / "c")
    assert seen == [(str(tmp_path / "c"), 1)]


def test_hook_apt_checkpoint_loaded(plugin, tmp_path):
    seen = []

    class P:
        @hookimpl
        def apt_checkpoint_loaded(self, policy, path, report):
            seen.append(report)

    plugin(P(), "loaded")
    kit = PiConformanceKit("lerobot_pi0")
    kit.save(kit.build(AptConfig(stage=1)), tmp_path / "c")
    kit.load(tmp_path / "c", AptConfig(stage=1))
    assert len(seen) == 1 and seen[0]["fresh"] == [] and seen[0]["source_stage"] == 1 and seen[0]["loaded"]


def test_hook_apt_stage_promoted(plugin, tmp_path):
    seen = []

    class P:
        @hookimpl
        def apt_stage_promoted(self, policy, path, report):
            seen.append(report)

    plugin(P(), "promoted")
    kit = PiConformanceKit("lerobot_pi05")
    kit.save(kit.build(AptConfig(stage=1)), tmp_path / "c")
    kit.load(tmp_path / "c", AptConfig(stage=1))
    assert seen == []  # a plain reload is not a promotion
    kit.load(tmp_path / "c", AptConfig(stage=2))
    assert len(seen) == 1 and all(k.startswith("model.apt_fusion.") for k in seen[0]["fresh"])


def test_hook_apt_train_step(plugin):
    seen = []

    class P:
        @hookimpl
        def apt_train_step(self, policy, step, metrics):
            metrics["custom/drift"] = 0.0
            seen.append(dict(metrics))

    plugin(P(), "steps")
    kit = PiConformanceKit("lerobot_pi0")
    policy = kit.build(AptConfig(stage=2))
    kit.loss(policy, kit.make_batch()).backward()
    policy.update()
    assert seen and "apt/gate_mean/0" in seen[0] and "custom/drift" in seen[0]
    assert torch.isfinite(torch.tensor(list(seen[0].values()))).all()
