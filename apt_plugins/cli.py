"""The ``apt-plugins`` command line.

Commands:

- ``apt-plugins list``: plugins (with load errors), adapters, supported and installed host versions.
- ``apt-plugins report``: the Stage 1 -> Stage 2 invariant report on tiny real models.
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
