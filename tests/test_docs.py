"""The documentation cannot drift from the code: hooks, public names, config fields, errors, checks.

Each test reads the contract from the code (the hookspec module, ``__all__``, ``AptConfig``, the
error module, ``CHECKS``) and looks for it in ``docs/``, so adding a hook, field, error or check
without documenting it fails here.
"""

from __future__ import annotations

import inspect
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

import apt_plugins
from apt_plugins import AptConfig, errors, hookspecs
from apt_plugins.manager import PluginManager
from apt_plugins.testing import CHECKS

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def _read(name: str) -> str:
    return (DOCS / name).read_text()


def _hookspecs() -> dict[str, inspect.Signature]:
    marker = f"{hookspecs.PROJECT_NAME}_spec"  # pluggy stores spec options under this attribute
    return {
        name: inspect.signature(fn)
        for name, fn in inspect.getmembers(hookspecs, inspect.isfunction)
        if hasattr(fn, marker)
    }


def _signature(name: str, sig: inspect.Signature) -> str:
    return f"{name}({', '.join(sig.parameters)})"


def _sections(text: str, level: str = "## ") -> dict[str, str]:
    """Heading text -> body, for headings of exactly ``level`` (code blocks are not headings)."""
    out: dict[str, str] = {}
    current, lines, fenced = None, [], False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        if not fenced and line.startswith(level) and not line.startswith(level + "#"):
            if current is not None:
                out[current] = "\n".join(lines)
            current, lines = line[len(level):].strip(), []
        else:
            lines.append(line)
    if current is not None:
        out[current] = "\n".join(lines)
    return out


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


# ------------------------------------------------------------------------------------------ hooks
def test_the_hookspec_module_has_hooks():
    assert len(_hookspecs()) >= 8  # guards the discovery below against finding nothing


@pytest.mark.parametrize("name", sorted(_hookspecs()))
def test_every_hook_is_documented_with_its_exact_signature(name):
    heading = _signature(name, _hookspecs()[name])
    assert heading in _sections(_read("hooks.md")), (
        f"docs/hooks.md needs a section headed '## {heading}' (the hook's exact signature)"
    )


def test_hooks_md_documents_no_hook_that_does_not_exist():
    specs = {_signature(n, s) for n, s in _hookspecs().items()}
    documented = {h for h in _sections(_read("hooks.md")) if h.startswith("apt_")}
    assert documented <= specs, f"docs/hooks.md documents unknown or outdated hooks: {sorted(documented - specs)}"


def _load_example(code: str, name: str) -> tuple[PluginManager, types.ModuleType]:
    module = types.ModuleType(f"hooks_md_{name}")
    exec(compile(code, f"docs/hooks.md ({name})", "exec"), module.__dict__)
    pm = PluginManager(autoload=False)
    pm.register_plugin(module, name=module.__name__)
    return pm, module


@pytest.mark.parametrize("name", sorted(_hookspecs()))
def test_hook_examples_register_against_the_spec(name):
    """Each hook's example is valid Python and pluggy accepts it as an implementation of that hook."""
    body = _sections(_read("hooks.md")).get(_signature(name, _hookspecs()[name]), "")
    blocks = _python_blocks(body)
    assert blocks, f"the docs/hooks.md section of {name} has no python example"
    pm, module = _load_example("\n\n".join(blocks), name)
    info = pm.plugins[module.__name__]
    assert info.error is None, f"the {name} example fails to register: {info.error}"
    assert name in info.hooks, f"the {name} example does not implement {name}"
    pm.pm.check_pending()  # no misspelt apt_* implementation


def test_the_register_adapters_example_registers_a_valid_adapter():
    body = _sections(_read("hooks.md"))["apt_register_adapters(register)"]
    pm, module = _load_example("\n\n".join(_python_blocks(body)), "register")
    assert pm.plugins[module.__name__].adapters == ["toy_vla"]


