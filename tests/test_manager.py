"""PluginManager: entry-point loading, blocking, per-plugin error isolation, adapter selection."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pluggy
import pytest

from apt_plugins.errors import AdapterError

import apt_plugins
from apt_plugins import Adapter, NoAdapterFoundError, UnknownAdapterError, hookimpl
from apt_plugins import manager as manager_mod
from apt_plugins.manager import AUTOLOAD_ENV, BLOCK_ENV, ENTRY_POINT_GROUP, PluginManager

FIXTURES = Path(__file__).parent / "fixtures"
FAKE_MODULES = ("fakeplug_good", "fakeplug_broken", "typoplug_mod")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    """Every test starts with no block list and autoload enabled; fixture modules are forgotten after."""
    monkeypatch.delenv(BLOCK_ENV, raising=False)
    monkeypatch.delenv(AUTOLOAD_ENV, raising=False)
    yield
    for name in FAKE_MODULES:
        sys.modules.pop(name, None)


class ToyPolicy:
    is_toy = True


class ToyAdapter(Adapter):
    name = "toy_one"
    host = "torch"
    supported_host_versions = ">=2"
    description = "toy adapter one"

    def matches(self, policy):
        return getattr(policy, "is_toy", False)

    def module_groups(self, policy):
        return {}

    def inject(self, policy, config):
        pass


class ToyAdapterTwo(ToyAdapter):
    name = "toy_two"
    description = "toy adapter two"


class GoodPlugin:
    @hookimpl
    def apt_register_adapters(self, register):
        register(ToyAdapter)


class AnotherGoodPlugin:
    @hookimpl
    def apt_register_adapters(self, register):
        register(ToyAdapterTwo)


class RaisingPlugin:
    @hookimpl
    def apt_register_adapters(self, register):
        raise RuntimeError("boom while registering")


class TypoPlugin:
    @hookimpl
    def apt_regster_adapters(self, register):  # misspelled on purpose
        pass


def manual_manager() -> PluginManager:
    return PluginManager(autoload=False)


# --------------------------------------------------------------------------------------------------
# hand-registered plugins
# --------------------------------------------------------------------------------------------------
def test_manual_manager_has_only_the_defaults():
    pm = manual_manager()
    assert list(pm.plugins) == ["apt_plugins.defaults"]
    info = pm.plugins["apt_plugins.defaults"]
    assert info.source == "builtin" and info.error is None
    assert info.hooks == ["apt_param_groups", "apt_select_adapter"]
    assert len(pm.registry) == 0


def test_register_plugin_registers_its_adapters():
    pm = manual_manager()
    assert pm.register_plugin(GoodPlugin(), name="good") == "good"
    info = pm.plugins["good"]
    assert info.adapters == ["toy_one"]
    assert info.hooks == ["apt_register_adapters"]
    assert info.error is None and info.source == "registered"
    assert pm.registry.owner("toy_one") == "good"
    assert isinstance(pm.get_adapter("toy_one"), ToyAdapter)


def test_module_plugins_are_named_after_the_module():
    mod = types.ModuleType("my_apt_plugin_module")

    @hookimpl
    def apt_register_adapters(register):
        register(ToyAdapterTwo)

    mod.apt_register_adapters = apt_register_adapters
    pm = manual_manager()
    assert pm.register_plugin(mod) == "my_apt_plugin_module"
    assert pm.plugins["my_apt_plugin_module"].adapters == ["toy_two"]


@pytest.mark.parametrize("order", ["bad_first", "good_first"])
def test_a_raising_plugin_is_isolated(order):
    pm = manual_manager()
    plugins = [("bad", RaisingPlugin()), ("good", GoodPlugin())]
    if order == "good_first":
        plugins.reverse()
    for name, plugin in plugins:
        pm.register_plugin(plugin, name=name)
    assert pm.plugins["bad"].error == "apt_register_adapters failed: RuntimeError: boom while registering"
    assert pm.plugins["bad"].adapters == []
    assert pm.plugins["good"].error is None
    assert pm.registry.names() == ["toy_one"]


def test_an_invalid_adapter_is_reported_under_its_plugin():
    class BadName(ToyAdapter):
        name = "Bad-Name"

    class BadPlugin:
        @hookimpl
        def apt_register_adapters(self, register):
            register(BadName)

    pm = manual_manager()
    pm.register_plugin(BadPlugin(), name="bad_plugin")
    pm.register_plugin(AnotherGoodPlugin(), name="good")
    err = pm.plugins["bad_plugin"].error
    assert err.startswith("apt_register_adapters failed: AdapterValidationError: adapter 'Bad-Name' is invalid")
    assert "snake_case" in err
    assert pm.registry.names() == ["toy_two"]


def test_duplicate_adapter_names_across_plugins():
    pm = manual_manager()
    pm.register_plugin(GoodPlugin(), name="first")
    pm.register_plugin(GoodPlugin(), name="second")
    assert pm.plugins["first"].error is None
    err = pm.plugins["second"].error
    assert "already registered by plugin 'first'; plugin 'second' must choose another name" in err
    assert pm.registry.owner("toy_one") == "first"


def test_misspelled_hook_is_reported_and_the_plugin_dropped():
    pm = manual_manager()
    pm.register_plugin(TypoPlugin(), name="typo")
    pm.register_plugin(GoodPlugin(), name="good")
    assert "unknown hook 'apt_regster_adapters'" in pm.plugins["typo"].error
    assert pm.pm.get_plugin("typo") is None  # not left half-registered
    pm.pm.check_pending()  # nothing pending: the typo plugin is gone, the good one stays
    assert pm.registry.names() == ["toy_one"]


def test_misspelled_hook_in_an_entry_point_does_not_break_the_others(monkeypatch):
    monkeypatch.syspath_prepend(str(FIXTURES / "typoplug"))
    pm = PluginManager()
    broken = [info for info in pm.plugins.values() if info.error and "apt_regster_adapters" in info.error]
    assert len(broken) == 1
    assert {"lerobot_pi0", "lerobot_pi05"} <= set(pm.registry.names())


def test_unregister_plugin_removes_its_adapters():
    pm = manual_manager()
    pm.register_plugin(GoodPlugin(), name="good")
    pm.register_plugin(AnotherGoodPlugin(), name="other")
    pm.unregister_plugin("good")
    assert "good" not in pm.plugins
    assert pm.pm.get_plugin("good") is None
    assert pm.registry.names() == ["toy_two"]
    # the name and the adapter name are free again
    pm.register_plugin(GoodPlugin(), name="good")
    assert pm.plugins["good"].error is None
    assert pm.registry.owner("toy_one") == "good"
    pm.unregister_plugin("never_registered")  # no error


def test_failed_registration_under_a_taken_name_keeps_the_first_plugin():
    """Registering a second plugin under a name in use is refused and leaves the first plugin's record.

    (Regression: the record used to be overwritten before pluggy refused the name, so the first
    plugin's adapters outlived its unregistration.)
    """
    pm = manual_manager()
    pm.register_plugin(GoodPlugin(), name="dup")
    with pytest.raises(AdapterError, match="'dup' is already registered"):
        pm.register_plugin(AnotherGoodPlugin(), name="dup")
    assert pm.registry.names() == ["toy_one"]
    assert pm.plugins["dup"].adapters == ["toy_one"] and pm.plugins["dup"].error is None
    pm.unregister_plugin("dup")
    assert pm.pm.get_plugin("dup") is None
    assert "toy_one" not in pm.registry, "the adapter of the unregistered plugin is still registered"


def test_block_env_blocks_a_plugin_by_name(monkeypatch):
    monkeypatch.setenv(BLOCK_ENV, " other , good ")
    pm = manual_manager()
    assert pm.blocked == {"good", "other"}
    assert pm.register_plugin(GoodPlugin(), name="good") is None
    assert pm.plugins["good"].blocked is True
    assert pm.plugins["good"].adapters == []
    assert "toy_one" not in pm.registry
    assert pm.register_plugin(AnotherGoodPlugin(), name="fine") == "fine"
    assert pm.registry.names() == ["toy_two"]


# --------------------------------------------------------------------------------------------------
# selection
# --------------------------------------------------------------------------------------------------
def test_select_adapter_unknown_object():
    pm = manual_manager()
    pm.register_plugin(GoodPlugin(), name="good")
    with pytest.raises(
        NoAdapterFoundError, match=r"no APT adapter accepts a builtins\.object\. Registered adapters: toy_one\."
    ):
        pm.select_adapter(object())
    assert pm.select_adapter(ToyPolicy()).name == "toy_one"


def test_select_adapter_with_no_adapters():
    with pytest.raises(NoAdapterFoundError, match=r"accepts a .*ToyPolicy\. Registered adapters: \(none\)"):
        manual_manager().select_adapter(ToyPolicy())


def test_a_select_hook_overrides_the_default():
    class Chooser:
        @hookimpl
        def apt_select_adapter(self, policy, registry):
            return registry.get("toy_two") if getattr(policy, "is_toy", False) else None

    pm = manual_manager()
    pm.register_plugin(GoodPlugin(), name="good")  # toy_one matches first by default
    pm.register_plugin(AnotherGoodPlugin(), name="other")
    assert pm.select_adapter(ToyPolicy()).name == "toy_one"
    pm.register_plugin(Chooser(), name="chooser")
    assert pm.select_adapter(ToyPolicy()).name == "toy_two"


def test_get_adapter_unknown_name():
    pm = manual_manager()
    pm.register_plugin(GoodPlugin(), name="good")
    with pytest.raises(UnknownAdapterError, match="Did you mean 'toy_one'"):
        pm.get_adapter("toy_on")


# --------------------------------------------------------------------------------------------------
# entry points
# --------------------------------------------------------------------------------------------------
def test_entry_points_good_and_broken(monkeypatch):
    monkeypatch.syspath_prepend(str(FIXTURES / "fakeplug"))
    pm = PluginManager()
    good = pm.plugins["fake_good"]
    assert good.error is None
    assert good.source == "entry point (fakeplug 0.1)"
    assert good.adapters == ["fake_adapter"]
    assert pm.registry.owner("fake_adapter") == "fake_good"
    broken = pm.plugins["fake_broken"]
    assert broken.adapters == []
    assert broken.error == (
        "import failed: ImportError: fakeplug_broken needs the library 'not_installed_lib'"
    )
    # the in-tree plugin still loads next to them
    assert pm.plugins["lerobot_pi"].error is None
    assert {"lerobot_pi0", "lerobot_pi05", "fake_adapter"} <= set(pm.registry.names())


def test_block_env_skips_an_entry_point_without_importing_it(monkeypatch):
    monkeypatch.syspath_prepend(str(FIXTURES / "fakeplug"))
    monkeypatch.setenv(BLOCK_ENV, "fake_broken,fake_good")
    pm = PluginManager()
    for name in ("fake_broken", "fake_good"):
        assert pm.plugins[name].blocked is True
        assert pm.plugins[name].error is None
    assert "fakeplug_broken" not in sys.modules
    assert "fakeplug_good" not in sys.modules
    assert "fake_adapter" not in pm.registry


def test_block_env_blocks_the_in_tree_plugin(monkeypatch):
    monkeypatch.setenv(BLOCK_ENV, "lerobot_pi")
    pm = PluginManager()
    assert pm.plugins["lerobot_pi"].blocked is True
    assert "lerobot_pi0" not in pm.registry and "lerobot_pi05" not in pm.registry


@pytest.mark.parametrize("value", ["1", "true", "yes"])
def test_disable_autoload(monkeypatch, value):
    monkeypatch.syspath_prepend(str(FIXTURES / "fakeplug"))
    monkeypatch.setenv(AUTOLOAD_ENV, value)
    pm = PluginManager()
    assert list(pm.plugins) == ["apt_plugins.defaults"]
    assert len(pm.registry) == 0


def test_the_in_tree_plugin_is_an_entry_point():
    from importlib.metadata import entry_points

    eps = {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}
    assert eps.get("lerobot_pi") == "apt_plugins_lerobot_pi"


def test_default_manager_finds_the_lerobot_adapters(monkeypatch):
    monkeypatch.setattr(manager_mod, "_manager", None)
    pm = apt_plugins.get_plugin_manager()
    assert pm is apt_plugins.get_plugin_manager()  # process-wide
    info = pm.plugins["lerobot_pi"]
    assert info.error is None and not info.blocked
    assert info.adapters == ["lerobot_pi0", "lerobot_pi05"]
    assert info.source.startswith("entry point (apt-plugins ")
    for name, apt_type in (("lerobot_pi0", "apt_pi0"), ("lerobot_pi05", "apt_pi05")):
        adapter = pm.get_adapter(name)
        assert adapter.host == "lerobot"
        assert adapter.supported_host_versions == ">=0.6.1,<0.7"
        assert adapter.apt_policy_types == (apt_type,)
        assert pm.registry.owner(name) == "lerobot_pi"
    manager_mod.reset_plugin_manager()
    assert manager_mod._manager is None
    assert apt_plugins.get_plugin_manager() is not pm

