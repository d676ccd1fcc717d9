"""Hostile or broken third-party plugins cannot take apt-plugins down, and no checkpoint path runs code.

The plugins are a real installed-looking distribution (tests/fixtures/hostileplug: a dist-info with
entry points in ``apt_plugins.adapters``): one raises on import, one calls ``sys.exit()`` on import,
one raises while registering, one registers an adapter under the in-tree ``lerobot_pi0`` name, and
one whose hooks misbehave on demand (raise, or return the wrong type from a firstresult hook).
"""

from __future__ import annotations

import ast
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from apt_plugins import AptConfig, PluginHookError, prepare_stage
from apt_plugins.manager import get_plugin_manager, reset_plugin_manager

ROOT = Path(__file__).resolve().parents[1]
HOSTILE = Path(__file__).parent / "fixtures" / "hostileplug"
BIN = Path(sys.executable).parent


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(HOSTILE), "HF_HUB_OFFLINE": "1", **extra}


def test_apt_plugins_list_survives_hostile_plugins_and_names_each_one():
    proc = subprocess.run([str(BIN / "apt-plugins"), "list"], env=_env(), capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "Traceback" not in out
    lines = out.splitlines()

    def block(plugin: str) -> str:
        start = next(i for i, line in enumerate(lines) if line.strip().startswith(plugin + " "))
        return "\n".join(lines[start:start + 3])

    assert "import failed: RuntimeError: hostile_import: boom at import time" in block("hostile_import")
    assert "import failed: SystemExit: hostile_exit: exiting at import time" in block("hostile_exit")
    assert "apt_register_adapters failed: RuntimeError: hostile_register: boom" in block("hostile_register")
    assert "'lerobot_pi0' is invalid: the name is already registered by plugin 'lerobot_pi'" in block("hostile_taken_name")
    # The in-tree plugins keep every adapter (loaded before third-party ones, so the squatter loses).
    assert "ERROR" not in block("lerobot_pi") and "ERROR" not in block("lerobot_groot")
    for adapter, types in (("lerobot_pi0", "apt_pi0"), ("lerobot_pi05", "apt_pi05"), ("lerobot_groot", "apt_groot")):
        first = lines.index("adapters:")
        row = next(i for i, line in enumerate(lines) if i > first and line.strip().startswith(adapter + " "))
        assert f"types: {types}; plugin: lerobot_" in lines[row + 1], (adapter, lines[row:row + 2])


def test_import_and_the_manager_work_next_to_hostile_plugins():
    probe = ("import apt_plugins, sys; assert 'torch' not in sys.modules; "
             "pm = apt_plugins.get_plugin_manager(); "
             "print(sorted(n for n, p in pm.plugins.items() if p.error)); "
             "print(pm.registry.owner('lerobot_pi0'), pm.registry.owner('lerobot_pi05'))")
    proc = subprocess.run([sys.executable, "-c", probe], env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "['hostile_exit', 'hostile_import', 'hostile_register', 'hostile_taken_name']" in proc.stdout
    assert "lerobot_pi lerobot_pi" in proc.stdout


@pytest.fixture
def hostile_manager(monkeypatch):
    """The process-wide manager, loaded with the hostile distribution installed; restored afterwards."""
    monkeypatch.syspath_prepend(str(HOSTILE))
    reset_plugin_manager()
    yield get_plugin_manager()
    for module in [m for m in sys.modules if m.startswith("hostile_")]:
        del sys.modules[module]
    reset_plugin_manager()


@pytest.fixture(scope="module")
def kit():
    return get_plugin_manager().get_adapter("lerobot_pi0").conformance_kit()


def test_a_hook_returning_the_wrong_type_is_named(hostile_manager, kit, monkeypatch):
    stock = kit.build(None)
    assert hostile_manager.select_adapter(stock).name == "lerobot_pi0"  # well-behaved: the default answers
    monkeypatch.setenv("HOSTILE_HOOKS", "select")
    with pytest.raises(PluginHookError, match=r"plugin 'hostile_hooks' failed in hook apt_select_adapter: "
                                              r"returned str 'not an adapter', expected an Adapter instance or None"):
        hostile_manager.select_adapter(stock)
    monkeypatch.setenv("HOSTILE_HOOKS", "groups")
    from apt_plugins import param_groups

    policy = kit.build(AptConfig(stage=1))
    with pytest.raises(PluginHookError, match=r"'hostile_hooks' failed in hook apt_param_groups: returned str"):
        param_groups(policy, base_lr=1e-4, weight_decay=0.0)


def test_a_raising_hook_is_named_and_loses_no_checkpoint(hostile_manager, kit, tmp_path, monkeypatch):
    monkeypatch.setenv("HOSTILE_HOOKS", "prepare")
    with pytest.raises(PluginHookError, match=r"'hostile_hooks' failed in hook apt_prepare_stage: raised KeyError"):
        prepare_stage(kit.build(None), AptConfig(stage=1), adapter="lerobot_pi0")
    monkeypatch.setenv("HOSTILE_HOOKS", "saved")
    policy = kit.build(AptConfig(stage=1))
    with pytest.raises(PluginHookError, match=r"'hostile_hooks' failed in hook apt_checkpoint_saved: raised "
                                              r"RuntimeError: hostile_hooks: boom after a save\. .*APT_PLUGINS_BLOCK"):
        kit.save(policy, tmp_path / "s1")
    # The hook runs after the write completed: the checkpoint is whole and loads strictly.
    monkeypatch.delenv("HOSTILE_HOOKS")
    loaded = kit.load(tmp_path / "s1", AptConfig(stage=1))
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in policy.state_dict().items())


def test_apt_errors_from_hooks_pass_through_unchanged(hostile_manager):
    from apt_plugins import AptConfigError, hookimpl

    class Refuser:
        @hookimpl
        def apt_prepare_stage(self, policy, adapter, config, report):
            raise AptConfigError("apt.stage", 2, "this plugin supports Stage 1 only.")

    hostile_manager.register_plugin(Refuser(), name="refuser")
    kit = hostile_manager.get_adapter("lerobot_pi0").conformance_kit()
    with pytest.raises(AptConfigError, match=r"apt\.stage=2\. this plugin supports Stage 1 only"):
        prepare_stage(kit.build(None), AptConfig(stage=1), adapter="lerobot_pi0")


# ------------------------------------------------------------------------------- no code execution
_CHECKPOINT_CODE = ["apt_plugins/checkpoint.py", "apt_plugins/atomic.py", "apt_plugins/stages.py",
                    "apt_plugins/cli.py", "apt_plugins/lerobot", "apt_plugins/deepspeed", "adapters"]


def _sources():
    for entry in _CHECKPOINT_CODE:
        path = ROOT / entry
        yield from ([path] if path.is_file() else sorted(path.rglob("*.py")))


def test_checkpoint_code_never_unpickles_or_trusts_remote_code():
    problems = []
    for path in _sources():
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                if any(n.split(".")[0] in ("pickle", "dill", "cloudpickle") for n in names):
                    problems.append(f"{where}: imports a pickle module")
            if isinstance(node, ast.Call):
                func = ast.unparse(node.func)
                kwargs = {k.arg: ast.unparse(k.value) for k in node.keywords}
                if func.endswith("torch.load") or func == "load" and "weights_only" in kwargs:
                    if kwargs.get("weights_only") != "True":
                        problems.append(f"{where}: {func} without weights_only=True")
                if kwargs.get("trust_remote_code") not in (None, "False"):
                    problems.append(f"{where}: trust_remote_code={kwargs['trust_remote_code']}")
    assert not problems, "\n".join(problems)


def test_loading_promoting_and_retrofitting_unpickle_nothing(kit, tmp_path, monkeypatch):
    from apt_plugins.lerobot.retrofit import retrofit

    kit.save(kit.build(AptConfig(stage=1)), tmp_path / "s1")
    kit.build(None, seed=3).save_pretrained(tmp_path / "plain")

    def refuse(*args, **kwargs):
        raise AssertionError("a checkpoint path unpickled data")

    for owner, name in ((torch, "load"), (pickle, "load"), (pickle, "loads"), (pickle, "Unpickler")):
        monkeypatch.setattr(owner, name, refuse)
    kit.load(tmp_path / "s1", AptConfig(stage=1))
    kit.load(tmp_path / "s1", AptConfig(stage=2))
    with kit.construction():
        retrofit(tmp_path / "plain", tmp_path / "rt", stage=2)
    kit.load(tmp_path / "rt", AptConfig(stage=2))
