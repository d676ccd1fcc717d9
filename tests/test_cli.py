"""The ``apt-plugins`` console script, run as a subprocess the way users run it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

VENV_SCRIPT = Path(sys.executable).parent / "apt-plugins"
FIXTURES = Path(__file__).parent / "fixtures"


def apt_plugins_cli(*args: str, block: str | None = None, pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("APT_PLUGINS_") and k != "PYTHONPATH"}
    if block is not None:
        env["APT_PLUGINS_BLOCK"] = block
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    cmd = [str(VENV_SCRIPT)] if VENV_SCRIPT.exists() else [sys.executable, "-m", "apt_plugins.cli"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, env=env, timeout=120)


def test_list_shows_plugin_and_both_adapters():
    res = apt_plugins_cli("list")
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert out.startswith("apt-plugins ")
    plugin_line = next(line for line in out.splitlines() if line.strip().startswith("lerobot_pi "))
    assert " ok " in plugin_line and "entry point (apt-plugins" in plugin_line
    assert "hooks: apt_register_adapters" in out
    for name, apt_type in (("lerobot_pi0", "apt_pi0"), ("lerobot_pi05", "apt_pi05")):
        line = next(line for line in out.splitlines() if line.strip().startswith(f"{name} "))
        assert "host lerobot >=0.6.1,<0.7" in line
        assert "(installed: " in line
        assert f"types: {apt_type}; plugin: lerobot_pi" in out
    assert "(none registered)" not in out
    assert res.stderr == ""


def test_list_json():
    res = apt_plugins_cli("list", "--json")
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert isinstance(data["apt_plugins"], str)
    plugins = {p["name"]: p for p in data["plugins"]}
    assert plugins["lerobot_pi"]["adapters"] == ["lerobot_pi0", "lerobot_pi05"]
    assert plugins["lerobot_pi"]["error"] is None and plugins["lerobot_pi"]["blocked"] is False
    assert plugins["apt_plugins.defaults"]["source"] == "builtin"
    adapters = {a["name"]: a for a in data["adapters"]}
    assert set(adapters) >= {"lerobot_pi0", "lerobot_pi05"}
    for name in ("lerobot_pi0", "lerobot_pi05"):
        a = adapters[name]
        assert a["plugin"] == "lerobot_pi"
        assert a["host"] == "lerobot"
        assert a["supported_host_versions"] == ">=0.6.1,<0.7"
        assert a["description"]
    assert adapters["lerobot_pi0"]["apt_policy_types"] == ["apt_pi0"]
    assert adapters["lerobot_pi05"]["apt_policy_types"] == ["apt_pi05"]


def _in_tree_plugins() -> str:
    from importlib.metadata import entry_points

    return ",".join(sorted(ep.name for ep in entry_points(group="apt_plugins.adapters")))


def test_list_blocked():
    # Every adapter plugin blocked: no adapter is registered.
    res = apt_plugins_cli("list", block=_in_tree_plugins())
    assert res.returncode == 0, res.stderr
    line = next(line for line in res.stdout.splitlines() if line.strip().startswith("lerobot_pi "))
    assert "blocked" in line
    assert "(none registered)" in res.stdout
    assert "lerobot_pi0 " not in res.stdout

    data = json.loads(apt_plugins_cli("list", "--json", block=_in_tree_plugins()).stdout)
    plugins = {p["name"]: p for p in data["plugins"]}
    assert plugins["lerobot_pi"]["blocked"] is True and plugins["lerobot_groot"]["blocked"] is True
    assert data["adapters"] == []
    # Blocking one plugin leaves the other's adapters registered.
    data = json.loads(apt_plugins_cli("list", "--json", block="lerobot_pi").stdout)
    names = [a["name"] for a in data["adapters"]]
    assert "lerobot_groot" in names and not {"lerobot_pi0", "lerobot_pi05"} & set(names)


def test_list_reports_a_broken_plugin_and_strict_fails():
    res = apt_plugins_cli("list", pythonpath=FIXTURES / "fakeplug")
    assert res.returncode == 0, res.stderr
    out = res.stdout
    broken = next(line for line in out.splitlines() if line.strip().startswith("fake_broken "))
    assert "ERROR" in broken and "entry point (fakeplug 0.1)" in broken
    assert "import failed: ImportError: fakeplug_broken needs the library 'not_installed_lib'" in out
    assert "fake_adapter" in out and "lerobot_pi0" in out

    strict = apt_plugins_cli("list", "--strict", pythonpath=FIXTURES / "fakeplug")
    assert strict.returncode == 1
    # without errors, --strict passes
    assert apt_plugins_cli("list", "--strict").returncode == 0


def test_recipes():
    res = apt_plugins_cli("recipes")
    assert res.returncode == 0, res.stderr
    names = {line.split()[0]: line.split()[1] for line in res.stdout.splitlines() if line.strip()}
    assert "stages/stage1_va_prior" in names
    assert "stages/stage2_gated_fusion" in names
    assert names["stages/stage1_va_prior"].endswith("stage1_va_prior.yaml")
    assert Path(names["stages/stage1_va_prior"]).is_file()


def test_no_command_is_a_usage_error():
    res = apt_plugins_cli()
    assert res.returncode == 2
    assert "usage: apt-plugins" in res.stderr


def test_recipes_load_and_validate():
    from apt_plugins import AptConfig, AptConfigError
    from apt_plugins.recipes import list_recipes, load_recipe, recipe_path

    assert "stages/stage1_va_prior" in list_recipes()
    for name, stage in (("stages/stage1_va_prior", 1), ("stages/stage2_gated_fusion", 2)):
        assert AptConfig.parse(load_recipe(name)["apt"]).stage == stage
    with pytest.raises(AptConfigError, match=r"recipe='stages/stage1_va_prio'\. unknown recipe\. Did you mean 'stages/stage1_va_prior'\?"):
        recipe_path("stages/stage1_va_prio")


def test_main_in_process(capsys, monkeypatch):
    from apt_plugins import cli
    from apt_plugins import manager as manager_mod

    monkeypatch.delenv("APT_PLUGINS_BLOCK", raising=False)
    monkeypatch.delenv("APT_PLUGINS_DISABLE_AUTOLOAD", raising=False)
    monkeypatch.setattr(manager_mod, "_manager", None)
    assert cli.main(["list", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {"lerobot_pi0", "lerobot_pi05"} <= {a["name"] for a in data["adapters"]}
