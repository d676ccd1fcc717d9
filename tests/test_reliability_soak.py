"""Soak: many short Stage 1 -> 2 cycles with saves, strict reloads, verify and retrofit, in one process.

What must not grow: live policies and tensors (a reference kept by a hook, the registry or a cache
would keep every cycle's policy alive), open file descriptors, the plugin registry, and the
process's resident memory (coarse bound). What must not be left behind: temporary directories,
incomplete markers or ``.tmp`` files. Tiny real pi0 policies from the adapter's conformance kit, CPU.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import warnings
import weakref
from pathlib import Path

import pytest
import torch

from apt_plugins import AptConfig, get_plugin_manager
from apt_plugins.atomic import INCOMPLETE_MARKER, TEMP_TAG

pytestmark = pytest.mark.slow

CYCLES = 8
WARMUP = 3  # allocator pools, lazy imports and caches settle in the first cycles


def _rss_mb() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _live_tensors() -> int:
    with warnings.catch_warnings():  # isinstance() on deprecated torch module attributes warns
        warnings.simplefilter("ignore")
        return sum(1 for obj in gc.get_objects() if isinstance(obj, torch.Tensor))


def _leftovers(root: Path) -> list[str]:
    return [str(p) for p in root.rglob("*")
            if TEMP_TAG in p.name or p.name == INCOMPLETE_MARKER or p.name.endswith(".tmp")]


def _train_step(kit, policy, seed):
    optimizer = torch.optim.AdamW(policy.get_optim_params(), lr=1e-3)
    loss = kit.loss(policy, kit.make_batch(seed=seed), seed=seed)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc (Linux)")
def test_soak_stage_cycles_do_not_leak_or_leave_files(tmp_path):
    from apt_plugins.lerobot.retrofit import retrofit
    from apt_plugins.lerobot.verify import verify

    torch.set_num_threads(1)
    kit = get_plugin_manager().get_adapter("lerobot_pi0").conformance_kit()
    plain = tmp_path / "plain"
    kit.build(None, seed=3).save_pretrained(plain)
    registry_size = len(get_plugin_manager().registry.names())
    alive: list[weakref.ref] = []
    samples = []
    for cycle in range(CYCLES):
        work = tmp_path / f"cycle{cycle}"
        stage1 = kit.build(AptConfig(stage=1), seed=cycle)
        _train_step(kit, stage1, seed=cycle)
        kit.save(stage1, work / "s1")
        reloaded = kit.load(work / "s1", AptConfig(stage=1))
        assert all(torch.equal(reloaded.state_dict()[k], v) for k, v in stage1.state_dict().items())
        stage2 = kit.load(work / "s1", AptConfig(stage=2))  # promotion
        _train_step(kit, stage2, seed=100 + cycle)
        kit.save(stage2, work / "s2")
        kit.save(stage2, work / "s2")  # a second save into the same directory replaces it in place
        with kit.construction():
            checks = verify(work / "s2", parent=work / "s1")
            # Stage 2 with the language paths kept: the retrofit must reproduce the source exactly.
            report = retrofit(plain, work / "rt", stage=2, apt_overrides={"inherited_layers_keep_language_mask": False})
        failed = [c for c in checks if c.status == "FAIL"]
        assert not failed, failed
        assert report.probe["identical"], report.probe
        assert json.loads((work / "rt" / "apt_manifest.json").read_text())["retrofit"]["added_tensors"]
        assert _leftovers(tmp_path) == [], f"cycle {cycle} left files behind"
        alive += [weakref.ref(p) for p in (stage1, reloaded, stage2)]
        del stage1, reloaded, stage2, checks, report
        shutil.rmtree(work)
        gc.collect()
        samples.append({"cycle": cycle, "rss_mb": _rss_mb(), "fds": _open_fds(), "tensors": _live_tensors(),
                        "policies_alive": sum(r() is not None for r in alive)})
    print(json.dumps(samples[WARMUP - 1:], indent=None))
    warm, end = samples[WARMUP - 1], samples[-1]
    assert end["policies_alive"] == 0, "policies of finished cycles are still referenced"
    assert end["tensors"] <= warm["tensors"], (warm, end)
    assert end["fds"] <= warm["fds"], (warm, end)
    # Resident memory: the tiny policies weigh ~2 MB each; a leak of one per cycle stays under this
    # bound only by luck, the object counts above are the precise check.
    assert end["rss_mb"] - warm["rss_mb"] < 150, (warm, end)
    assert len(get_plugin_manager().registry.names()) == registry_size
    figures = os.environ.get("APT_RELIABILITY_FIGURES")
    if figures:
        Path(figures).mkdir(parents=True, exist_ok=True)
        (Path(figures) / "soak.json").write_text(json.dumps({"cycles": CYCLES, "samples": samples}, indent=1))
