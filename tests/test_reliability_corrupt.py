"""Corrupt, partial and foreign checkpoints are refused with a named cause, and nothing is written.

Every case starts from a real checkpoint of a tiny APT pi0 policy (the adapter's conformance kit),
damages it one way, and loads it through the APT policy's ``from_pretrained`` (what lerobot-train,
lerobot-eval and ``apt-plugins verify`` call) or retrofits it. The refusal must be a
``CheckpointMismatchError`` whose message names the cause; the directory must be byte-identical
afterwards and nothing may appear next to it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from apt_plugins import AptConfig, CheckpointMismatchError, IncompleteCheckpointError, get_plugin_manager
from apt_plugins.atomic import INCOMPLETE_MARKER
from fixtures.reliability_harness import tree_digest


@pytest.fixture(scope="module")
def kit():
    return get_plugin_manager().get_adapter("lerobot_pi0").conformance_kit()


@pytest.fixture(scope="module")
def checkpoints(kit, tmp_path_factory):
    """Pristine Stage-1 and Stage-2 checkpoints, a plain pi0 one and a pi0.5 APT one (never modified)."""
    root = tmp_path_factory.mktemp("pristine")
    kit.save(kit.build(AptConfig(stage=1)), root / "s1")
    kit.save(kit.load(root / "s1", AptConfig(stage=2)), root / "s2")
    kit.build(None, seed=3).save_pretrained(root / "plain")
    kit05 = get_plugin_manager().get_adapter("lerobot_pi05").conformance_kit()
    kit05.save(kit05.build(AptConfig(stage=1)), root / "pi05")
    return root


def _copy(checkpoints: Path, name: str, tmp_path: Path) -> Path:
    target = tmp_path / "case" / name
    shutil.copytree(checkpoints / name, target)
    return target


def _refused(kit, directory: Path, stage: int, match: str, error=CheckpointMismatchError) -> str:
    before = tree_digest(directory.parent)
    with pytest.raises(error, match=match) as info:
        kit.load(directory, AptConfig(stage=stage))
    assert "nothing was loaded" in str(info.value)
    assert tree_digest(directory.parent) == before, "a refused load wrote or changed files"
    return str(info.value)


def _rewrite_weights(directory: Path, change) -> None:
    weights = load_file(str(directory / "model.safetensors"))
    change(weights)
    save_file(weights, str(directory / "model.safetensors"), metadata={"format": "pt"})


def test_pristine_checkpoints_load(kit, checkpoints):
    kit.load(checkpoints / "s1", AptConfig(stage=1))
    kit.load(checkpoints / "s1", AptConfig(stage=2))  # promotion
    kit.load(checkpoints / "s2", AptConfig(stage=2))
    kit.load(checkpoints / "plain", AptConfig(stage=1))


@settings(max_examples=25, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fraction=st.floats(min_value=0.0, max_value=1.0, exclude_max=True))
def test_truncated_weights_are_refused_at_any_length(kit, checkpoints, tmp_path, fraction):
    directory = tmp_path / f"trunc-{fraction!r}"
    shutil.copytree(checkpoints / "s2", directory)
    weights = directory / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: int(len(data) * fraction)])
    _refused(kit, directory, 2, r"model\.safetensors is unreadable")


@pytest.mark.parametrize("case, name, stage, match", [
    # APT checkpoints: the manifest records the dtypes, so any conversion is caught.
    ("float_as_int", "s1", 1, r"holds 74 tensors with dtypes \{'f32': 73, 'i32': 1\}, but apt_manifest\.json recorded"),
    ("float_as_half", "s1", 1, r"holds .* tensors with dtypes .*'f16': 1.*recorded"),
    ("fusion_as_half", "s2", 2, r"holds .* tensors with dtypes .*'f16': 1.*recorded"),
    # A plain checkpoint has no manifest: the strict loader refuses a float tensor stored as integers.
    ("float_as_int", "plain", 1, r"(?s)shape mismatch \(1 tensors\).*checkpoint dtype torch\.int32 vs model torch\.float32"),
])
def test_wrong_dtype_is_refused(kit, checkpoints, tmp_path, case, name, stage, match):
    directory = _copy(checkpoints, name, tmp_path)

    def change(weights):
        pick = ".apt_fusion." if case == "fusion_as_half" else "gemma_expert"
        key = next(k for k, v in weights.items() if pick in k and v.is_floating_point())
        weights[key] = weights[key].to(torch.int32 if case == "float_as_int" else torch.float16)

    _rewrite_weights(directory, change)
    _refused(kit, directory, stage, match)


def test_a_renamed_tensor_is_refused(kit, checkpoints, tmp_path):
    directory = _copy(checkpoints, "s1", tmp_path)
    key = next(k for k in load_file(str(directory / "model.safetensors")) if "gemma_expert" in k)
    _rewrite_weights(directory, lambda w: w.__setitem__(key + "_renamed", w.pop(key)))
    message = _refused(kit, directory, 1, r"missing from the checkpoint \(1 tensors\)")
    assert "unexpected in the checkpoint (1 tensors)" in message and key in message


def test_a_renamed_fusion_tensor_contradicts_the_manifest(kit, checkpoints, tmp_path):
    directory = _copy(checkpoints, "s2", tmp_path)
    key = next(k for k in load_file(str(directory / "model.safetensors")) if ".apt_fusion." in k)
    _rewrite_weights(directory, lambda w: w.__setitem__(key.rsplit(".", 1)[0] + ".renamed", w.pop(key)))
    _refused(kit, directory, 2, r"apt_manifest\.json \(stage 2\) disagrees with model\.safetensors")


def test_a_manifest_from_another_checkpoint_is_refused(kit, checkpoints, tmp_path):
    # The Stage-1 manifest next to Stage-2 weights: the fusion tensors are not in it.
    directory = _copy(checkpoints, "s2", tmp_path)
    shutil.copy(checkpoints / "s1" / "apt_manifest.json", directory / "apt_manifest.json")
    message = _refused(kit, directory, 2, r"apt_manifest\.json \(stage 1\) disagrees with model\.safetensors")
    assert "unexpected in the checkpoint (8 tensors)" in message


def test_weights_with_fusion_tensors_removed_contradict_the_manifest(kit, checkpoints, tmp_path):
    directory = _copy(checkpoints, "s2", tmp_path)
    _rewrite_weights(directory, lambda w: [w.pop(k) for k in list(w) if ".apt_fusion.0." in k])
    _refused(kit, directory, 2, r"disagrees with model\.safetensors")


def test_a_config_of_another_policy_type_is_refused(kit, checkpoints, tmp_path):
    directory = _copy(checkpoints, "s1", tmp_path)
    shutil.copy(checkpoints / "pi05" / "config.json", directory / "config.json")
    _refused(kit, directory, 1, r"config\.json is for policy type 'apt_pi05', not 'apt_pi0' or 'pi0'")


def test_a_manifest_of_another_policy_type_is_refused(kit, checkpoints, tmp_path):
    directory = _copy(checkpoints, "s1", tmp_path)
    manifest = json.loads((directory / "apt_manifest.json").read_text())
    (directory / "apt_manifest.json").write_text(json.dumps({**manifest, "policy_type": "apt_pi05"}))
    _refused(kit, directory, 1, r"apt_manifest\.json is for policy type 'apt_pi05', not 'apt_pi0'")


@pytest.mark.parametrize("damage, match, error", [
    ("marker", r"is incomplete; nothing was loaded\. It holds \.apt_incomplete", IncompleteCheckpointError),
    ("no_manifest", r"Its config\.json says 'apt_pi0' but there is no apt_manifest\.json", IncompleteCheckpointError),
    ("no_weights", r"no model\.safetensors in", CheckpointMismatchError),
    ("no_config", r"no config\.json in", CheckpointMismatchError),
    ("corrupt_manifest", r"apt_manifest\.json is corrupt", CheckpointMismatchError),
    ("corrupt_config", r"config\.json is corrupt", CheckpointMismatchError),
])
def test_partial_checkpoints_are_refused(kit, checkpoints, tmp_path, damage, match, error):
    directory = _copy(checkpoints, "s1", tmp_path)
    if damage == "marker":
        (directory / INCOMPLETE_MARKER).write_text("")
    elif damage == "no_manifest":
        (directory / "apt_manifest.json").unlink()
    elif damage == "no_weights":
        (directory / "model.safetensors").unlink()
    elif damage == "no_config":
        (directory / "config.json").unlink()
    elif damage == "corrupt_manifest":
        (directory / "apt_manifest.json").write_text('{"stage": 1, ')
    else:
        (directory / "config.json").write_text("{ not json")
    _refused(kit, directory, 1, match, error)


def test_a_temporary_directory_is_refused(kit, checkpoints, tmp_path):
    directory = tmp_path / "case" / ".s1.apt-tmp-host-99999-abcd1234"
    shutil.copytree(checkpoints / "s1", directory)
    _refused(kit, directory, 1, r"temporary directory of a write that did not finish", IncompleteCheckpointError)


@pytest.mark.parametrize("damage, match", [
    ("truncated", r"model\.safetensors is corrupt or unreadable"),
    ("renamed", r"missing from the checkpoint \(1 tensors\)"),
    ("float_as_int", r"checkpoint dtype torch\.int32 vs model torch\.float32"),
])
def test_retrofit_refuses_a_corrupt_source_and_writes_nothing(kit, checkpoints, tmp_path, damage, match):
    from apt_plugins.lerobot.retrofit import retrofit

    source = _copy(checkpoints, "plain", tmp_path)
    if damage == "truncated":
        data = (source / "model.safetensors").read_bytes()
        (source / "model.safetensors").write_bytes(data[: len(data) // 2])
    else:
        def change(weights):
            key = next(k for k, v in weights.items() if "gemma_expert" in k and v.is_floating_point())
            if damage == "renamed":
                weights[key + "_renamed"] = weights.pop(key)
            else:
                weights[key] = weights[key].to(torch.int32)

        _rewrite_weights(source, change)
    out_parent = tmp_path / "outputs"
    out_parent.mkdir()
    with kit.construction(), pytest.raises(CheckpointMismatchError, match=match):
        retrofit(source, out_parent / "out", stage=2)
    assert list(out_parent.iterdir()) == [], "retrofit wrote something for a corrupt source"
