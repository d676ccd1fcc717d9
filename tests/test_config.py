"""AptConfig: defaults, validation at the boundary, AptSettings mirror, immutability."""

from __future__ import annotations

import dataclasses
import re

import pytest
from pydantic import ValidationError

from apt_plugins import AptConfig, AptConfigError, AptError, AptSettings
from apt_plugins.config import settings_dataclass


def test_defaults():
    cfg = AptConfig()
    assert cfg.stage == 1
    assert cfg.vlm_mode == "frozen"
    assert cfg.vlm_lr_multiplier == 0.1
    assert cfg.vlm_weight_decay == 1e-10
    assert cfg.fusion_lr_multiplier == 1.0
    assert cfg.gate_granularity == "channel"
    assert cfg.gate_init_logit == 0.0
    assert cfg.fusion_zero_init is True
    assert cfg.fusion_source_layers is None
    assert cfg.fusion_context == "all"
    assert cfg.inherited_layers_keep_language_mask is True
    assert cfg.language_mask_scope == "task"
    assert cfg.lora_rank == 16
    assert cfg.lora_alpha == 16
    assert cfg.lora_targets is None
    assert cfg.check_frozen is False
    assert cfg.masks_language_in_inherited_layers is True


@pytest.mark.parametrize(
    ("field", "bad", "allowed"),
    [
        ("stage", 3, "allowed values: 1, 2."),
        ("stage", 0, "allowed values: 1, 2."),
        ("vlm_mode", "bogus", "allowed values: 'frozen', 'lora', 'full'."),
        ("gate_granularity", "per_head", "allowed values: 'scalar', 'channel'."),
        ("fusion_context", "images", "allowed values: 'all', 'language'."),
        ("language_mask_scope", "everything", "allowed values: 'task', 'prompt'."),
    ],
)
def test_literal_fields_reject_bad_values(field, bad, allowed):
    data = {"stage": 2, field: bad} if field != "stage" else {field: bad}
    with pytest.raises(AptConfigError, match=re.escape(f"apt.{field}={bad!r}")) as info:
        AptConfig.parse(data)
    err = info.value
    assert err.field == f"apt.{field}"
    assert err.value == bad
    assert allowed in str(err)
    assert allowed in err.fix
    # the taxonomy: an AptError, deliberately not a ValueError (draccus would hide the message)
    assert isinstance(err, AptError)
    assert not isinstance(err, ValueError)


def test_prefix_is_used_in_the_dotted_path():
    with pytest.raises(AptConfigError, match=re.escape("policy.apt.vlm_mode='nope'")) as info:
        AptConfig.parse({"stage": 2, "vlm_mode": "nope"}, prefix="policy.apt")
    assert info.value.field == "policy.apt.vlm_mode"


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_stage1_rejects_trainable_vlm(mode):
    with pytest.raises(AptConfigError, match=rf"apt\.vlm_mode='{mode}'.*not allowed in stage 1") as info:
        AptConfig.parse({"stage": 1, "vlm_mode": mode})
    assert info.value.field == "apt.vlm_mode"
    assert info.value.value == mode
    assert "vlm_mode='frozen'" in info.value.fix
    # also via the default stage
    with pytest.raises(AptConfigError, match="not allowed in stage 1"):
        AptConfig.parse({"vlm_mode": mode})


@pytest.mark.parametrize("mode", ["frozen", "lora", "full"])
def test_stage2_accepts_every_vlm_mode(mode):
    assert AptConfig.parse({"stage": 2, "vlm_mode": mode}).vlm_mode == mode


def test_unknown_field_did_you_mean():
    with pytest.raises(AptConfigError, match=r"apt\.stag=2\. unknown APT field\. Did you mean 'stage'\?") as info:
        AptConfig.parse({"stag": 2})
    assert info.value.field == "apt.stag"
    assert "Known fields: stage, vlm_mode" in str(info.value)


def test_unknown_field_without_close_match_lists_fields():
    with pytest.raises(AptConfigError, match="unknown APT field. Known fields:") as info:
        AptConfig.parse({"zzzzzzzz": 1})
    assert "Did you mean" not in str(info.value)


def test_negative_fusion_source_layers_rejected():
    with pytest.raises(AptConfigError, match=r"apt\.fusion_source_layers=\[0, -1\].*non-negative") as info:
        AptConfig.parse({"stage": 2, "fusion_source_layers": [0, -1]})
    assert info.value.field == "apt.fusion_source_layers"
    assert AptConfig.parse({"stage": 2, "fusion_source_layers": [0, 3]}).fusion_source_layers == (0, 3)


