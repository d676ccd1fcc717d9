"""``apt-plugins eval-language``: the command-line front end of the language evaluator.

Flags follow LeRobot's spelling (``--policy.path``, ``--dataset.repo_id``, ``--policy.device``,
``--env.type``, ``--eval.n_episodes``, ``--output_dir``). Everything is computed first and the
files are written at the end, through temporary names, so a failure leaves no partial output.
Building the parser imports neither torch nor LeRobot.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from ...errors import AptConfigError
from .variants import VARIANTS, validate_variants

__all__ = ["add_arguments", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add the ``eval-language`` flags to ``p``."""
    p.add_argument("--policy.path", dest="policy_path",
                   help="checkpoint to evaluate: a pretrained_model directory, or a repo id in the local hub cache")
    p.add_argument("--compare", nargs="+", metavar="CKPT", default=[],
                   help="more checkpoints: all policies go in one table and one plot")
    p.add_argument("--dataset.repo_id", dest="dataset_repo_id", help="LeRobot dataset repo id (frames and tasks)")
    p.add_argument("--dataset.root", dest="dataset_root", help="local LeRobot dataset directory")
    p.add_argument("--policy.device", dest="device", default="cpu", help="cpu, cuda, cuda:1, mps (default cpu)")
    p.add_argument("--frames", type=int, default=16, help="dataset frames, sampled across episodes and tasks")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"comma-separated instruction variants (default: all of {', '.join(VARIANTS)})")
    p.add_argument("--seed", type=int, default=0, help="fixes frames, variant texts and sampling noise")
    p.add_argument("--batch_size", type=int, default=8, help="frames per forward pass")
    p.add_argument("--paraphrase_rules", help='JSON file {"synonyms": {...}, "templates": [...]} added to the defaults')
    p.add_argument("--output_dir", default="outputs/eval_language", help="where the JSON report and plots go")
    p.add_argument("--no_plots", action="store_true", help="write no PNG plots")
    p.add_argument("--progress", choices=("auto", "on", "off"), default="auto",
                   help="progress bar over frames (auto: only on a terminal)")
    p.add_argument("--env.type", dest="env_type",
                   help="closed loop: also run episodes in this LeRobot env (e.g. apt_blocks) under each variant")
    p.add_argument("--env.episode_length", dest="episode_length", type=int, help="closed loop: steps per episode")
    p.add_argument("--eval.n_episodes", dest="n_episodes", type=int, default=4, help="closed loop: episodes per variant")
    p.add_argument("--import", dest="imports", action="append", help="import this module first (repeatable)")


def _policies(args: argparse.Namespace) -> list[str]:
    policies = ([args.policy_path] if args.policy_path else []) + list(args.compare)
    if not policies:
        raise AptConfigError("policy.path", None, "give --policy.path=<checkpoint> (and optionally --compare <more>).")
    from ..policy import resolve_checkpoint_dir

    for path in policies:  # every checkpoint is found before the first one is evaluated
        resolve_checkpoint_dir(path)
    return policies


def run(args: argparse.Namespace) -> int:
    """Run the command; return the exit code (0 on success)."""
    import importlib

    for module in args.imports or ():
        importlib.import_module(module)
    policies = _policies(args)
    if not args.dataset_repo_id and not args.dataset_root:
        raise AptConfigError("dataset.repo_id", None, "give --dataset.repo_id=<repo> (and --dataset.root=<dir> "
                             "for a local dataset): the frames and tasks come from it.")
    variants = validate_variants([v.strip() for v in args.variants.split(",") if v.strip()])
    progress = {"auto": None, "on": True, "off": False}[args.progress]

    from .report import format_comparison
    from .runner import checkpoint_name, evaluate_language

    names = _unique([checkpoint_name(p) for p in policies])
    reports = [
        evaluate_language(path, args.dataset_repo_id or "local/dataset", dataset_root=args.dataset_root,
                          frames=args.frames, variants=variants, seed=args.seed, device=args.device,
                          batch_size=args.batch_size, paraphrase_rules=args.paraphrase_rules, progress=progress,
                          name=name)
        for path, name in zip(policies, names, strict=True)
    ]
    closed = []
    if args.env_type:
        from lerobot.envs.factory import make_env_config

        from .closed_loop import evaluate_closed_loop

        import apt_plugins.lerobot.env  # noqa: F401  (registers apt_blocks)

        overrides = {"episode_length": args.episode_length} if args.episode_length else {}
        env_cfg = make_env_config(args.env_type, **overrides)
        closed = [evaluate_closed_loop(path, env_cfg, variants=variants, episodes=args.n_episodes, seed=args.seed,
                                       device=args.device, name=name, progress=progress,
                                       tasks=reports[0].dataset["tasks"])
                  for path, name in zip(policies, names, strict=True)]

    for report in reports:
        print(report.format_table(), end="\n\n")
    if len(reports) > 1:
        print(format_comparison(reports), end="\n\n")
    for report in closed:
        print(report.format_table(), end="\n\n")

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".eval_language.", dir=out))
    try:
        written = []
        for report in reports:
            written.append(report.write_json(staging / f"{report.name}.json"))
            if not args.no_plots:
                written += report.save_plots(staging, prefix=report.name)
        for report in closed:
            written.append(report.write_json(staging / f"{report.policy['name']}_closed_loop.json"))
        if len(reports) > 1 and not args.no_plots:
            from .plots import plot_divergence_bars

            written.append(plot_divergence_bars(reports, staging / "compare_divergence.png"))
        for path in written:
            path.replace(out / path.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"wrote {', '.join(str(out / p.name) for p in written)}")
    return 0


def _unique(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name}_{seen[name]}")
    return out
