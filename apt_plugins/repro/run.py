"""``apt-plugins repro``: the whole CPU-scale reproduction, from data to ``docs/repro.md``.

1. write the datasets (LeRobotDatasets) and the tokenizer fixture;
2. pretrain (or load from the cache) the grounding VLM;
3. train and score every arm for every seed, in ``workers`` processes;
4. aggregate (mean ± std over seeds), plot, and write the report.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import AptConfigError

__all__ = ["ReproConfig", "run_repro", "QUICK", "FULL"]


class ReproConfig(BaseModel):
    """Sizes and budgets of one reproduction run (``--quick`` and the full run are presets)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: Literal["quick", "full", "custom"] = Field("custom", description="preset name (reported)")
    seeds: int = Field(3, ge=1, le=10, description="seeds per arm")
    pretrain_layouts: int = Field(1500, ge=4, description="layouts (one episode each) in the robot pretraining set")
    posttrain_layouts: int = Field(100, ge=2, description="layouts in the imbalanced post-training set")
    posttrain_episodes: int = Field(4, ge=1, description="episodes per (layout, instruction) in post-training")
    second_instruction: float = Field(0.15, ge=0, le=1, description="fraction of post-training layouts with a 2nd instruction")
    eval_episodes: int = Field(300, ge=3, description="episodes per evaluation split")
    vlm_steps: int = Field(1500, ge=1, description="grounding pretraining steps of the VLM")
    pretrain_steps: int = Field(1200, ge=2, description="robot pretraining steps per arm (APT: half Stage 1, half Stage 2)")
    posttrain_steps: int = Field(600, ge=1, description="post-training steps per arm")
    batch_size: int = Field(32, ge=1, description="training batch size")
    workers: int = Field(2, ge=1, le=16, description="worker processes (one torch thread each)")

    @classmethod
    def parse(cls, data: dict[str, Any]) -> ReproConfig:
        """Validate ``data``; raise :class:`~apt_plugins.errors.AptConfigError` naming ``repro.<field>``."""
        try:
            return cls(**data)
        except ValidationError as exc:
            err = exc.errors()[0]
            field = ".".join(str(p) for p in err.get("loc", ()))
            msg = err["msg"]
            info = cls.model_fields.get(field)
            if info is None:
                msg = f"unknown repro setting; known: {', '.join(cls.model_fields)}"
            hint = f" ({info.description})" if info is not None and info.description else ""
            raise AptConfigError(f"repro.{field}", data.get(field, err.get("input")), f"{msg}{hint}.") from None


QUICK = dict(mode="quick", seeds=1, pretrain_layouts=24, posttrain_layouts=6, posttrain_episodes=1, eval_episodes=12,
             vlm_steps=30, pretrain_steps=8, posttrain_steps=4, batch_size=8, workers=1)
FULL = dict(mode="full")


def _say(msg: str) -> None:
    print(msg, flush=True)


def run_repro(workdir: str | Path = "runs/repro", config: ReproConfig | dict | None = None,
              report_path: str | Path | None = None, command: str | None = None) -> dict:
    """Run the reproduction in ``workdir``; write ``report.md`` and the plots there (and to ``report_path``).

    :returns: the aggregated results (also written to ``<workdir>/results.json``).
    :raises AptConfigError: a bad ``config`` value (``repro.<field>``), before anything is written.
    """
    from .arms import JOBS, TrainSettings, run_seed_job, settings_dict
    from .data import SplitSizes, write_splits
    from .grounding import pretrain_vlm
    from .models import ModelSize, Tokenizer
    from .report import aggregate, write_report

    cfg = config if isinstance(config, ReproConfig) else ReproConfig.parse(dict(config or FULL))
    start = time.time()
    ws = Path(workdir).resolve()
    ws.mkdir(parents=True, exist_ok=True)
    (ws / "results").mkdir(exist_ok=True)
    for stale in (ws / "results").glob("*.json"):  # results of an earlier run must not mix in
        stale.unlink()
    _say(f"== apt-plugins repro ({cfg.mode}) in {ws}: {cfg.seeds} seed(s), {cfg.workers} worker(s)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(1)
    size = ModelSize()
    settings = TrainSettings(pretrain_steps=cfg.pretrain_steps, posttrain_steps=cfg.posttrain_steps,
                             batch_size=cfg.batch_size,
                             warmup_steps=100 if cfg.mode != "quick" else 1,
                             log_every=50 if cfg.mode != "quick" else 1)
    sizes = SplitSizes(cfg.pretrain_layouts, cfg.posttrain_layouts, cfg.posttrain_episodes, cfg.second_instruction,
                       cfg.eval_episodes)
    t = time.time()
    _say("-- 1/4 datasets (LeRobotDataset) and tokenizer")
    write_splits(ws / "data", sizes)
    tokenizer = Tokenizer(ws / "hub")
    from .data import SPLITS, load_split

    counts = {s: int(load_split(ws / "data" / s, first_frame_only=s.startswith("eval")).get("images").shape[0])
              for s in SPLITS}
    _say(f"   frames used: {counts} ({time.time() - t:.0f} s)")
    _say("-- 2/4 grounding pretraining of the VLM (cached)")
    pretrain_vlm(ws / "vlm", tokenizer, size, steps=cfg.vlm_steps, log=lambda m: _say("   " + m))
    vlm_info = json.loads((ws / "vlm" / "vlm.json").read_text())
    _say(f"-- 3/4 arms: {', '.join(a for arms in JOBS.values() for a in arms)}; "
         f"{cfg.pretrain_steps} pretraining + {cfg.posttrain_steps} post-training steps each")
    log_path = ws / "train.log"
    log_path.write_text("")
    jobs = [(job, seed) for seed in range(cfg.seeds) for job in ("apt", "stock_full", "stock_expert")]
    results: list[dict] = []
    args = (str(ws), vars(size), settings_dict(settings), str(log_path))
    if cfg.workers == 1:
        for job, seed in jobs:
            results += run_seed_job(job, seed, *args).values()
            _say(f"   {job} seed {seed} done ({time.time() - start:.0f} s)")
    else:
        import multiprocessing as mp

        with ProcessPoolExecutor(max_workers=cfg.workers, mp_context=mp.get_context("spawn")) as pool:
            futures = {pool.submit(run_seed_job, job, seed, *args): (job, seed) for job, seed in jobs}
            for fut in as_completed(futures):
                job, seed = futures[fut]
                results += fut.result().values()
                _say(f"   {job} seed {seed} done ({time.time() - start:.0f} s)")
    _say("-- 4/4 report")
    table = aggregate(results)
    versions = _versions()
    meta = {"config": cfg.model_dump(), "settings": settings_dict(settings), "size": vars(size), "frames": counts,
            "vlm": vlm_info, "versions": versions, "seconds": round(time.time() - start, 1),
            "command": command or "apt-plugins repro", "cores": os.cpu_count()}
    summary = {"meta": meta, "table": table, "runs": results}
    (ws / "results.json").write_text(json.dumps(summary, indent=1, default=float))
    text = write_report(ws, summary)
    if report_path is not None:
        write_report(Path(report_path).parent, summary, report_name=Path(report_path).name,
                     image_dir=Path(report_path).parent / "repro")
    _say(text.split("## Results")[1].split("##")[0] if "## Results" in text else text)
    _say(f"== repro done in {time.time() - start:.0f} s; report {ws / 'report.md'}")
    return summary


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version(), "platform": sys.platform}
    for dist in ("apt-plugins", "lerobot", "torch", "transformers", "peft"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = "not installed"
    return out