def test_the_param_groups_example_covers_every_trainable_parameter_once():
    import torch

    from apt_plugins import Adapter, GatedCrossAttention, prepare_stage

    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.vlm = torch.nn.Linear(8, 8)
            self.expert = torch.nn.Linear(8, 8)
            self.apt_fusion = torch.nn.ModuleList([GatedCrossAttention(8, 2, 4)])

    class ToyAdapter(Adapter):
        name, host, supported_host_versions, description = "docs_toy", "torch", ">=2", "toy"

        def matches(self, policy):
            return isinstance(policy, Toy)

        def module_groups(self, policy):
            return {"language_model": ["vlm"], "action_expert": ["expert"], "fusion": ["apt_fusion"]}

        def inject(self, policy, config):
            pass

    policy, adapter, config = Toy(), ToyAdapter(), AptConfig(stage=2)
    prepare_stage(policy, config, adapter=adapter)
    body = _sections(_read("hooks.md"))["apt_param_groups(policy, adapter, config, base_lr, weight_decay)"]
    _, module = _load_example("\n\n".join(_python_blocks(body)), "param_groups")
    groups = module.apt_param_groups(policy, adapter, config, 1e-4, 1e-2)
    params = [id(p) for g in groups for p in g["params"]]
    assert sorted(params) == sorted(id(p) for p in policy.parameters() if p.requires_grad)
    assert {g["name"]: g["lr"] for g in groups}["gates"] == pytest.approx(1e-3)
    torch.optim.AdamW(groups)  # the groups are valid optimizer input


# ------------------------------------------------------------------------------------ public API
def _all_docs() -> str:
    return "\n".join(p.read_text() for p in sorted(DOCS.glob("*.md")))


@pytest.mark.parametrize("name", sorted(apt_plugins.__all__))
def test_every_public_name_is_mentioned_in_docs(name):
    assert re.search(rf"(?<![\w.]){re.escape(name)}(?!\w)", _all_docs()), f"apt_plugins.{name} is not mentioned in docs/"


# --------------------------------------------------------------------------------- configuration
@pytest.mark.parametrize("field", list(AptConfig.model_fields))
def test_every_config_field_is_documented(field):
    text = _read("configuration.md")
    assert f"| `{field}` |" in text, f"docs/configuration.md has no table row for {field}"
    assert f"### `{field}`" in text, f"docs/configuration.md has no section for {field}"


def test_configuration_md_is_generated_and_current():
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_config_docs.py"), "--check"],
        capture_output=True, text=True, cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr


def test_gen_config_docs_check_fails_on_a_stale_file(tmp_path):
    stale = tmp_path / "configuration.md"
    stale.write_text(_read("configuration.md").replace("| `stage` |", "| `stage_old` |"))
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_config_docs.py"), "--check", "--output", str(stale)],
        capture_output=True, text=True, cwd=ROOT,
    )
    assert result.returncode == 1 and "out of date" in result.stderr


# ---------------------------------------------------------------------------------------- errors
def _error_classes() -> list[str]:
    return sorted(
        name for name, obj in inspect.getmembers(errors, inspect.isclass)
        if issubclass(obj, BaseException) and obj.__module__ == errors.__name__
    )


def test_the_error_module_has_errors():
    assert "AptError" in _error_classes() and len(_error_classes()) >= 5


@pytest.mark.parametrize("name", _error_classes())
def test_every_error_class_has_a_section_in_errors_md(name):
    assert name in _sections(_read("errors.md")), f"docs/errors.md needs a section '## {name}'"


# ----------------------------------------------------------------------------------- conformance
@pytest.mark.parametrize("check", list(CHECKS))
def test_every_conformance_check_is_documented(check):
    assert check in _sections(_read("conformance.md"), level="### "), (
        f"docs/conformance.md needs a section '### {check}'"
    )


# ----------------------------------------------------------------------------------------- links
def _anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text, found, fenced = path.read_text(), set(), False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (m := re.match(r"#{1,6} (.*)", line)):
            found.add(_anchor(m.group(1).replace("`", "")))
    return found


_LINKED = sorted([*DOCS.glob("*.md"), ROOT / "CONTRIBUTING.md"])


@pytest.mark.parametrize("path", _LINKED, ids=lambda p: p.name)
def test_relative_links_and_anchors_resolve(path):
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+://", target):
            continue
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        assert dest.exists(), f"{path.name}: link to missing file {target}"
        if anchor and dest.suffix == ".md":
            assert anchor in _anchors(dest), f"{path.name}: no heading for anchor {target}"


def test_conformance_md_documents_no_check_that_does_not_exist():
    checks_section = _read("conformance.md").split("## The checks", 1)[1].split("\n## ", 1)[0]
    documented = set(_sections(checks_section, level="### "))
    assert documented <= set(CHECKS), f"docs/conformance.md documents unknown checks: {sorted(documented - set(CHECKS))}"
