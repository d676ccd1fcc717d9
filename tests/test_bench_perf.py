"""The performance benchmarks (issue 12): prefix cache, real-size memory, GPU mode.

Only their mechanics are tested here (tiny sizes); the numbers live in docs/benchmarks.md. The GPU
mode cannot run on a CPU machine, so what is tested is that it is refused clearly there.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_memory  # noqa: E402
import bench_pi  # noqa: E402
import bench_prefix_cache  # noqa: E402

sys.path.pop(0)

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: the refusal does not apply")


@no_cuda
@pytest.mark.parametrize("module", [bench_pi, bench_prefix_cache], ids=lambda m: m.__name__)
def test_cuda_mode_is_refused_clearly_without_a_gpu(module, capsys):
    with pytest.raises(SystemExit) as info:
        module.main(["--device", "cuda", "--dtype", "bf16", "--quick"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--device cuda needs a CUDA GPU" in err and "torch.cuda.is_available() is False" in err


@pytest.mark.parametrize("module", [bench_pi, bench_prefix_cache], ids=lambda m: m.__name__)
def test_unknown_dtype_is_refused(module, capsys):
    with pytest.raises(SystemExit) as info:
        module.main(["--dtype", "fp16", "--quick"])
    assert info.value.code == 2 and "--dtype 'fp16'" in capsys.readouterr().err


def test_device_checks_and_real_sizes():
    assert bench_pi.check_device("cpu", "bf16") is None
    assert bench_pi.DTYPES == {"fp32": "float32", "bf16": "bfloat16"}
    real = bench_pi.SIZES["real"]
    assert (real["vlm_width"], real["depth"], real["vocab"], real["cameras"]) == (2048, 18, 257152, 3)
    assert bench_pi.sized_pi_patches(real).__class__.__name__ == "nullcontext"  # LeRobot's own configs


def test_bad_memory_budget_is_a_usage_error(capsys):
    with pytest.raises(SystemExit):
        bench_prefix_cache.main(["--quick", "--memory-budget", "memory:lots"])
    assert "apt.prefix_cache" in capsys.readouterr().err


def test_fast_init_skips_only_large_tensors_and_restores_the_initialisers():
    """The memory benchmark's fast build: large tensors untouched by the initialisers, then filled once."""
    import transformers.initialization as hf_init

    originals = (torch.nn.init.normal_, dict(hf_init.TORCH_INIT_FUNCTIONS))
    big = torch.full((256, 256), 7.0)
    with bench_memory.fast_init():
        torch.nn.init.normal_(big)
        hf_init.normal_(big)  # transformers' guarded wrapper goes through its recorded copies
        small = torch.nn.Linear(4, 4)  # below FAST_INIT_NUMEL: the real kaiming init
    assert bool((big == 7.0).all())
    assert 0 < float(small.weight.detach().abs().max()) <= 0.5
    assert (torch.nn.init.normal_, dict(hf_init.TORCH_INIT_FUNCTIONS)) == originals
    module = torch.nn.Linear(256, 256)
    module.weight.data.fill_(7.0)
    assert bench_memory.fill_large_parameters(module) == 256 * 256
    assert abs(float(module.weight.detach().std()) - bench_memory.FAST_INIT_STD) < 0.002


def _memory_args(**kw):
    defaults = dict(batch=1, steps=1, threads=1, cap_gb=4.0, wait_memory=5.0, timeout=600.0, quick=True,
                    min_cap_gb=None, floor_gb=0.0, start_before=None)
    return argparse.Namespace(**{**defaults, **kw})


def test_memory_watchdog_kills_a_child_past_the_cap():
    """A 0.15 GB cap: the child passes it while importing torch and is killed, the row says so."""
    row = bench_memory.measure("pi0", "apt_stage1", _memory_args(cap_gb=0.15))
    assert row["outcome"] == "exceeds", row
    assert row["sampled_peak_gb"] > 0.15


def test_memory_child_reports_when_memory_is_short(monkeypatch):
    monkeypatch.setattr(bench_memory, "available_bytes", lambda: 10**9)
    row = bench_memory.measure("pi0", "apt_stage1", _memory_args(cap_gb=4.0, wait_memory=0.0))
    assert row["outcome"] == "not measured" and "1.0 GB available" in row["reason"]
    # --min-cap-gb: measure under what is there, and say so in the row (killed at the lower cap here).
    monkeypatch.setattr(bench_memory, "available_bytes", lambda: int(0.7 * 10**9))
    row = bench_memory.measure("pi0", "apt_stage1", _memory_args(cap_gb=4.0, wait_memory=0.0, min_cap_gb=0.1))
    assert row["cap_gb"] == 0.2 and row["outcome"] == "exceeds"


@pytest.mark.slow
def test_memory_benchmark_quick_rows(tmp_path):
    out = tmp_path / "mem.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_memory.py"), "--quick", "--threads", "1",
                           "--policies", "pi0", "groot", "--configs", "expert_only", "apt_stage2_lora",
                           "--json-out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    for policy, rows in json.loads(out.read_text())["rows"].items():
        for config, row in rows.items():
            assert row["outcome"] in ("ok", "not measured"), (policy, config, row)
            if row["outcome"] == "ok":
                # Fast init: the large tensors were skipped by the initialisers, then written once.
                assert row["fast_filled"] > 0 and all(math.isfinite(v) for v in row["losses"]), row
                assert row["peak_gb"] > row["weight_bytes"] / 1e9
                assert "torch.bfloat16" in row["dtypes"]
    assert "| policy | configuration" in proc.stdout


@pytest.mark.slow
def test_prefix_cache_benchmark_quick(tmp_path):
    out = tmp_path / "cache.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_prefix_cache.py"), "--quick",
                           "--policies", "pi0", "--json-out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads(out.read_text())
    results = report["policies"]["pi0"]["results"]
    assert set(results) == set(bench_prefix_cache.CONFIGS)
    frames, epochs = report["frames"], report["epochs"]
    for config in ("cached_memory", "cached_disk"):
        cache = results[config]["cache"]
        assert cache["misses"] == frames and cache["hits"] == frames * (epochs - 1), cache
        assert results[config]["max_rel_loss_diff"] < 1e-3
    assert results["cached_disk"]["disk_bytes"] > 0
    assert "speedup, epochs 2+" in proc.stdout


def test_throughput_table_counts_prefix_and_expert_tokens():
    s = dict(bench_pi.SIZES["quick"], batch=2)
    row = dict(step_s=0.5, peak_rss_mib=2048.0, peak_growth_mib=1024.0, vlm_tokens_per_sample=30)
    report = dict(sizes=s, policies={"pi0": dict(train={"apt_stage1": row})})
    table = bench_pi.throughput_table(report)
    tokens = 2 * (30 + s["chunk"] + 1) / 0.5  # pi0: action chunk + state token
    assert f"{tokens:.0f}" in table
    assert "tokens/s" in table and "500.0" in table
