"""``apt-plugins eval-language`` end to end on saved tiny checkpoints (stock pi0 and Stage-1 apt_pi0).

The checkpoints hold their own processors (as ``lerobot-train`` writes them); the command loads
them, evaluates open loop and closed loop (``apt_blocks``), compares both policies in one table and
one plot, and writes JSON and PNGs, in-process under the tiny-model patches. The e2e test runs the
``lerobot-eval`` binary with the instruction override plugin.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import use_offline_hub

from apt_plugins import AptConfig, cli
from apt_plugins.lerobot.language_eval import VARIANTS, LanguageReport

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from apt_plugins.lerobot.data import make_synthetic_dataset

    return make_synthetic_dataset(tmp_path_factory.mktemp("lang_cli") / "data", episodes_per_task=1,
                                  frames_per_episode=8)


@pytest.fixture
def checkpoints(tmp_path, monkeypatch, dataset):
    """A stock pi0 and a Stage-1 apt_pi0 checkpoint, each with its processors, under tmp_path."""
    from apt_plugins_lerobot_pi.testing import PiConformanceKit, write_tokenizer_fixture
    from lerobot.policies.factory import make_pre_post_processors

    torch.set_num_threads(1)
    write_tokenizer_fixture(use_offline_hub(monkeypatch, tmp_path / "hub"))
    kit = PiConformanceKit("lerobot_pi0")
    paths = {}
    for name, apt in (("stock", None), ("apt_s1", AptConfig(stage=1))):
        policy = kit.build(apt).eval()
        directory = tmp_path / name / "checkpoints" / "last" / "pretrained_model"
        policy.save_pretrained(directory)
        pre, post = make_pre_post_processors(policy.config, dataset_stats=dataset.meta.stats)
        pre.save_pretrained(directory)
        post.save_pretrained(directory)
        paths[name] = directory
    return paths


def _run(*args: str) -> int:
    from apt_plugins_lerobot_pi.testing import tiny_pi_patches

    with tiny_pi_patches():  # checkpoints record the real Gemma variants; build them tiny
        return cli.main(["eval-language", *args])


def test_compare_open_and_closed_loop_writes_tables_json_and_plots(checkpoints, dataset, tmp_path, capsys):
    out = tmp_path / "out"
    code = _run(f"--policy.path={checkpoints['stock']}", "--compare", str(checkpoints["apt_s1"]),
                "--dataset.repo_id=local/apt_demo", f"--dataset.root={dataset.root}", "--frames=3",
                f"--output_dir={out}", "--env.type=apt_blocks", "--env.episode_length=2", "--eval.n_episodes=1",
                "--variants=task_swap,empty,paraphrase")
    printed = capsys.readouterr().out
    assert code == 0
    assert "policy stock (pi0)" in printed and "policy apt_s1 (apt_pi0)" in printed
    assert "instruction-following index" in printed and "closed loop: policy apt_s1 in apt_blocks" in printed
    table = printed.split("(divergence: mean normalised action change")[0].rsplit("policy ", 1)[-1]
    assert "stock" in table and "apt_s1" in table  # the comparison table holds both policies

    stock = LanguageReport.from_dict(json.loads((out / "stock.json").read_text()))
    apt = LanguageReport.from_dict(json.loads((out / "apt_s1.json").read_text()))
    assert stock.schema_version == apt.schema_version == 1
    assert list(stock.per_variant) == ["original", "task_swap", "empty", "paraphrase"]
    assert stock.policy["source"] == str(checkpoints["stock"]) and stock.settings["frames"] == 3
    assert all(stock.divergence(v) > 0 for v in ("task_swap", "empty", "paraphrase"))
    assert all(apt.per_variant[v]["divergence_max"] == 0.0 for v in apt.per_variant)
    assert apt.index == 0.0 and stock.index != 0.0
    closed = json.loads((out / "apt_s1_closed_loop.json").read_text())
    assert closed["per_variant"]["task_swap"]["retargeted"] == 1
    assert closed["per_variant"]["empty"]["tokens_checked"] == 2
    for name in ("stock_divergence.png", "stock_heatmap.png", "apt_s1_divergence.png", "apt_s1_heatmap.png",
                 "compare_divergence.png"):
        assert (out / name).read_bytes()[:8] == PNG, name
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no staging leftovers


def test_bad_input_is_a_clear_error_and_writes_nothing(checkpoints, dataset, tmp_path, capsys):
    out = tmp_path / "out"
    assert _run(f"--policy.path={checkpoints['stock']}", f"--output_dir={out}") == 2
    assert "dataset.repo_id=None" in capsys.readouterr().err
    assert _run(f"--policy.path={tmp_path / 'missing'}", "--dataset.repo_id=x", f"--output_dir={out}") == 2
    err = capsys.readouterr().err
    assert f"checkpoint {tmp_path / 'missing'} does not match the model" in err and "not a checkpoint directory" in err
    assert _run(f"--policy.path={checkpoints['stock']}", "--dataset.repo_id=local/apt_demo",
                f"--dataset.root={dataset.root}", "--variants=swap", f"--output_dir={out}") == 2
    assert "variants='swap'. choose from " + ", ".join(VARIANTS) in capsys.readouterr().err
    assert not out.exists()


# ----------------------------------------------------------------------- inside lerobot-eval itself
EVAL_PLUGIN = '''"""Scratch plugin: tiny pi0 at construction, then the instruction override (tests only)."""
import apt_tiny_pi  # noqa: F401
import apt_plugins.lerobot.language_eval.lerobot_eval_override  # noqa: F401
'''


def _lerobot_eval(checkpoint: Path, tmp_path: Path, variant: str) -> tuple[subprocess.CompletedProcess, Path]:
    from apt_plugins_lerobot_pi.testing import write_tiny_plugin

    plugins = tmp_path / "plugins"
    write_tiny_plugin(plugins)
    (plugins / "apt_lang_override_plugin").mkdir(exist_ok=True)
    (plugins / "apt_lang_override_plugin" / "__init__.py").write_text(EVAL_PLUGIN)
    log = tmp_path / f"override_{variant}.jsonl"
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1",
           "HF_LEROBOT_HOME": str(tmp_path / "home"), "PYTHONPATH": str(plugins), "WANDB_MODE": "disabled",
           "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", "APT_EVAL_INSTRUCTION": variant,
           "APT_EVAL_INSTRUCTION_LOG": str(log)}
    cmd = [str(Path(sys.executable).parent / "lerobot-eval"), f"--policy.path={checkpoint}", "--env.type=apt_blocks",
           "--env.discover_packages_path=apt_lang_override_plugin", "--env.episode_length=3", "--eval.n_episodes=2",
           "--eval.batch_size=1", "--policy.device=cpu", f"--output_dir={tmp_path / ('eval_' + variant)}"]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600), log


@pytest.mark.e2e
@pytest.mark.slow
def test_lerobot_eval_runs_with_the_instruction_override(checkpoints, tmp_path):
    result, log = _lerobot_eval(checkpoints["stock"], tmp_path, "task_swap")
    assert result.returncode == 0, result.stderr[-3000:]
    info = json.loads((tmp_path / "eval_task_swap" / "eval_info.json").read_text())
    assert info["overall"]["n_episodes"] == 2
    (record,) = [json.loads(line) for line in log.read_text().splitlines()]
    assert record["variant"] == "task_swap" and record["episodes"] == 2 and record["retargeted"] == 2
    assert record["tokens_checked"] == 6  # 3 steps x 2 episodes, each checked against the original's tokens
    for episode in record["instructions"]:
        assert episode["shown"] != episode["original"] and episode["scored_task"] == episode["shown"]


def test_the_lerobot_eval_override_settings_are_checked():
    from apt_plugins.errors import AptConfigError

    from apt_plugins.lerobot.language_eval.closed_loop import settings_from_environment as parse

    assert parse({"APT_EVAL_INSTRUCTION": "empty"})["tasks"][0] == "pick the red block"
    assert parse({"APT_EVAL_INSTRUCTION": "task_swap", "APT_EVAL_INSTRUCTION_SEED": "3",
                  "APT_EVAL_INSTRUCTION_TASKS": '["a b", "c d"]'}) == {
        "variant": "task_swap", "seed": 3, "tasks": ["a b", "c d"], "log": None}
    for environ, match in (({}, r"APT_EVAL_INSTRUCTION=None\. set it to one of original, task_swap"),
                           ({"APT_EVAL_INSTRUCTION": "swap"}, r"variants='swap'\. choose from"),
                           ({"APT_EVAL_INSTRUCTION": "empty", "APT_EVAL_INSTRUCTION_SEED": "x"}, "use an integer"),
                           ({"APT_EVAL_INSTRUCTION": "empty", "APT_EVAL_INSTRUCTION_TASKS": "[1]"}, "JSON list")):
        with pytest.raises(AptConfigError, match=match):
            parse(environ)
