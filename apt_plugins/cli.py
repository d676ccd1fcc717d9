"""The ``apt-plugins`` command line.

Commands:

- ``apt-plugins list``: plugins (with load errors), adapters, supported and installed host versions.
- ``apt-plugins report``: the Stage 1 -> Stage 2 invariant report on tiny real models.
- ``apt-plugins retrofit SRC OUT --stage {1,2}``: turn a plain LeRobot checkpoint into an APT one (an openpi one with ``--openpi-config``).
- ``apt-plugins openpi-train CONFIG [openpi flags] --apt.stage=1``: APT inside openpi's own PyTorch trainer.
- ``apt-plugins convert SRC OUT --to {lerobot,openpi}``: pi0/pi0.5 checkpoints between the openpi and LeRobot layouts.
- ``apt-plugins verify CHECKPOINT [--parent P] [--dataset-root DIR]``: the invariants on your checkpoint.
- ``apt-plugins demo``: the whole story through ``lerobot-train`` on a synthetic dataset (CPU, offline).
- ``apt-plugins eval-language --policy.path=CKPT --dataset.repo_id=REPO``: how much a policy follows its instruction.
- ``apt-plugins repro [--quick]``: the CPU-scale reproduction of the paper's effect (stock pi0 vs APT).
- ``apt-plugins recipes``: the recipes shipped in the package.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

__all__ = ["main"]


def _cmd_list(args: argparse.Namespace) -> int:
    from . import __version__, get_plugin_manager

    pm = get_plugin_manager()
    if args.json:
        data = {
            "apt_plugins": __version__,
            "plugins": [vars(info) for info in pm.plugins.values()],
            "adapters": [
                {
                    "name": a.name,
                    "plugin": pm.registry.owner(a.name),
                    "host": a.host,
                    "supported_host_versions": a.supported_host_versions,
                    "installed_host_version": a.host_version(),
                    "policy_types": list(a.policy_types),
                    "apt_policy_types": list(a.apt_policy_types),
                    "description": a.description,
                }
                for a in pm.registry
            ],
        }
        print(json.dumps(data, indent=2))
        return 0
    print(f"apt-plugins {__version__}")
    print("\nplugins:")
    for info in pm.plugins.values():
        status = "blocked" if info.blocked else ("ERROR" if info.error else "ok")
        print(f"  {info.name:<28} {status:<8} {info.source}")
        if info.hooks:
            print(f"  {'':<28} hooks: {', '.join(info.hooks)}")
        if info.error:
            print(f"  {'':<28} {info.error}")
    print("\nadapters:")
    if not len(pm.registry):
        print("  (none registered)")
    for a in pm.registry:
        installed = a.host_version() or "not installed"
        print(f"  {a.name:<16} host {a.host} {a.supported_host_versions} (installed: {installed})")
        types = ", ".join(a.apt_policy_types) or "-"
        print(f"  {'':<16} types: {types}; plugin: {pm.registry.owner(a.name)}")
        print(f"  {'':<16} {a.description}")
    return 1 if any(info.error for info in pm.plugins.values()) and args.strict else 0


def _cmd_recipes(args: argparse.Namespace) -> int:
    from .recipes import list_recipes, recipe_path

    for name in list_recipes():
        print(f"{name:<40} {recipe_path(name)}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from .report import run_report

    return run_report(args.adapter or None, steps=args.steps)


def _import_modules(names: Sequence[str] | None) -> None:
    import importlib

    for name in names or ():
        importlib.import_module(name)


def _cmd_retrofit(args: argparse.Namespace) -> int:
    _import_modules(args.imports)
    if args.openpi_config:
        return _openpi_command("retrofit_command", args)
    from .lerobot.retrofit import retrofit

    overrides = {}
    if args.keep_language_paths:
        overrides["inherited_layers_keep_language_mask"] = False
    if args.vlm_mode:
        overrides["vlm_mode"] = args.vlm_mode
    report = retrofit(args.src, args.out, args.stage, apt_overrides=overrides, reinit_expert=args.reinit_expert,
                      seed=args.seed, probe=not args.no_probe)
    print(report.summary())
    return 0


def _openpi_command(name: str, args: argparse.Namespace) -> int:
    # The openpi integration lives with its adapter (it needs openpi, which has its own environment).
    from .errors import AptError

    try:
        from apt_plugins_openpi_pi import commands
    except ImportError as exc:
        raise AptError(f"{args.command}: the openpi adapter cannot be imported ({exc}); run it in the openpi "
                       "environment (.venv-openpi, see docs/openpi.md).") from None
    return getattr(commands, name)(args)


def _cmd_openpi_train(args: argparse.Namespace) -> int:
    _import_modules(args.imports)
    return _openpi_command("train_command", args)


def _cmd_convert(args: argparse.Namespace) -> int:
    from .convert import convert_checkpoint
    from .errors import AptError

    model_config = None
    if args.model_config:
        try:
            model_config = json.loads(args.model_config)
        except json.JSONDecodeError as exc:
            raise AptError(f"convert: --model-config is not JSON ({exc}); give the Pi0Config fields as an "
                           "object, e.g. '{\"pi05\": false, \"action_horizon\": 50, \"max_token_len\": 48}'.") from None
    report = convert_checkpoint(args.src, args.out, args.to, policy_type=args.policy_type,
                                lerobot_template=args.lerobot_template, model_config=model_config,
                                tie_embeddings=args.tie_embeddings)
    print(report.summary())
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from .lerobot.verify import format_checks, verify

    _import_modules(args.imports)
    checks = verify(args.checkpoint, parent=args.parent, dataset_repo_id=args.dataset_repo_id,
                    dataset_root=args.dataset_root, frames=args.frames, seed=args.seed)
    print(format_checks(checks))
    return 1 if any(c.status == "FAIL" for c in checks) else 0


def _cmd_eval_language(args: argparse.Namespace) -> int:
    from .lerobot.language_eval.command import run

    return run(args)


def _cmd_demo(args: argparse.Namespace) -> int:
    from .lerobot.demo import run_demo

    return run_demo(args.workdir, steps=args.steps, policy=args.policy, fresh=not args.keep)


def _cmd_repro(args: argparse.Namespace) -> int:
    from .repro.run import FULL, QUICK, run_repro

    overrides = {k: v for k, v in (("seeds", args.seeds), ("workers", args.workers)) if v is not None}
    config = {**(QUICK if args.quick else FULL), **overrides}
    paths = {k: v for k, v in (("workdir", args.workdir if args.workdir != "runs/repro" else None),
                               ("report", args.report)) if v is not None}
    command = "apt-plugins repro" + (" --quick" if args.quick else "") + "".join(
        f" --{k} {v}" for k, v in {**overrides, **paths}.items())
    run_repro(args.workdir, config, report_path=args.report, command=command)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for documentation and tests)."""
    parser = argparse.ArgumentParser(prog="apt-plugins", description="APT (Action-expert PreTraining) for VLA policies.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("list", help="show plugins, adapters and supported host versions")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--strict", action="store_true", help="exit 1 if any plugin failed to load")
    p.set_defaults(func=_cmd_list)
    p = sub.add_parser("report", help="the Stage 1 -> Stage 2 invariant report on tiny real models (CPU, offline)")
    p.add_argument("--adapter", action="append", help="adapter name (repeatable; default: all with a kit)")
    p.add_argument("--steps", type=int, default=20, help="training steps per stage")
    p.set_defaults(func=_cmd_report)
    p = sub.add_parser("retrofit", help="turn a plain LeRobot pi0/pi0.5/smolvla/groot checkpoint into an APT checkpoint")
    p.add_argument("src", help="a LeRobot pretrained_model directory, or a repo id in the local hub cache")
    p.add_argument("out", help="new output directory (nothing is written there unless everything succeeds)")
    p.add_argument("--stage", type=int, choices=(1, 2), required=True, help="APT stage to prepare")
    p.add_argument("--reinit-expert", action="store_true",
                   help="stage 1: re-initialise the action expert (the paper trains it from scratch)")
    p.add_argument("--keep-language-paths", action="store_true",
                   help="stage 2: inherited layers keep their language paths, so the result reproduces the source "
                   "exactly (checked on a probe batch)")
    p.add_argument("--vlm-mode", choices=("frozen", "lora", "full"), help="stage 2: how the VLM trains")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-probe", action="store_true", help="skip the probe comparison with the source policy")
    p.add_argument("--import", dest="imports", action="append", help="import this module first (repeatable)")
    p.add_argument("--openpi-config", help="SRC is an openpi PyTorch checkpoint (model.safetensors) trained with this "
                   "openpi TrainConfig name; run in the openpi environment")
    p.set_defaults(func=_cmd_retrofit)
    p = sub.add_parser("openpi-train", help="APT inside openpi's own PyTorch trainer (scripts/train_pytorch.py): "
                       "CONFIG and openpi's flags as for train_pytorch.py, plus --apt.<field>=<value>")
    p.add_argument("--import", dest="imports", action="append", help="import this module first (repeatable)")
    p.add_argument("config", help="an openpi TrainConfig name (debug, pi05_libero, ...)")
    p.add_argument("args", nargs=argparse.REMAINDER, help="openpi's flags and --apt.<field>=<value> (docs/openpi.md)")
    p.set_defaults(func=_cmd_openpi_train)
    p = sub.add_parser("convert", help="convert a pi0/pi0.5 checkpoint (plain or APT) between the openpi and LeRobot "
                       "layouts; tensors are renamed, never changed (docs/openpi.md)")
    p.add_argument("src", help="an openpi checkpoint step directory or a LeRobot pretrained_model directory")
    p.add_argument("out", help="new output directory (absent or complete, never partial)")
    p.add_argument("--to", choices=("lerobot", "openpi"), required=True, help="target layout")
    p.add_argument("--policy-type", choices=("pi0", "pi05", "apt_pi0", "apt_pi05"),
                   help="--to lerobot: the LeRobot type (default: from the source; must agree with it)")
    p.add_argument("--lerobot-template", help="--to lerobot: a LeRobot pretrained_model directory whose config "
                   "(features, normalisation) and processor files are taken over")
    p.add_argument("--model-config", help="--to lerobot from a plain openpi checkpoint without config.json: the "
                   "Pi0Config fields as JSON")
    p.add_argument("--tie-embeddings", action="store_true", help="--to openpi: LeRobot's VLM embed_tokens and lm_head "
                   "differ; keep the embedding as openpi's tied tensor and drop the unused lm_head")
    p.set_defaults(func=_cmd_convert)
    p = sub.add_parser("verify", help="check the APT invariants on a checkpoint; exit 1 on a failure")
    p.add_argument("checkpoint", help="an APT pretrained_model directory (or a repo id in the local hub cache)")
    p.add_argument("--parent", help="the Stage-1 checkpoint a Stage-2 run started from")
    p.add_argument("--dataset-repo-id", help="LeRobot dataset repo id (with --dataset-root for a local one)")
    p.add_argument("--dataset-root", help="local LeRobot dataset directory")
    p.add_argument("--frames", type=int, default=4, help="dataset frames to test on")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--import", dest="imports", action="append", help="import this module first (repeatable)")
    p.set_defaults(func=_cmd_verify)
    p = sub.add_parser("demo", help="the whole APT story through lerobot-train on a synthetic dataset (CPU, offline)")
    p.add_argument("--workdir", default="runs/demo", help="where the dataset, checkpoints, logs and plot go")
    p.add_argument("--steps", type=int, default=300, help="lerobot-train steps per stage")
    p.add_argument("--policy", default="apt_pi0", choices=("apt_pi0", "apt_pi05"))
    p.add_argument("--keep", action="store_true", help="reuse an existing workdir instead of starting fresh")
    p.set_defaults(func=_cmd_demo)
    p = sub.add_parser("repro", help="the CPU-scale reproduction: stock pi0 vs APT on a language task with a visual "
                       "shortcut; table and plots in a Markdown report (see docs/repro.md)")
    p.add_argument("--quick", action="store_true", help="tiny sizes (about a minute): checks the pipeline, not the result")
    p.add_argument("--workdir", default="runs/repro", help="datasets, VLM cache, checkpoints, logs, results and report")
    p.add_argument("--report", help="also write the report here (for example docs/repro_results.md), plots beside it")
    p.add_argument("--seeds", type=int, help="seeds per arm (default: 3; --quick: 1)")
    p.add_argument("--workers", type=int, help="worker processes, one torch thread each (default: 2; --quick: 1)")
    p.set_defaults(func=_cmd_repro)
    p = sub.add_parser("eval-language", help="how much a LeRobot policy follows its instruction: counterfactual "
                       "instructions on dataset frames (and closed-loop episodes), table, JSON and plots")
    from .lerobot.language_eval.command import add_arguments as add_eval_language_arguments

    add_eval_language_arguments(p)
    p.set_defaults(func=_cmd_eval_language)
    p = sub.add_parser("recipes", help="list the recipes shipped in the package")
    p.set_defaults(func=_cmd_recipes)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``apt-plugins`` console script."""
    from .errors import AptError

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except AptError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
