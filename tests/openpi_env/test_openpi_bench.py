"""benchmarks/bench_openpi.py runs end to end (``--quick``: tiny sizes, bench_pi's workers; verdicts mean nothing)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def test_bench_openpi_quick(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench_openpi
        import bench_pi
    finally:
        sys.path.pop(0)
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_openpi.py"), "--quick", "--json-out",
                           str(tmp_path / "b.json")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "b.json").read_text())
    assert report["size_name"] == "quick" and set(report["policies"]) == {"pi0", "pi05"}
    for p in report["policies"].values():
        assert set(p["train"]) == set(bench_openpi.TRAIN_CONFIGS)
        assert {r["name"] for r in p["ratios"]} == {t[0] for t in bench_pi.TARGETS}
        # Times are always positive; at quick size a memory growth can round to 0 MiB, so a memory ratio may be 0.
        assert all(r["status"] in ("PASS", "FAIL", "-") for r in p["ratios"])
        assert all(r["value"] > 0 if r["kind"] != "mem" else r["value"] is None or r["value"] >= 0
                   for r in p["ratios"])
        train = p["train"]
        assert train["apt_stage1"]["params_trainable"] < train["full_ft"]["params_trainable"] \
            == train["full_ft"]["params_total"]
        assert len({r["batch_digest"] for r in train.values()}) == 1  # one batch for every configuration
        # The probes see the frozen VLM outside autograd in APT only.
        assert train["full_ft"]["vlm_activations_require_grad"]
        assert not train["apt_stage1"]["vlm_activations_require_grad"]
        # With the mask lifted and closed fusion, APT computes openpi's loss (fp32, same weights and noise).
        assert train["apt_stage2_unmasked"]["losses"][0] == pytest.approx(train["full_ft"]["losses"][0], rel=1e-5)
        # Closed fusion: Stage 2 computes Stage 1's loss at step 0.
        assert train["apt_stage2"]["losses"][0] == train["apt_stage1"]["losses"][0]
    assert "| policy | ratio" in proc.stdout and "S1 time / full FT" in proc.stdout
