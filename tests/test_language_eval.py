"""Unit tests of the language evaluator's parts: instruction variants, paraphrase rules, metrics, report.

No policy runs here (see ``test_language_eval_hosts.py`` and ``test_language_eval_cli.py``).
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from apt_plugins.errors import AptConfigError
from apt_plugins.lerobot.language_eval import (
    DEFAULT_PARAPHRASE_RULES,
    VARIANTS,
    LanguageReport,
    ParaphraseRules,
    corrupt,
    format_comparison,
    load_paraphrase_rules,
    make_variant,
    paraphrase,
    shuffle_words,
    swap_task,
)
from apt_plugins.lerobot.language_eval.metrics import action_scale, aggregate, follow_score, normalised_rms
from apt_plugins.lerobot.language_eval.variants import validate_variants

TASKS = ["pick the red block", "pick the green block", "pick the blue block"]


# -------------------------------------------------------------------------------------- variants
def test_every_variant_changes_the_instruction_except_original():
    for variant in VARIANTS:
        text = make_variant(variant, TASKS[0], random.Random(0), TASKS, vocabulary=["cup", "bowl", "left"])
        assert (text == TASKS[0]) == (variant == "original"), (variant, text)


def test_paraphrase_uses_synonyms_and_falls_back_to_a_template():
    text = paraphrase("pick the red block", random.Random(0))
    assert text != "pick the red block" and "red" in text
    assert text.split()[0] in DEFAULT_PARAPHRASE_RULES.synonyms["pick"] and text.split()[-1] == "cube"
    no_synonym = paraphrase("wipe the table", random.Random(0))
    assert "wipe the table" in no_synonym and no_synonym != "wipe the table"
    assert paraphrase("", random.Random(0)) == ""  # nothing to paraphrase
    rules = ParaphraseRules(synonyms={"wipe": ["clean"]})
    assert paraphrase("Wipe the table", random.Random(0), rules) == "clean the table"


def test_shuffle_swap_and_corrupt():
    assert sorted(shuffle_words("pick the red block", random.Random(1)).split()) == sorted("pick the red block".split())
    assert shuffle_words("pick the red block", random.Random(1)) != "pick the red block"
    assert shuffle_words("go", random.Random(0)) == "go" and shuffle_words("go go", random.Random(0)) == "go go"
    others = {swap_task(TASKS[0], TASKS, random.Random(s)) for s in range(20)}
    assert others == set(TASKS[1:])
    assert swap_task(TASKS[0], TASKS[:1], random.Random(0)) is None
    assert set(corrupt("pick the red block", random.Random(0), ["cup", "bowl"]).split()) <= {"cup", "bowl"}
    assert len(corrupt("go", random.Random(0)).split()) == 3  # at least three random tokens


def test_variants_are_reproducible_from_the_seed():
    a = [make_variant(v, TASKS[1], random.Random("0:5:" + v), TASKS) for v in VARIANTS]
    b = [make_variant(v, TASKS[1], random.Random("0:5:" + v), TASKS) for v in VARIANTS]
    assert a == b


def test_validate_variants():
    assert validate_variants(None) == VARIANTS
    assert validate_variants(["corrupted", "empty"]) == ("original", "empty", "corrupted")
    with pytest.raises(AptConfigError, match=r"variants='swap'\. choose from original, task_swap, empty"):
        validate_variants(["empty", "swap"])


def test_paraphrase_rules_file(tmp_path):
    path = tmp_path / "rules.json"
    path.write_text(json.dumps({"synonyms": {"wipe": ["clean", "scrub"]}, "templates": ["now {instruction}"]}))
    rules = load_paraphrase_rules(path)
    assert rules.synonyms["wipe"] == ["clean", "scrub"] and "pick" in rules.synonyms
    assert "now {instruction}" in rules.templates and "please {instruction}" in rules.templates
    assert load_paraphrase_rules(path, base=None).templates == ["now {instruction}"]


@pytest.mark.parametrize("content, match", [
    (None, r"paraphrase_rules='.*missing.json'. the file does not exist"),
    ("{not json", r"paraphrase_rules='.*rules.json'. the file is not valid JSON"),
    (json.dumps({"templates": ["please"]}), r"paraphrase_rules.templates=\['please'\]\. template 'please' must contain '\{instruction\}' exactly once"),
    (json.dumps({"synonyms": {"pick": ["pick"]}}), r"paraphrase_rules.synonyms=\{'pick': \['pick'\]\}\. synonyms\['pick'\] needs at least one alternative"),
    (json.dumps({"synonym": {}}), r"paraphrase_rules.synonym=.*Extra inputs are not permitted"),
])
def test_bad_paraphrase_rules_name_the_field(tmp_path, content, match):
    path = tmp_path / ("missing.json" if content is None else "rules.json")
    if content is not None:
        path.write_text(content)
    with pytest.raises(AptConfigError, match=match):
        load_paraphrase_rules(path)


# --------------------------------------------------------------------------------------- metrics
def test_action_scale_floors_constant_dimensions():
    scale = action_scale([2.0, 0.0, 0.5])
    assert scale.tolist() == [2.0, 0.002, 0.5]


def test_normalised_rms_and_padding():
    scale = np.array([1.0, 2.0])
    a = np.array([[1.0, 2.0], [0.0, 0.0]])
    b = np.zeros((2, 2))
    assert normalised_rms(a, b, scale) == pytest.approx(np.sqrt((1 + 1) / 4))
    assert normalised_rms(a, b, scale, valid=np.array([True, False])) == pytest.approx(1.0)


def test_follow_score():
    scale = np.ones(2)
    g_orig, g_swap = np.array([[0.0, 0.0]]), np.array([[2.0, 0.0]])
    a_orig = np.array([[0.1, 0.3]])
    assert follow_score(a_orig, a_orig + [[2.0, 0.0]], g_orig, g_swap, scale) == pytest.approx(1.0)
    assert follow_score(a_orig, a_orig, g_orig, g_swap, scale) == 0.0
    assert follow_score(a_orig, a_orig - [[1.0, 5.0]], g_orig, g_swap, scale) == pytest.approx(-0.5)
    assert follow_score(a_orig, a_orig + 1, g_orig, g_orig, scale) is None  # the tasks agree: undefined


def _frame(task, div, follow=None):
    return {"index": 0, "episode": 0, "task": task, "instructions": {}, "divergence": {"original": 0.0, "empty": div},
            "gt_error": {"original": 1.0, "empty": 1.0 + div}, "gt_error_swap": {}, "tokens_changed":
            {"original": False, "empty": True}, "follow": follow}


def test_aggregate_per_variant_and_task():
    per_variant, per_task = aggregate([_frame("a", 0.2, 0.5), _frame("a", 0.4), _frame("b", 0.0, -0.1)],
                                      ["original", "empty"])
    assert per_variant["empty"]["divergence_mean"] == pytest.approx(0.2)
    assert per_variant["empty"]["divergence_max"] == pytest.approx(0.4)
    assert per_variant["empty"]["tokens_changed"] == 3 and per_variant["original"]["tokens_changed"] == 0
    assert per_variant["empty"]["gt_error_swap_mean"] is None
    assert per_task["a"]["divergence_mean"]["empty"] == pytest.approx(0.3) and per_task["a"]["follow_index"] == 0.5
    assert per_task["b"]["frames"] == 1


# ---------------------------------------------------------------------------------------- report
def _report(name, div):
    frames = [_frame("pick the red block", div, 0.25)]
    per_variant, per_task = aggregate(frames, ["original", "empty"])
    return LanguageReport(schema_version=1, policy={"name": name, "type": "pi0"}, dataset={"repo_id": "local/x"},
                          settings={"frames": 1, "seed": 0, "device": "cpu"},
                          summary={"instruction_following_index": 0.25 if div else 0.0, "sensitivity": div,
                                   "paraphrase_divergence": None, "noise_check": 0.0},
                          per_variant=per_variant, per_task=per_task, skipped={"task_swap": "one task"}, frames=frames)


def test_report_table_json_round_trip_and_comparison(tmp_path):
    report = _report("stock", 0.5)
    table = report.format_table()
    assert "policy stock (pi0) on local/x: 1 frames" in table and "task_swap    skipped: one task" in table
    assert "instruction-following index: 0.250" in table and "pick the red block" in table
    path = report.write_json(tmp_path / "sub" / "r.json")
    assert LanguageReport.from_dict(json.loads(path.read_text())) == report
    assert [p.name for p in path.parent.iterdir()] == ["r.json"]  # no temporary file left
    table = format_comparison([report, _report("apt", 0.0)])
    assert table.splitlines()[2].startswith("stock") and table.splitlines()[3].startswith("apt")


def test_plots(tmp_path):
    pytest.importorskip("matplotlib")
    from apt_plugins.lerobot.language_eval import plot_divergence_bars

    paths = _report("stock", 0.5).save_plots(tmp_path, prefix="stock")
    paths.append(plot_divergence_bars([_report("a", 0.5), _report("b", 0.0)], tmp_path / "cmp.png"))
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cmp.png", "stock_divergence.png", "stock_heatmap.png"]


def test_importing_the_package_stays_light():
    import subprocess
    import sys

    code = ("import sys, apt_plugins.lerobot.language_eval as m, apt_plugins.lerobot.language_eval.command; "
            "print(sorted(k for k in ('torch', 'lerobot', 'matplotlib') if k in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_an_unavailable_device_is_a_clear_error():
    import torch

    from apt_plugins.lerobot.language_eval.runner import check_device

    assert check_device("cpu") == "cpu"
    with pytest.raises(AptConfigError, match=r"policy.device='gpu0'\. use cpu, cuda, cuda:<index> or mps"):
        check_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(AptConfigError, match=r"policy.device='cuda'\. CUDA is not available on this machine"):
            check_device("cuda")
    else:
        with pytest.raises(AptConfigError, match=r"policy.device='cuda:99'\. this machine has \d+ CUDA device"):
            check_device("cuda:99")
