"""Train an APT stage (or any LeRobot policy) under DeepSpeed: ``python -m apt_plugins.deepspeed.train``.

Why a small loop of our own instead of ``accelerate launch lerobot-train``: with LeRobot 0.6.1 that
route silently drops DeepSpeed on CPU machines, believes every rank is the main one, reads a float
grad norm as a tensor, ignores LeRobot's gradient clipping, and saves from rank 0 only, so ZeRO-3
checkpoints come out empty (shared/research/deepspeed.md). This loop reuses everything else of
LeRobot: its config system and CLI (every ``lerobot-train`` flag), dataset factory, policy factory,
processors, optimizer and scheduler presets, and its checkpoint layout, so the result loads with
``--policy.path``, ``lerobot-eval`` and the Stage 1 -> Stage 2 promotion.

Launch it the usual ways, with the APT flags (``--ds.*``) next to LeRobot's::

    deepspeed --num_gpus 8 --no_local_rank --module apt_plugins.deepspeed.train --ds.recipe=stage1_zero2 \\
        --policy.type=apt_pi05 --policy.apt.stage=1 --dataset.repo_id=... --batch_size=32 --steps=100000
    torchrun --nproc_per_node 8 -m apt_plugins.deepspeed.train --ds.recipe=stage1_zero2 ...
    accelerate launch --config_file $(apt-plugins recipes | grep accelerate/stage1_zero2 | awk '{print $2}') \\
        -m apt_plugins.deepspeed.train --ds.recipe=stage1_zero2 ...

``--ds.recipe``: a shipped recipe name or a JSON path. ``--ds.precision``: fp32 | autocast_bf16 |
bf16. ``--ds.deterministic_noise``: derive the flow noise and time of each sample from its dataset
index, so runs with different world sizes see the same noise. ``--ds.report=PATH``: write a JSON
report per rank (losses, optimizer-state sizes, checks) for tests and audits.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["DeepSpeedArgs", "main", "split_args"]

logger = logging.getLogger("apt_plugins.deepspeed")


@dataclass
class DeepSpeedArgs:
    """The ``--ds.*`` flags (everything else goes to LeRobot's config parser)."""

    recipe: str = "stage1_zero2"
    precision: str = "fp32"
    deterministic_noise: bool = False
    shuffle: bool = True
    report: str | None = None
    overrides: dict[str, Any] | None = None


def split_args(argv: list[str]) -> tuple[DeepSpeedArgs, list[str]]:
    """Take the ``--ds.<field>=<value>`` flags out of ``argv``; ``--ds.set.<dotted.key>=<json>`` overrides."""
    ds = DeepSpeedArgs()
    rest: list[str] = []
    overrides: dict[str, Any] = {}
    for arg in argv:
        if not arg.startswith("--ds."):
            rest.append(arg)
            continue
        key, _, value = arg[len("--ds."):].partition("=")
        if key.startswith("set."):
            overrides[key[4:]] = json.loads(value)
        elif key in ("deterministic_noise", "shuffle"):
            setattr(ds, key, value.lower() in ("1", "true", "yes", ""))
        elif key in ("recipe", "precision", "report"):
            setattr(ds, key, value)
        else:
            from ..errors import AptConfigError

            raise AptConfigError(f"ds.{key}", value, "known flags: --ds.recipe, --ds.precision, "
                                 "--ds.deterministic_noise, --ds.shuffle, --ds.report, --ds.set.<key>=<json>.")
    ds.overrides = overrides or None
    # accelerate launch passes its DeepSpeed config file through the environment.
    accelerate_file = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if accelerate_file and not any(a.startswith("--ds.recipe") for a in argv):
        ds.recipe = Path(accelerate_file).stem if not Path(accelerate_file).is_file() else accelerate_file
    return ds, rest


def _deterministic_noise(policy: Any, batch: dict[str, Any]):
    """Each sample's training randomness drawn from its dataset index (``Adapter.seeded_noise``)."""
    from .. import apt_state

    state = apt_state(policy)
    if state is None or "index" not in batch:
        raise RuntimeError("--ds.deterministic_noise needs an APT policy and batches with an 'index' key "
                           "(LeRobotDataset).")
    return state.adapter.seeded_noise(policy, [int(i) for i in batch["index"].flatten().tolist()])


def _optimizer_state_elements(engine: Any) -> int:
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    total = 0
    for state in getattr(inner, "state", {}).values():
        if isinstance(state, dict) and "exp_avg" in state:
            total += state["exp_avg"].numel()
    return total


def _full_state_dict(engine: Any, policy: Any, zero_stage: int) -> dict[str, Any] | None:
    """Every tensor of the model, gathered (collective under ZeRO-3); returned on rank 0 only."""
    import deepspeed.comm as dist

    if zero_stage == 3:
        state = engine._zero3_consolidated_16bit_state_dict()  # collective: every rank must call it
    else:
        state = policy.state_dict()
    if dist.get_rank() != 0:
        return None
    out = {k: v.detach().clone().contiguous().cpu() for k, v in state.items()}
    empty = [k for k, v in out.items() if v.numel() == 0]
    if empty:
        from ..errors import CheckpointMismatchError

        raise CheckpointMismatchError("<consolidation>", cause=f"{len(empty)} tensors came back empty "
                                      f"(e.g. {empty[0]}); ZeRO-3 partitions were not gathered.")
    return out


def _save(engine: Any, policy: Any, cfg: Any, step: int, zero_stage: int, pre: Any, post: Any) -> Path:
    """Write the step checkpoint all or nothing, then point ``checkpoints/last`` at it.

    Every rank writes into one temporary sibling of the step directory (its name is chosen by rank 0
    and broadcast); after a barrier rank 0 fsyncs it, renames it into place and swaps the ``last``
    symlink with an atomic rename. A kill at any moment leaves the step directory absent or complete,
    and ``last`` pointing at a complete checkpoint.
    """
    import deepspeed.comm as dist
    from lerobot.common.train_utils import get_step_checkpoint_dir
    from lerobot.utils.random_utils import save_rng_state

    from ..atomic import temporary_name, fsync_directory, fsync_tree, remove_stale_temporaries

    rank = dist.get_rank()
    checkpoint_dir = get_step_checkpoint_dir(cfg.output_dir, cfg.steps, step)
    name = [None]
    if rank == 0:
        checkpoint_dir.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(checkpoint_dir.parent)
        name = [str(temporary_name(checkpoint_dir))]
    dist.broadcast_object_list(name, src=0)
    tmp = Path(name[0])
    state = _full_state_dict(engine, policy, zero_stage)
    # Optimizer/scheduler/module partitions of every rank: collective.
    engine.save_checkpoint(str(tmp / "training_state" / "deepspeed"), tag="state", client_state={"step": step})
    # Each rank's RNG (LeRobot's format, no pickle): the flow noise after a resume is the noise the
    # uninterrupted run would have drawn.
    rng_dir = tmp / "training_state" / "rng" / f"rank{rank}"
    rng_dir.mkdir(parents=True, exist_ok=True)
    save_rng_state(rng_dir)
    if rank == 0:
        pretrained = tmp / "pretrained_model"
        policy.save_pretrained(pretrained, state_dict=state)
        cfg.save_pretrained(pretrained)
        if pre is not None:
            pre.save_pretrained(pretrained)
        if post is not None:
            post.save_pretrained(pretrained)
        (tmp / "training_state" / "training_step.json").write_text(json.dumps({"step": step}))
    dist.barrier()  # every rank's files are written
    if rank == 0:
        fsync_tree(tmp)
        old = None
        if checkpoint_dir.exists():  # the same step written again by a run resumed from an earlier step
            old = temporary_name(checkpoint_dir)
            os.rename(checkpoint_dir, old)
        os.rename(tmp, checkpoint_dir)
        fsync_directory(checkpoint_dir.parent)
        link = temporary_name(checkpoint_dir.parent / "last")
        link.symlink_to(checkpoint_dir.name)
        os.replace(link, checkpoint_dir.parent / "last")
        fsync_directory(checkpoint_dir.parent)
        if old is not None:
            import shutil

            shutil.rmtree(old, ignore_errors=True)
        logger.info("checkpoint step %d: %s", step, checkpoint_dir)
    dist.barrier()
    return checkpoint_dir


def run(cfg: Any, ds: DeepSpeedArgs) -> dict[str, Any]:
    """The training loop (every rank). Returns this rank's report."""
    import deepspeed
    import deepspeed.comm as dist
    import torch
    from lerobot.datasets.factory import make_dataset
    from lerobot.optim.factory import make_optimizer_and_scheduler
    from lerobot.policies.factory import make_policy, make_pre_post_processors
    from torch.utils.data import DataLoader, DistributedSampler

    from .. import fingerprint
    from ..stages import apt_state
    from .config import load_recipe, resolve_recipe

    cpu = not torch.cuda.is_available()
    if cpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if "RANK" not in os.environ:
        # Started as plain `python -m ...`: one process. Without these DeepSpeed falls back to MPI
        # discovery and fails with "No module named 'mpi4py'".
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_SIZE="1",
                          MASTER_ADDR=os.environ.get("MASTER_ADDR", "127.0.0.1"),
                          MASTER_PORT=os.environ.get("MASTER_PORT", str(port)))
    deepspeed.init_distributed(dist_backend="gloo" if cpu else "nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    if not cpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"[rank{rank}] %(asctime)s %(name)s %(message)s")
    cfg.validate()
    if cfg.policy is not None and cpu:
        cfg.policy.device = "cpu"
    recipe = load_recipe(ds.recipe)
    ds_config = resolve_recipe(
        recipe,
        micro_batch_size=cfg.batch_size,
        grad_clip_norm=cfg.optimizer.grad_clip_norm,
        precision=ds.precision,
        overrides=ds.overrides,
    )
    zero_stage = ds_config.get("zero_optimization", {}).get("stage", 0)
    torch.manual_seed(cfg.seed or 0)  # identical initialisation on every rank

    dataset = make_dataset(cfg)
    policy = make_policy(cfg=cfg.policy, ds_meta=dataset.meta)
    processor_kwargs: dict[str, Any] = {}
    if not (cfg.policy.pretrained_path and cfg.resume):
        processor_kwargs["dataset_stats"] = dataset.meta.stats
    pre, post = make_pre_post_processors(policy_cfg=cfg.policy, pretrained_path=cfg.policy.pretrained_path,
                                         **processor_kwargs)
    state = apt_state(policy)
    if state is not None and state.config.check_frozen:
        # Before DeepSpeed partitions anything: afterwards ZeRO-3 parameters are empty between steps.
        policy._apt_frozen_fingerprints = fingerprint(policy, frozen_only=True)
    frozen_before = fingerprint(policy, frozen_only=True)
    trainable = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    optimizer, scheduler = make_optimizer_and_scheduler(cfg, policy)
    if ds_config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device") == "cpu":
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        # ZeRO-Offload refuses a torch optimizer; DeepSpeedCPUAdam takes the same groups (lr, weight decay).
        groups = [{k: v for k, v in g.items() if k != "initial_lr"} for g in optimizer.param_groups]
        optimizer = DeepSpeedCPUAdam(groups, lr=cfg.optimizer.lr, betas=cfg.optimizer.betas, eps=cfg.optimizer.eps,
                                     weight_decay=cfg.optimizer.weight_decay, adamw_mode=True)
        scheduler = cfg.scheduler.build(optimizer, cfg.steps) if cfg.scheduler is not None else None
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=policy, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
    )
    start = 0
    if cfg.resume:
        _, client = engine.load_checkpoint(str(Path(cfg.checkpoint_path) / "training_state" / "deepspeed"),
                                           tag="state", load_module_strict=True)
        start = int((client or {}).get("step", 0))
        logger.info("resumed at step %d", start)

    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=ds.shuffle, seed=cfg.seed or 0,
                                 drop_last=True)
    loader = DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.num_workers,
                        drop_last=True, pin_memory=not cpu)
    epoch = start // max(1, len(loader))
    sampler.set_epoch(epoch)
    iterator = iter(loader)
    for _ in range(start % max(1, len(loader))):  # resume the data order
        next(iterator)
    if cfg.resume:
        # Restored only now: iter(loader) above drew from the global RNG, which the uninterrupted run
        # did at the start of the epoch, not at this step.
        rng_dir = Path(cfg.checkpoint_path) / "training_state" / "rng" / f"rank{rank}"
        if (rng_dir / "rng_state.safetensors").is_file():
            from lerobot.utils.random_utils import load_rng_state

            load_rng_state(rng_dir)
        else:
            logger.warning("no RNG state for rank %d in %s (written by an older version): the run resumes, "
                           "but its flow noise differs from an uninterrupted run", rank, cfg.checkpoint_path)
    report: dict[str, Any] = {"rank": rank, "world": world, "zero_stage": zero_stage, "losses": [],
                              "trainable_elements": trainable}
    engine.train()
    step = start
    t0 = time.time()
    while step < cfg.steps:
        try:
            batch = next(iterator)
        except StopIteration:
            epoch += 1
            sampler.set_epoch(epoch)
            iterator = iter(loader)
            batch = next(iterator)
        for key in dataset.meta.camera_keys:
            if key in batch and batch[key].dtype == torch.uint8:
                batch[key] = batch[key].to(torch.float32) / 255.0
        batch = pre(batch)
        noise = _deterministic_noise(policy, batch) if ds.deterministic_noise else contextlib.nullcontext()
        with noise:
            loss, _ = engine(batch)
        engine.backward(loss)
        engine.step()
        step += 1
        mean_loss = loss.detach().float().clone()
        dist.all_reduce(mean_loss)
        mean_loss = float(mean_loss) / world
        report["losses"].append(mean_loss)
        if zero_stage == 3 and step == 1:
            report["params_partitioned"] = all(p.data.numel() == 0 for p in policy.parameters())
        if rank == 0 and (step % max(1, cfg.log_freq) == 0 or step == cfg.steps):
            logger.info("step:%d loss:%.4f lr:%.2e (%.2fs/step)", step, mean_loss, engine.get_lr()[0],
                        (time.time() - t0) / max(1, step - start))
        if cfg.save_checkpoint and (step % cfg.save_freq == 0 or step == cfg.steps):
            _save(engine, policy, cfg, step, zero_stage, pre, post)
    report["optimizer_state_elements"] = _optimizer_state_elements(engine)
    report["optimizer"] = type(getattr(engine.optimizer, "optimizer", engine.optimizer)).__name__
    report["group_lrs"] = {g.get("name", str(i)): g["lr"] for i, g in enumerate(engine.optimizer.param_groups)}
    report["steps"] = step
    # Frozen tensors, gathered: bit-identical to the start, on every rank.
    full = engine._zero3_consolidated_16bit_state_dict() if zero_stage == 3 else policy.state_dict()
    if rank == 0 or zero_stage != 3:
        names = [n for n in frozen_before if n in full]
        from ..checkpoint import tensor_fingerprint

        report["frozen_unchanged"] = all(tensor_fingerprint(full[n]) == frozen_before[n] for n in names)
        report["frozen_checked"] = len(names)
        report["checksum"] = float(sum(v.double().sum() for v in full.values() if v.is_floating_point()))
    return {"engine": engine, "report": report}


def main(argv: list[str] | None = None) -> int:
    """Console entry point (every rank runs it)."""
    ds, rest = split_args(list(sys.argv[1:] if argv is None else argv))
    sys.argv = [sys.argv[0], *rest]
    from lerobot.configs import parser
    from lerobot.configs.train import TrainPipelineConfig
    from lerobot.utils.import_utils import register_third_party_plugins

    register_third_party_plugins()
    result: dict[str, Any] = {}

    def _train(cfg):
        result.update(run(cfg, ds))

    # LeRobot's parser reads the config class from the annotation (a real class, not a string).
    _train.__annotations__ = {"cfg": TrainPipelineConfig, "return": None}
    parser.wrap()(_train)()
    import deepspeed.comm as dist

    report = result["report"]
    if ds.report:
        path = Path(ds.report.replace("{rank}", str(report["rank"])))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2))
    # Tear down in this order, or about half of the multi-process runs abort at exit (SIGABRT).
    result["engine"].destroy()
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
