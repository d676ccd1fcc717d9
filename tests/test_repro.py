"""``apt-plugins repro``: the task, the expert, the config boundary, and the whole pipeline in quick mode.

The quick run trains every arm on the real LeRobot ``PI0Policy`` / ``APTPI0Policy`` classes for a
handful of steps: it checks the pipeline (datasets, VLM cache, promotion, scoring, report), not
the result.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from apt_plugins import AptConfigError
from apt_plugins.cli import main
from apt_plugins.repro import world
from apt_plugins.repro.run import QUICK, ReproConfig


def test_expert_chunk_heads_for_the_target_and_can_be_inverted():
    rng = np.random.default_rng(0)
    for _ in range(20):
        start, target = rng.uniform(-1, 1, 2), rng.uniform(-1, 1, 2)
        chunk = world.expert_chunk(start, target)
        assert chunk.shape == (world.CHUNK, 2)
        # each waypoint is closer than the last, and the expert is Markov: restarting from the first
        # waypoint continues the same path
        dists = np.linalg.norm(chunk - target, axis=1)
        assert np.all(np.diff(dists) < 0)
        np.testing.assert_allclose(world.expert_chunk(chunk[0], target)[:-1], chunk[1:], atol=1e-5)
        np.testing.assert_allclose(world.target_from_chunk(start, chunk), target, atol=1e-5)


def test_instructions_layouts_and_rendering():
    rng = np.random.default_rng(1)
    assert world.instruction(("red", "ring")) == "pick the red ring"
    canonical = {"pick", "red", "green", "blue", "yellow", "purple", "orange", "block", "ring"}
    for _ in range(50):
        words = world.instruction(("blue", "block"), rng, "paraphrase").split()
        assert not canonical & set(words), words  # paraphrases use only words robot data never has
    for _ in range(200):
        layout = world.random_layout(rng)
        assert len(set(layout.cells)) == 3 and len({c for c, _ in layout.objects}) == 3
        assert not set(layout.objects) & world.HELD_OUT
    held = world.random_layout(rng, must_hold=("blue", "ring"))
    assert ("blue", "ring") in held.objects
    block = world.Layout((0, 5, 10), (("red", "block"), ("green", "block"), ("blue", "block")))
    ring = world.Layout((0, 5, 10), (("red", "ring"), ("green", "block"), ("blue", "block")))
    offsets = world.object_offsets(rng, 3)
    a = world.render(block, offsets, np.random.default_rng(2))
    b = world.render(ring, offsets, np.random.default_rng(2))
    assert a.shape == (world.IMAGE_SIZE, world.IMAGE_SIZE, 3) and a.dtype == np.uint8
    assert (a != b).any()
    centres = world.object_centres(block, offsets)
    assert world.nearest_object(centres, np.broadcast_to(centres, (3, 3, 2))).tolist() == [0, 1, 2]


def test_split_semantics():
    from apt_plugins.repro.data import SplitSizes, _episodes, post_layouts

    sizes = SplitSizes(pretrain_layouts=50, posttrain_layouts=20, posttrain_episodes=2, second_instruction=0.3,
                       eval_episodes=60)
    layouts = post_layouts(sizes, np.random.default_rng(0))
    named = {layout: set(n) for layout, n in layouts}
    assert any(len(n) == 2 for n in named.values()) and all(1 <= len(n) <= 2 for n in named.values())
    rng = np.random.default_rng(1)
    post = _episodes("posttrain", sizes, rng, layouts)
    assert len(post) == sum(len(n) for n in named.values()) * 2
    # each post-training layout is paired only with its own instruction(s), in canonical phrasing
    assert all(t in named[layout] and text == world.instruction(layout.objects[t]) for layout, t, text in post)
    for layout, t, _ in _episodes("eval_task", sizes, rng, layouts):
        assert t not in named[layout]  # an object never named for this layout
    for layout, t, text in _episodes("eval_paraphrase", sizes, rng, layouts):
        assert t in named[layout] and text != world.instruction(layout.objects[t])
    for layout, t, _ in _episodes("eval_unseen", sizes, rng, layouts):
        assert layout.objects[t] in world.HELD_OUT and layout not in named
    assert len({layout for layout, _, _ in _episodes("pretrain", sizes, rng, layouts)}) == 50


def test_bad_repro_settings_name_the_field_and_write_nothing(tmp_path, capsys):
    with pytest.raises(AptConfigError, match=r"repro\.seeds=0\. Input should be greater than or equal to 1"):
        ReproConfig.parse({"seeds": 0})
    with pytest.raises(AptConfigError, match=r"repro\.warkers"):
        ReproConfig.parse({"warkers": 2})
    workdir = tmp_path / "repro"
    assert main(["repro", "--quick", "--seeds", "0", "--workdir", str(workdir)]) == 2
    assert "invalid APT config: repro.seeds=0" in capsys.readouterr().err
    assert not workdir.exists()


@pytest.mark.e2e
@pytest.mark.slow
def test_quick_repro_runs_every_arm_on_the_real_classes(tmp_path):
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    from apt_plugins import read_manifest
    from apt_plugins.repro.data import SPLITS, load_split
    from apt_plugins.repro.run import run_repro

    report = tmp_path / "docs" / "repro_results.md"
    report.parent.mkdir()
    summary = run_repro(tmp_path / "ws", QUICK, report_path=report, command="apt-plugins repro --quick")
    ws = tmp_path / "ws"

    # every split is a real LeRobotDataset
    for split in SPLITS:
        ds = LeRobotDataset(f"local/{split}", root=ws / "data" / split)
        assert ds.num_episodes > 0 and "observation.images.top" in ds.features
    # the held-out combinations reach the policy only in the unseen split
    for split in ("pretrain", "posttrain", "eval_id", "eval_newscene"):
        texts = load_split(ws / "data" / split, first_frame_only=split.startswith("eval"))["task"]
        assert not {tuple(t.split()[2:]) for t in texts} & world.HELD_OUT, split
    unseen = load_split(ws / "data" / "eval_unseen", first_frame_only=True)
    assert all(tuple(t.split()[2:]) in world.HELD_OUT for t in unseen["task"])

    runs = {r["arm"]: r for r in summary["runs"]}
    assert set(runs) == {"stock_full", "stock_expert", "apt_frozen", "apt_lora", "apt_frozen_gate1"}
    for arm, run in runs.items():
        for split in ("id", "task", "paraphrase", "unseen", "newscene"):
            assert 0.0 <= run[split]["success"] <= run[split]["choice"] + 1e-9 or run[split]["success"] <= 1.0
            assert 0.0 <= run[split]["choice"] <= 1.0 and run[split]["action_error"] > 0
        assert set(run["grounding"]) == {"canonical", "paraphrase"}
        assert bool(run["gates"]) == arm.startswith("apt"), arm
        assert all(np.isfinite(loss) for phase in run["curves"].values() for _, loss, _ in phase)
    # the frozen-VLM arms leave the VLM exactly as pretrained
    before = summary["meta"]["vlm"]["accuracy"]
    for arm in ("stock_expert", "apt_frozen"):
        assert runs[arm]["grounding"] == before, arm
    # APT went through a real Stage-1 checkpoint, promoted into each Stage-2 arm
    assert read_manifest(ws / "checkpoints" / "apt_stage1_seed0")["stage"] == 1
    # gates that learn: the default multiplier moves them, the old rate (control) barely does
    moved = abs(np.mean(runs["apt_frozen"]["gates"]) - 0.5)
    control = abs(np.mean(runs["apt_frozen_gate1"]["gates"]) - 0.5)
    assert moved > 1e-3 and moved > 10 * control
    # the report, its plots, and the copy written next to the docs
    text = (ws / "report.md").read_text()
    assert "stock pi0, full fine-tune" in text and "APT Stage 1 -> 2, VLM LoRA" in text
    for name in ("repro_success.png", "repro_choice.png", "repro_curves.png"):
        assert (ws / name).stat().st_size > 1000
        assert (report.parent / "repro" / name).exists()
    assert "(repro/repro_success.png)" in report.read_text()
    saved = json.loads((ws / "results.json").read_text())
    assert saved["meta"]["command"] == "apt-plugins repro --quick" and saved["meta"]["versions"]["lerobot"]
