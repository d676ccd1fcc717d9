"""Recipes shipped with apt-plugins (installed as ``apt_plugins.recipes``), selectable by name.

A recipe name is its path below this folder without the extension, e.g. ``stages/stage1_va_prior``.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["list_recipes", "recipe_path", "load_recipe"]

_ROOT = Path(__file__).resolve().parent
_SUFFIXES = (".yaml", ".yml", ".json")


def list_recipes() -> list[str]:
    """All recipe names."""
    return sorted(
        str(p.relative_to(_ROOT).with_suffix("")) for p in _ROOT.rglob("*") if p.suffix in _SUFFIXES
    )


def recipe_path(name: str) -> Path:
    """The file of recipe ``name``; unknown names raise with the closest match and the list."""
    for suffix in _SUFFIXES:
        path = _ROOT / f"{name}{suffix}"
        if path.is_file():
            return path
    import difflib

    from apt_plugins.errors import AptConfigError

    known = list_recipes()
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise AptConfigError("recipe", name, f"unknown recipe.{hint} Known recipes: {', '.join(known)}.")


def load_recipe(name: str) -> dict:
    """Parse recipe ``name`` (YAML or JSON) into a dict."""
    path = recipe_path(name)
    text = path.read_text()
    if path.suffix == ".json":
        import json

        return json.loads(text)
    import yaml

    return yaml.safe_load(text)
