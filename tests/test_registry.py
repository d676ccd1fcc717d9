"""AdapterRegistry: validation at registration, lookups with suggestions, and the Adapter contract."""

from __future__ import annotations

import re

import pytest
from torch import nn

from apt_plugins import Adapter, AdapterValidationError, HostVersionError, UnknownAdapterError
from apt_plugins.errors import AdapterError
from apt_plugins.registry import AdapterRegistry


class TinyPolicy(nn.Module):
    def __init__(self):
        super().__init__()
        self.vlm = nn.Linear(4, 4)
        self.expert = nn.Linear(4, 2)


class OtherPolicy(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(2, 2)


class ToyAdapter(Adapter):
    name = "toy_vla"
    host = "torch"
    supported_host_versions = ">=2"
    description = "a toy policy with vlm and expert submodules"
    policy_types = ("tiny",)

    def matches(self, policy):
        return isinstance(policy, TinyPolicy)

    def module_groups(self, policy):
        return {"language_model": ["vlm"], "action_expert": ["expert"]}

    def inject(self, policy, config):
        pass


def make_adapter(**attrs):
    """A subclass of ToyAdapter with some class attributes overridden."""
    return type("Variant", (ToyAdapter,), attrs)


def test_minimal_adapter_registers():
    reg = AdapterRegistry()
    inst = reg.register(ToyAdapter, plugin="toy_plugin")
    assert isinstance(inst, ToyAdapter)
    assert reg.get("toy_vla") is inst
    assert reg.owner("toy_vla") == "toy_plugin"
    assert reg.names() == ["toy_vla"]
    assert len(reg) == 1 and "toy_vla" in reg and "nope" not in reg
    assert list(reg) == [inst]
    assert repr(inst) == "<ToyAdapter 'toy_vla'>"


def test_instances_register_too():
    reg = AdapterRegistry()
    inst = ToyAdapter()
    assert reg.register(inst) is inst
    assert reg.owner("toy_vla") == "<direct>"


def test_find_uses_matches():
    reg = AdapterRegistry()
    inst = reg.register(ToyAdapter)
    assert reg.find(TinyPolicy()) is inst
    assert reg.find(OtherPolicy()) is None
    assert reg.find(object()) is None


@pytest.mark.parametrize("bad", ["Toy", "toy-vla", "toy__vla", "_toy", "toy_", "1toy", "toy vla", "tOy"])
def test_bad_names_rejected(bad):
    with pytest.raises(AdapterValidationError, match="lowercase snake_case") as info:
        AdapterRegistry().register(make_adapter(name=bad))
    assert info.value.adapter == bad
    assert str(info.value).startswith(f"adapter {bad!r} is invalid:")


@pytest.mark.parametrize("good", ["toy", "toy2", "lerobot_pi05", "a_b_c"])
def test_good_names_accepted(good):
    assert AdapterRegistry().register(make_adapter(name=good)).name == good


@pytest.mark.parametrize("attr", ["host", "supported_host_versions", "description"])
@pytest.mark.parametrize("value", [None, "", "   ", 3])
def test_required_attributes(attr, value):
    cls = make_adapter(**{attr: value})
    with pytest.raises(
        AdapterValidationError, match=re.escape(f"class attribute {attr!r} must be a non-empty string (got {value!r})")
    ) as info:
        AdapterRegistry().register(cls)
    assert info.value.adapter == "toy_vla"


def test_missing_name_is_reported_by_class_name():
    class Nameless(Adapter):
        host = "torch"
        supported_host_versions = ">=2"
        description = "no name"

        def matches(self, policy):
            return False

        def module_groups(self, policy):
            return {}

        def inject(self, policy, config):
            pass

    with pytest.raises(
        AdapterValidationError, match=r"adapter 'test_missing_name.*Nameless' is invalid: class attribute 'name'"
    ):
        AdapterRegistry().register(Nameless)


@pytest.mark.parametrize("spec", ["0.6.1", "lerobot>=0.6", ">=0.6,<<0.7", "latest"])
def test_bad_specifier_rejected(spec):
    with pytest.raises(AdapterValidationError, match=rf"supported_host_versions='{re.escape(spec)}' is not a PEP 440"):
        AdapterRegistry().register(make_adapter(supported_host_versions=spec))


@pytest.mark.parametrize(
    ("remove", "expected"),
    [(("matches",), "matches"), (("inject",), "inject"), (("module_groups", "inject"), "module_groups, inject")],
)
def test_missing_methods_rejected(remove, expected):
    attrs = {"name": "half_done", "host": "torch", "supported_host_versions": ">=2", "description": "x"}
    for method in ("matches", "module_groups", "inject"):
        if method not in remove:
            attrs[method] = lambda self, *a: None
    cls = type("HalfDone", (Adapter,), attrs)
    with pytest.raises(AdapterValidationError, match=rf"adapter 'half_done' is invalid: must implement {expected}\.$"):
        AdapterRegistry().register(cls)


def test_parameter_prefix_must_start_with_apt():
    with pytest.raises(AdapterValidationError, match="parameter_prefix must start with 'apt_'"):
        AdapterRegistry().register(make_adapter(parameter_prefix="extra_"))


def test_duplicate_name_names_both_plugins():
    reg = AdapterRegistry()
    reg.register(ToyAdapter, plugin="first_plugin")
    with pytest.raises(
        AdapterValidationError,
        match=r"already registered by plugin 'first_plugin'; plugin 'second_plugin' must choose another name",
    ):
        reg.register(make_adapter(description="another"), plugin="second_plugin")
    # the first registration is intact
    assert reg.owner("toy_vla") == "first_plugin"
    assert type(reg.get("toy_vla")) is ToyAdapter


def test_non_adapter_rejected():
    class NotAnAdapter:
        name = "imposter"
        host = "torch"
        supported_host_versions = ">=2"
        description = "duck typed"

        def matches(self, policy):
            return True

        def module_groups(self, policy):
            return {}

        def inject(self, policy, config):
            pass

    with pytest.raises(AdapterValidationError, match=r"adapter 'imposter' is invalid: .*NotAnAdapter must subclass apt_plugins\.Adapter"):
        AdapterRegistry().register(NotAnAdapter)
    with pytest.raises(AdapterValidationError, match="must subclass apt_plugins.Adapter"):
        AdapterRegistry().register(NotAnAdapter())


def test_failed_validation_registers_nothing():
    reg = AdapterRegistry()
    with pytest.raises(AdapterValidationError):
        reg.register(make_adapter(name="Bad"))
    assert len(reg) == 0


def test_unknown_name_did_you_mean():
    reg = AdapterRegistry()
    reg.register(ToyAdapter)
    reg.register(make_adapter(name="lerobot_pi05"))
    with pytest.raises(UnknownAdapterError, match=r"unknown adapter 'toy_vl'\. Did you mean 'toy_vla'\?") as info:
        reg.get("toy_vl")
    err = info.value
    assert err.known == ["lerobot_pi05", "toy_vla"]
    assert "Known adapters: lerobot_pi05, toy_vla" in str(err)
    assert "apt-plugins list" in str(err)
    # catchable as KeyError and AdapterError, and str() is the message, not its repr
    assert isinstance(err, KeyError) and isinstance(err, AdapterError)
    assert str(err).startswith("unknown adapter 'toy_vl'")


def test_unknown_name_without_suggestion():
    reg = AdapterRegistry()
    with pytest.raises(UnknownAdapterError, match=r"unknown adapter 'gr00t'\. Known adapters: \(none\)") as info:
        reg.get("gr00t")
    assert "Did you mean" not in str(info.value)


def test_unregister():
    reg = AdapterRegistry()
    reg.register(ToyAdapter, plugin="p")
    reg.unregister("toy_vla")
    assert "toy_vla" not in reg
    reg.unregister("toy_vla")  # idempotent
    reg.register(ToyAdapter, plugin="q")  # name is free again
    assert reg.owner("toy_vla") == "q"


def test_base_adapter_contract():
    base = Adapter()
    with pytest.raises(NotImplementedError):
        base.matches(None)
    with pytest.raises(NotImplementedError):
        base.module_groups(None)
    with pytest.raises(NotImplementedError):
        base.inject(None, None)
    inst = ToyAdapter()
    with pytest.raises(NotImplementedError, match="does not support vlm_mode='lora'"):
        inst.lora_targets(None, None)
    assert inst.gate_values(None) == {}
    assert inst.conformance_kit() is None


def test_check_host_version():
    from importlib.metadata import version

    assert ToyAdapter().host_version() == version("torch")
    ToyAdapter().check_host_version()  # torch >= 2 is installed
    too_new = make_adapter(name="too_new", supported_host_versions="<1")()
    with pytest.raises(HostVersionError, match=r"adapter 'too_new' supports torch <1, but version .* is installed") as info:
        too_new.check_host_version()
    assert info.value.supported == "<1" and info.value.host == "torch"
    assert "pip install 'torch<1'" in str(info.value)
    absent = make_adapter(name="absent", host="apt-no-such-host-package")()
    assert absent.host_version() is None
    with pytest.raises(HostVersionError, match="apt-no-such-host-package >=2, but it is not installed"):
        absent.check_host_version()