def test_nested_error_path_names_the_element():
    with pytest.raises(AptConfigError, match=r"apt\.fusion_source_layers\.1=.*valid integer"):
        AptConfig.parse({"stage": 2, "fusion_source_layers": [0, "x"]})


@pytest.mark.parametrize(
    ("field", "bad"),
    [("vlm_lr_multiplier", 0), ("fusion_lr_multiplier", -1.0), ("vlm_weight_decay", -1e-3), ("lora_rank", 0),
     ("lora_alpha", 0)],
)
def test_numeric_bounds(field, bad):
    with pytest.raises(AptConfigError, match=rf"apt\.{field}=.*greater than"):
        AptConfig.parse({"stage": 2, field: bad})


def test_parse_non_mapping():
    with pytest.raises(AptConfigError, match="expected a mapping of APT fields"):
        AptConfig.parse(42)


def test_parse_passes_configs_through():
    cfg = AptConfig(stage=2)
    assert AptConfig.parse(cfg) is cfg


def test_settings_dataclass_mirrors_fields_and_defaults():
    assert dataclasses.is_dataclass(AptSettings)
    names = [f.name for f in dataclasses.fields(AptSettings)]
    assert names == list(AptConfig.model_fields)
    settings = AptSettings()
    for f in dataclasses.fields(AptSettings):
        assert getattr(settings, f.name) == getattr(AptConfig(), f.name), f.name
    # Literal types map to the plain type a CLI parser understands
    types = {f.name: f.type for f in dataclasses.fields(AptSettings)}
    assert types["stage"] is int
    assert types["vlm_mode"] is str
    assert types["fusion_zero_init"] is bool


def test_settings_round_trip():
    cfg = AptConfig(
        stage=2,
        vlm_mode="lora",
        gate_granularity="scalar",
        gate_init_logit=-2.0,
        fusion_source_layers=[0, 2, 4],
        lora_targets=["q_proj", "v_proj"],
        language_mask_scope="prompt",
    )
    settings = cfg.to_settings()
    assert isinstance(settings, AptSettings)
    assert settings.stage == 2 and settings.fusion_source_layers == [0, 2, 4]
    back = AptConfig.from_settings(settings)
    assert back == cfg
    assert AptConfig.from_settings(AptSettings()) == AptConfig()


def test_from_settings_validates():
    settings = AptSettings(stage=1, vlm_mode="full")
    with pytest.raises(AptConfigError, match=r"apt\.vlm_mode='full'.*not allowed in stage 1"):
        AptConfig.from_settings(settings)
    with pytest.raises(AptConfigError, match=r"policy\.apt\.gate_granularity='x'"):
        AptConfig.from_settings(AptSettings(gate_granularity="x"), prefix="policy.apt")


def test_settings_instances_do_not_share_mutable_state():
    a, b = AptSettings(), AptSettings()
    a.stage = 2
    assert b.stage == 1


def test_settings_dataclass_uses_factories_for_list_defaults():
    from pydantic import BaseModel

    class M(BaseModel):
        xs: list[int] = [1, 2]

    cls = settings_dataclass(M, "MSettings")
    one, two = cls(), cls()
    assert one.xs == [1, 2]
    one.xs.append(3)
    assert two.xs == [1, 2]


def test_replace():
    cfg = AptConfig()
    new = cfg.replace(stage=2, vlm_mode="full")
    assert (new.stage, new.vlm_mode) == (2, "full")
    assert (cfg.stage, cfg.vlm_mode) == (1, "frozen")  # original untouched
    assert new.vlm_lr_multiplier == cfg.vlm_lr_multiplier
    with pytest.raises(AptConfigError, match=r"apt\.vlm_mode='lora'.*not allowed in stage 1"):
        cfg.replace(vlm_mode="lora")
    with pytest.raises(AptConfigError, match="Did you mean 'stage'"):
        cfg.replace(stagee=2)


def test_frozen_model_is_immutable():
    cfg = AptConfig()
    with pytest.raises(ValidationError, match="frozen"):
        cfg.stage = 2
    with pytest.raises(ValidationError, match="frozen"):
        cfg.vlm_mode = "full"
    assert cfg.stage == 1 and cfg.vlm_mode == "frozen"


def test_equality_is_by_value():
    assert AptConfig(stage=2) == AptConfig.parse({"stage": 2})
    assert AptConfig(stage=2) != AptConfig(stage=1)


def test_masks_language_in_inherited_layers():
    assert AptConfig(stage=1, inherited_layers_keep_language_mask=False).masks_language_in_inherited_layers
    assert AptConfig(stage=2).masks_language_in_inherited_layers
    assert not AptConfig(stage=2, inherited_layers_keep_language_mask=False).masks_language_in_inherited_layers
