"""The benchmark scripts run end to end (``--quick``: tiny sizes, so their verdicts mean nothing)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


def _run(script: str, json_out: Path) -> tuple[str, dict]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--quick", "--json-out", str(json_out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout, json.loads(json_out.read_text())


def _check_ratios(rows: list[dict], names: set[str]) -> None:
    assert {r["name"] for r in rows} == names
    for r in rows:
        assert set(r) >= {"name", "kind", "value", "target", "status"}
        assert isinstance(r["value"], float) and r["value"] > 0, r
        assert r["status"] in ("PASS", "FAIL", "-")


def test_bench_pi_quick(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench_pi
    finally:
        sys.path.pop(0)
    out, report = _run("bench_pi.py", tmp_path / "pi.json")
    assert report["size_name"] == "quick"
    assert set(report["policies"]) == {"pi0", "pi05"}
    for p in report["policies"].values():
        _check_ratios(p["ratios"], {t[0] for t in bench_pi.TARGETS})
        assert set(p["train"]) == set(bench_pi.TRAIN_CONFIGS)
    assert "| policy | ratio" in out and "S1 time / full FT" in out and "infer S2 / stock" in out


def test_bench_groot_quick(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench_groot
    finally:
        sys.path.pop(0)
    out, report = _run("bench_groot.py", tmp_path / "groot.json")
    assert report["size_name"] == "quick"
    p = report["policies"]["groot"]
    _check_ratios(p["ratios"], {t[0] for t in bench_groot.TARGETS})
    assert set(p["train"]) == set(bench_groot.TRAIN_CONFIGS)
    assert set(p["infer"]["infer_s"]) == set(bench_groot.INFER_CONFIGS)
    assert "| ratio" in out and "S1 time / stock default" in out and "infer S2 / stock" in out
    # Only APT drops the instruction from the backbone pass; Stage 2 adds a full-prompt pass.
    tokens = {c: r["vlm_tokens_per_sample"] for c, r in p["train"].items()}
    # Stage 1 drops the instruction; Stage 2 adds it back as a continuation: the stock token count.
    assert tokens["apt_stage1"] < tokens["default"] == tokens["full_ft"] == tokens["apt_stage2"]


def test_bench_smolvla_quick(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench_smolvla
    finally:
        sys.path.pop(0)
    out, report = _run("bench_smolvla.py", tmp_path / "smolvla.json")
    assert report["size_name"] == "quick"
    p = report["policies"]["smolvla"]
    _check_ratios(p["ratios"], {t[0] for t in bench_smolvla.TARGETS})
    assert set(p["train"]) == set(bench_smolvla.TRAIN_CONFIGS)
    assert set(p["infer"]["infer_s"]) == set(bench_smolvla.INFER_CONFIGS)
    assert "| ratio" in out and "S1 time / stock default" in out and "infer S2 / stock" in out
    # Stage 1 runs the images and the state token only; Stage 2 adds the instruction back as a
    # continuation of the image pass: the stock token count.
    tokens = {c: r["vlm_tokens_per_sample"] for c, r in p["train"].items()}
    assert tokens["apt_stage1"] < tokens["default"] == tokens["full_ft"] == tokens["apt_stage2"]
    assert not p["train"]["apt_stage1"]["vlm_activations_require_grad"]
    assert p["train"]["default"]["vlm_activations_require_grad"]
