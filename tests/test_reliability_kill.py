"""SIGKILL during every kind of checkpoint write: the result is complete or refused, the previous one intact.

Each scenario interrupts the real write (LeRobot 0.6.1's own ``save_checkpoint`` of an APT policy,
``retrofit``, a Stage 1 -> 2 promotion) once before *every* filesystem operation it makes, and at
seeded random instants (tests/fixtures/reliability_harness.py). After each kill the output must be
absent, complete and loading strictly to the exact weights that were being saved, or refused with a
``CheckpointMismatchError``; the input and the previous checkpoint must be byte-identical. Tiny real
pi0 policies from the adapter's conformance kit, CPU. The DeepSpeed consolidation is killed in
tests/test_reliability_resume.py (it needs a distributed run).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from apt_plugins import AptConfig, CheckpointMismatchError, get_plugin_manager
from apt_plugins.atomic import INCOMPLETE_MARKER, temporaries
from fixtures.reliability_harness import kill_trials, run_child, tree_digest

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="fork-based fault injection needs POSIX")

SEED = 1313  # the random kill instants; fixed so a failure reproduces
RANDOM_TRIALS = 12


@pytest.fixture(scope="module")
def kit():
    torch.set_num_threads(1)
    return get_plugin_manager().get_adapter("lerobot_pi0").conformance_kit()


def _step(kit, policy, optimizer, seed):
    loss = kit.loss(policy, kit.make_batch(seed=seed), seed=seed)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def _train_config(policy, output_dir):
    from lerobot.configs.default import DatasetConfig
    from lerobot.configs.train import TrainPipelineConfig

    return TrainPipelineConfig(dataset=DatasetConfig(repo_id="local/apt_demo"), policy=policy.config,
                               output_dir=output_dir)


def _state(policy):
    return {k: v.detach().clone() for k, v in policy.state_dict().items()}


def _classify(kit, directory: Path, apt: AptConfig, expected: dict) -> str:
    """absent | complete (loads strictly, bit-exact) | refused (CheckpointMismatchError); else fail."""
    if not directory.exists():
        return "absent"
    try:
        loaded = kit.load(directory, apt)
    except CheckpointMismatchError as exc:
        assert "nothing was loaded" in str(exc)
        return "refused"
    got = loaded.state_dict()
    assert set(got) == set(expected), f"{directory}: loaded other tensors than were saved"
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), f"{directory}: {name} loaded with other values than were saved"
    return "complete"


def test_killed_lerobot_checkpoint_save_of_an_apt_policy(kit, tmp_path):
    from lerobot.common.train_utils import save_checkpoint, update_last_checkpoint

    policy = kit.build(AptConfig(stage=1))
    optimizer = torch.optim.AdamW(policy.get_optim_params(), lr=1e-3)
    _step(kit, policy, optimizer, seed=1)
    template, run = tmp_path / "template", tmp_path / "run"
    cfg = _train_config(policy, run)
    first = template / "checkpoints" / "000001"
    save_checkpoint(first, 1, cfg, policy, optimizer, None)
    update_last_checkpoint(first)
    previous = tree_digest(first)
    step1 = _state(policy)
    _step(kit, policy, optimizer, seed=2)
    step2 = _state(policy)
    checkpoints = run / "checkpoints"
    lerobot_files = ["pretrained_model/train_config.json", "training_state/optimizer_state.safetensors",
                     "training_state/rng_state.safetensors", "training_state/training_step.json"]

    def reset():
        shutil.rmtree(run, ignore_errors=True)
        shutil.copytree(template, run, symlinks=True)

    def action():
        target = checkpoints / "000002"
        save_checkpoint(target, 2, cfg, policy, optimizer, None)
        update_last_checkpoint(target)

    def check(how):
        assert tree_digest(checkpoints / "000001") == previous, "the previous checkpoint was changed"
        outcome = _classify(kit, checkpoints / "000002" / "pretrained_model", AptConfig(stage=1), step2)
        last = checkpoints / "last"
        if not last.is_symlink():
            # LeRobot's update_last_checkpoint unlinks `last` before creating the new link.
            return outcome + ", last missing"
        target = os.readlink(last)
        assert target in ("000001", "000002"), target
        if target == "000002":  # LeRobot moves `last` only after save_checkpoint returned
            assert outcome == "complete" and all((checkpoints / "000002" / f).is_file() for f in lerobot_files)
        if how == "finished":
            assert outcome == "complete" and target == "000002"
        return outcome + f", last -> {target}"

    outcomes = kill_trials(action, reset, check, seed=SEED, random_trials=RANDOM_TRIALS, name="lerobot_save")
    print(dict(outcomes))
    assert outcomes["kills"] >= outcomes["filesystem_operations"] > 5
    assert outcomes["complete, last -> 000002"] and outcomes["refused, last -> 000001"]
    # The previous checkpoint still loads, bit-exact.
    assert _classify(kit, checkpoints / "000001" / "pretrained_model", AptConfig(stage=1), step1) == "complete"


def test_killed_retrofit_leaves_out_absent_or_complete(kit, tmp_path):
    from apt_plugins.lerobot.retrofit import retrofit

    stock = kit.build(None, seed=3)
    source = tmp_path / "plain"
    stock.save_pretrained(source)
    original = tree_digest(source)
    work = tmp_path / "work"
    work.mkdir()
    out = work / "out"
    torch.manual_seed(0)
    with kit.construction():
        retrofit(source, tmp_path / "expected", stage=2, probe=False)
    expected = _state(kit.load(tmp_path / "expected", AptConfig(stage=2)))

    def reset():  # every trial starts from the same state, so kill point n is the same operation
        shutil.rmtree(out, ignore_errors=True)
        for leftover in temporaries(work):
            shutil.rmtree(leftover)

    def action():  # the probe writes nothing (it only costs time), so trials skip it
        with kit.construction():
            retrofit(source, out, stage=2, probe=False)

    def check(how):
        assert tree_digest(source) == original, "retrofit changed its source"
        outcome = _classify(kit, out, AptConfig(stage=2), expected)
        assert outcome != "refused", "retrofit left a partial OUT"
        if how == "finished":
            assert outcome == "complete"
        return outcome

    outcomes = kill_trials(action, reset, check, seed=SEED, random_trials=RANDOM_TRIALS, name="retrofit")
    print(dict(outcomes))
    assert outcomes["absent"] and outcomes["complete"] and outcomes["kills"] > 5
    # A killed writer leaves a hidden temporary; the next retrofit into the same parent removes it.
    reset()
    assert run_child(action, kill_at=outcomes["filesystem_operations"] // 2)[0] == "killed"
    assert temporaries(work) and not out.exists()
    with kit.construction():
        retrofit(source, out, stage=2, probe=False)
    assert temporaries(work) == []


def test_killed_promotion_never_touches_the_stage1_parent(kit, tmp_path):
    parent = tmp_path / "stage1"
    policy = kit.build(AptConfig(stage=1), seed=5)
    kit.save(policy, parent)
    original = tree_digest(parent)
    out = tmp_path / "stage2"

    def promote():
        torch.manual_seed(7)  # the fusion layers' initialisation; the same in every trial
        return kit.load(parent, AptConfig(stage=2))

    expected = _state(promote())

    def reset():
        shutil.rmtree(out, ignore_errors=True)
        for leftover in temporaries(tmp_path):
            shutil.rmtree(leftover)

    def action():
        promote().save_pretrained(out)

    def check(how):
        assert tree_digest(parent) == original, "the promotion changed its Stage-1 parent"
        assert not (parent / INCOMPLETE_MARKER).exists()
        outcome = _classify(kit, out, AptConfig(stage=2), expected)
        if how == "finished":
            assert outcome == "complete"
        return outcome

    outcomes = kill_trials(action, reset, check, seed=SEED, random_trials=RANDOM_TRIALS, name="promotion")
    print(dict(outcomes))
    assert outcomes["complete"] and (outcomes["absent"] + outcomes["refused"]) and outcomes["kills"] > 3
