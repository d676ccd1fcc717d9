"""Generate docs/configuration.md from :class:`apt_plugins.AptConfig`.

The field table (type, default, allowed values, description) comes from the pydantic model's JSON
schema, so it cannot drift from the code. The per-field notes and the "how to set it" sections are
written here; a note for a field that no longer exists is an error.

Usage::

    .venv/bin/python scripts/gen_config_docs.py           # rewrite docs/configuration.md
    .venv/bin/python scripts/gen_config_docs.py --check   # exit 1 if the file is out of date
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OUTPUT = ROOT / "docs" / "configuration.md"

# JSON-schema scalar types, written the way a Python user reads them.
_TYPES = {"integer": "int", "number": "float", "string": "str", "boolean": "bool", "null": "null"}

# What the schema cannot say: when a field is read, what the pi0/pi0.5 adapter does with it, and
# the source of its default. Keys must be AptConfig fields.
NOTES: dict[str, str] = {
    "stage": (
        "Stage 1 trains the action expert alone, with the VLM frozen and the language tokens hidden "
        "from every attention path that reaches the state/action tokens. Stage 2 adds one gated "
        "cross-attention fusion layer after each expert layer. A Stage-2 run normally starts from a "
        "Stage-1 checkpoint (promotion: every tensor is carried over, only the fusion tensors are new; "
        "see [lerobot_pi.md](lerobot_pi.md#promotion-strict-loading-and-the-manifest)). The paper's "
        "reference code calls the stages `train_stage=0` and `train_stage=1`; here they are 1 and 2."
    ),
    "vlm_mode": (
        "Stage 1 accepts only `'frozen'` (checked when the config is parsed). `'frozen'`: every VLM "
        "parameter has `requires_grad=False`, the VLM modules stay in eval mode even when the policy "
        "is put in train mode, and the prefix runs without autograd. `'lora'`: peft LoRA adapters are "
        "attached to the adapter's targets (see `lora_targets`); only the `lora_` tensors train. "
        "`'full'`: vision tower, projector and language model train. Parameters in the adapter's "
        "`unused` group (LM heads, final norm, the parts of the last VLM layer the expert never reads) "
        "stay frozen in every mode."
    ),
    "vlm_lr_multiplier": (
        "Read only when the VLM trains (`vlm_mode='lora'` or `'full'`). Applies to every trainable "
        "VLM tensor, LoRA tensors included (optimizer groups `vlm` and `vlm_no_decay`). The default "
        "reproduces the paper's 1e-5 VLM learning rate against 1e-4 for the expert."
    ),
    "vlm_weight_decay": (
        "Weight decay of the `vlm` optimizer group. Tensors with fewer than two dimensions (norm "
        "weights, biases) go to `vlm_no_decay` with weight decay 0 whatever this value is."
    ),
    "fusion_lr_multiplier": (
        "Stage 2 only (the fusion group does not exist in Stage 1). Groups `fusion`, `fusion_no_decay` "
        "(the 1-D norm weights, no weight decay) and `fusion_gate` (the gate logits, at this rate times "
        "`gate_lr_multiplier`, no weight decay)."
    ),
    "gate_lr_multiplier": (
        "Stage 2 only. The gate logits form their own optimizer group `fusion_gate` (weight decay 0) "
        "at `base_lr * fusion_lr_multiplier * gate_lr_multiplier`. A gate multiplies a zero-initialised "
        "output projection, so at step 0 its gradient is exactly zero and afterwards the projection "
        "can grow the same scale: at the fusion learning rate (`1`) Adam moves a logit by at most about "
        "the learning rate per step and the gates stay near `sigmoid(gate_init_logit)` (0.50 -> 0.49-0.50 "
        "after 1,200 Stage-2 steps in the CPU reproduction), so they say nothing about how much language a "
        "layer lets in. With the default 100 the same run ends with gates between about 0.1 and 0.7 that "
        "differ by layer and phase, a logged control; the measurement is in "
        "[repro.md](repro.md#gates-that-learn). It changes nothing at step 0: Stage-2 step-0 equality "
        "still holds exactly."
    ),
    "gate_granularity": (
        "Stage 2 only. `'channel'`: the gate logit has shape `(width,)`, one value per channel of the "
        "action stream. `'scalar'`: shape `()`. The shapes differ, so a checkpoint trained with one "
        "value does not load into a policy configured with the other."
    ),
    "gate_init_logit": (
        "Stage 2 only. With `fusion_zero_init=True` the fusion layer adds exactly zero at step 0 "
        "whatever this value is; the logit sets how far the gate is open once the output projection "
        "has learned something. A negative value starts the gate nearly shut (sigmoid(-4) = 0.018)."
    ),
    "fusion_zero_init": (
        "Stage 2 only. The sigmoid gate never reaches 0, so the zero-initialised output projection is "
        "what makes a fresh fusion layer add nothing. With `False` the projection keeps PyTorch's "
        "default `nn.Linear` initialisation and Stage 2 differs from Stage 1 from the first step. The "
        "conformance check `closed_gate_carry_over` requires `True`."
    ),
    "fusion_source_layers": (
        "Stage 2 only. The pi0/pi0.5 adapter needs exactly one entry per expert layer, each smaller "
        "than the number of VLM layers, and raises `AptConfigError` for `apt.fusion_source_layers` "
        "when the policy is built otherwise. The value is not stored in any tensor: a checkpoint "
        "trained with one mapping loads without error into a policy configured with another. "
        "`apt_manifest.json` records the value a checkpoint was trained with. Stored as a tuple; "
        "lists are accepted."
    ),
    "fusion_context": (
        "Stage 2 only. `'all'`: every valid (non-padding) prefix token, i.e. the image tokens and the "
        "whole prompt. `'language'`: only the tokens that count as language under "
        "`language_mask_scope`."
    ),
    "inherited_layers_keep_language_mask": (
        "Read in Stage 2 only; Stage 1 always masks. `True` (paper code): the image tokens in the VLM "
        "prefix and the expert's own attention keep the Stage-1 language mask, so language reaches "
        "the actions only through the gated fusion layers, and a freshly promoted Stage-2 policy "
        "computes exactly the Stage-1 function. `False`: those paths see language as in the stock "
        "host, so a promoted policy at step 0 computes the stock (unmasked) function of the Stage-1 "
        "weights, not the Stage-1 function; `closed_gate_carry_over` and `stage2_reads_language` "
        "assume `True`."
    ),
    "language_mask_scope": (
        "pi0.5 only; the pi0 adapter always hides the whole prompt, which for pi0 is the task text "
        "(its state is a separate token). pi0.5 writes the discretised state into the prompt "
        "(`Task: <task>, State: <bins>;\\nAction: `). `'task'` hides the task clause, `Task: <task>,` "
        "(the scaffolding around the task is hidden too, because subword tokenizers merge it with the "
        "task's first and last words), and keeps the state and the rest of the prompt visible. It needs "
        "the batch key `observation.language.task_mask`, which the `apt_pi05` processor adds; without "
        "it the forward pass raises `LanguageMaskError`. `'prompt'` hides every prompt token, the "
        "state bins included, so a Stage-1 pi0.5 policy then sees no state."
    ),
    "lora_rank": "Read only with `vlm_mode='lora'`. Paper code: 16.",
    "lora_alpha": "Read only with `vlm_mode='lora'`. Paper code: 16. LoRA dropout is 0 and biases are not adapted.",
    "lora_targets": (
        "Read only with `vlm_mode='lora'`. Exactly what peft's `target_modules` takes: a list of "
        "module-name suffixes (stored as a tuple; `--policy.apt.lora_targets=[q_proj,v_proj]`) or one "
        "regex string matched against whole module names (`--policy.apt.lora_targets='.*self_attn\\.(q|v)_proj'`), "
        "names relative to the adapter's language-model module. The match is peft's own; then every "
        "module in the adapter's `unused` group is dropped, so no LoRA tensor sits where the actions "
        "never reach (with `[q_proj, v_proj]` the last layer's `q_proj` gets none). The pi0/pi0.5 "
        "and SmolVLA default is a regular expression: every `q/k/v/o_proj` and `gate/up/down_proj` of "
        "every language-model layer except the last, plus the last layer's `k_proj` and `v_proj`; GR00T "
        "defaults to the suffix list of every attention and MLP projection (its head reads the last "
        "layer's output). Targets that match "
        "nothing, or only unused modules, raise `AptConfigError` naming `apt.lora_targets`. Note that a "
        "plain word is a regex too: `q_proj` alone matches no module; write `[q_proj]`."
    ),
    "check_frozen": (
        "Read by the LeRobot APT policy types. The fingerprints (SHA-256 of dtype, shape and bytes of "
        "every parameter with `requires_grad=False`) are taken at the first forward pass in train mode "
        "and compared before every checkpoint is written; a changed tensor raises `AptError` naming it "
        "and the checkpoint is not written. When the check passes, `apt_manifest.json` records "
        "`frozen_check: {tensors: N, unchanged: true}`. Hashing every frozen tensor costs one pass over "
        "the frozen weights per checkpoint."
    ),
}

HEADER = """\
# Configuration

<!-- Generated by scripts/gen_config_docs.py from apt_plugins.AptConfig. Do not edit by hand:
     change the field in apt_plugins/config.py (or the notes in the script) and run
     `.venv/bin/python scripts/gen_config_docs.py`. `--check` fails when this file is stale. -->

Everything APT needs to prepare a stage is one pydantic model, `apt_plugins.AptConfig`. It is
frozen (use `replace()` for a changed copy) and rejects unknown fields. Hosts whose configuration
system only understands dataclasses (LeRobot's draccus) carry `apt_plugins.AptSettings`, a dataclass
generated from `AptConfig` with the same field names and defaults, and convert it with
`AptConfig.from_settings()`. Fields, defaults and checks therefore live in one place.

Validation happens once, at the boundary: `AptConfig.parse()`, `AptConfig.from_settings()` and
`AptConfig.replace()` raise `AptConfigError` naming the field (`apt.<field>`, or
`policy.apt.<field>` inside a LeRobot config), the value and the allowed values. Calling the
constructor `AptConfig(...)` directly raises pydantic's `ValidationError` instead. See
[errors.md](errors.md#aptconfigerror).
"""

RULES = """\
## Rules across fields

- `stage` is the integer 1 or 2; a boolean is refused (in Python `True == 1`).
- `stage=1` requires `vlm_mode='frozen'`; anything else is refused when the config is parsed.
- `fusion_source_layers` entries must be non-negative (checked when parsed); the adapter checks the
  length and the upper bound when it prepares Stage 2.
- In Stage 1 the fusion and gate fields (`fusion_*`, `gate_*`) and
  `inherited_layers_keep_language_mask` are accepted but not read.
- `vlm_lr_multiplier` and `vlm_weight_decay` are read only when the VLM trains; `lora_*` only with
  `vlm_mode='lora'`.
- A policy is prepared once. `prepare_stage()` with a different config on a prepared policy raises
  `AptConfigError` ("already prepared"); build a new policy or load a checkpoint with the new config.
"""

LEROBOT = """\
## Setting the fields from LeRobot

The APT policy types `apt_pi0` and `apt_pi05` are LeRobot's `pi0`/`pi05` configs with one extra
field, `apt`, of type `AptSettings`. Every field above is reachable as `policy.apt.<field>`.

### Command line

```bash
lerobot-train \\
  --policy.type=apt_pi05 \\
  --policy.apt.stage=1 \\
  --policy.apt.vlm_mode=frozen \\
  ...
```

- Booleans are written `true`/`false` (`--policy.apt.fusion_zero_init=false`), lists in brackets
  (`--policy.apt.fusion_source_layers=[0,1,2]`, `--policy.apt.lora_targets=[q_proj,v_proj]`).
  Leaving out a field keeps its default.
- Stage 2 with a LoRA-adapted VLM: `--policy.apt.stage=2 --policy.apt.vlm_mode=lora`.
- draccus parses each value with the dataclass field's plain type; the checks run when the policy
  config is built. An invalid value stops the parse with draccus' `DecodingError`, whose text
  contains the `AptConfigError` message (`invalid APT config: policy.apt.vlm_mode='lora'. ...`).
  A misspelt field is reported by draccus as `unrecognized arguments: --policy.apt.stag=1`.
- LeRobot must know the APT policy types before it parses `--policy.type`. The environment that
  `make test` builds has the shim distribution `lerobot_policy_apt` installed
  (`pip install -e adapters/lerobot_policy_apt`); LeRobot imports every distribution whose name
  starts with `lerobot_policy_` at start-up, and the shim registers the types of every installed
  LeRobot adapter. Without the shim, pass
  `--policy.discover_packages_path=apt_plugins_lerobot_pi`. When the policy comes from
  `--policy.path=<checkpoint>`, LeRobot forwards `--policy.*` arguments to the checkpoint's config
  parser, which rejects `--policy.discover_packages_path`; use
  `--env.discover_packages_path=apt_plugins_lerobot_pi` there (any key ending in
  `discover_packages_path` is imported as a plugin).

### JSON config file (`--config_path`)

The same fields under `"policy": {"type": "apt_pi0", "apt": {...}}`. Fields left out keep their
defaults. This is a Stage-2 block with every field at its default:

```json
{APT_JSON}
```

### Checkpoints

`config.json` in a checkpoint written by an APT policy holds the same `"apt"` block, so a loaded
policy gets the stage it was saved with unless a command-line flag overrides a field. The
`apt_manifest.json` written next to the weights records the validated configuration again under
`"apt_config"`.

### Recipes

The package ships stage recipes, `stages/stage1_va_prior` and `stages/stage2_gated_fusion`
(`apt-plugins recipes` lists them with their paths). Each holds an `apt:` block with the paper's
values and a `policy:` block of LeRobot optimizer fields. Load one with
`apt_plugins.recipes.load_recipe(name)` and validate its `apt` block with `AptConfig.parse()`.
"""

PYTHON = """\
## Setting the fields from Python

```python
from apt_plugins import AptConfig, AptConfigError, prepare_stage

stage1 = AptConfig()                                   # every default: Stage 1, VLM frozen
full = AptConfig(stage=2, vlm_mode="full")             # direct construction: pydantic errors
lora = AptConfig.parse({"stage": 2, "vlm_mode": "lora", "lora_rank": 8})  # AptConfigError
shut = lora.replace(gate_init_logit=-4.0)              # validated copy; AptConfig is frozen

try:
    AptConfig.parse({"stage": 1, "vlm_mode": "lora"})
except AptConfigError as err:
    print(err.field, err.value)                        # apt.vlm_mode lora

settings = lora.to_settings()                          # AptSettings dataclass, for host configs
assert AptConfig.from_settings(settings) == lora
```

With the LeRobot policy types, put the settings into the host config and build the policy; the
stage is prepared in the constructor:

```python
from apt_plugins_lerobot_pi.configuration_apt_pi0 import APTPI0Config

config = APTPI0Config(apt=AptConfig(stage=1).to_settings())  # plus the usual PI0Config fields
```

Any other host policy that an installed adapter accepts is prepared in place with
`prepare_stage(policy, AptConfig(stage=1))` (a dict is accepted too), which returns a `StageReport`;
`print(report.format_table())` shows trainable and frozen parameters per group and the masking.
"""


def _type(prop: dict[str, Any]) -> str:
    if "anyOf" in prop:
        return " or ".join(_type(p) for p in prop["anyOf"])
    kind = prop.get("type")
    if kind == "array":
        return f"list[{_type(prop.get('items', {}))}]"
    return _TYPES.get(kind, str(kind))


def _allowed(prop: dict[str, Any]) -> str:
    if "enum" in prop:
        return ", ".join(f"`{json.dumps(v)}`" for v in prop["enum"])
    bounds = []
    for key, op in (("exclusiveMinimum", ">"), ("minimum", ">="), ("exclusiveMaximum", "<"), ("maximum", "<=")):
        if key in prop:
            bounds.append(f"{op} {json.dumps(prop[key])}")
    if bounds:
        return " and ".join(bounds)
    if "anyOf" in prop:
        return " or ".join(_allowed(p) if _allowed(p) != "any" else _type(p) for p in prop["anyOf"])
    return "any"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


# Example values for fields whose default (None) says nothing about the syntax.
FLAG_EXAMPLES = {"fusion_source_layers": "[0,1,2]", "lora_targets": "[q_proj,v_proj]"}


def _flag(name: str, prop: dict[str, Any]) -> str:
    default = prop.get("default")
    if name in FLAG_EXAMPLES:
        value = FLAG_EXAMPLES[name]
    elif isinstance(default, bool):
        value = json.dumps(default)
    else:
        value = default if isinstance(default, str) else json.dumps(default)
    return f"--policy.apt.{name}={value}"


def render() -> str:
    """The full text of docs/configuration.md."""
    sys.path.insert(0, str(ROOT))
    from apt_plugins import AptConfig

    schema = AptConfig.model_json_schema()
    props: dict[str, dict[str, Any]] = schema["properties"]
    stale = sorted(set(NOTES) - set(props))
    if stale:
        raise SystemExit(f"gen_config_docs.py: NOTES has entries for fields AptConfig lacks: {stale}")

    out = [HEADER, "## Fields\n"]
    out.append("Defaults are JSON values (`null` is Python's `None`, `true` is `True`).\n")
    out.append("| field | type | default | allowed values | description |")
    out.append("| --- | --- | --- | --- | --- |")
    for name, prop in props.items():
        out.append(
            f"| `{name}` | {_cell(_type(prop))} | `{json.dumps(prop.get('default'))}` | "
            f"{_cell(_allowed(prop))} | {_cell(prop.get('description', ''))} |"
        )
    out.append("")
    out.append(RULES)
    out.append("## Field notes\n")
    for name, prop in props.items():
        out.append(f"### `{name}`\n")
        out.append(prop.get("description", ""))
        out.append("")
        if name in NOTES:
            out.append(NOTES[name])
            out.append("")
        out.append(f"LeRobot: `{_flag(name, prop)}`\n")
    example = AptConfig(stage=2).model_dump(mode="json")
    apt_json = json.dumps({"policy": {"type": "apt_pi0", "apt": example}}, indent=2)
    out.append(LEROBOT.replace("{APT_JSON}", apt_json))
    out.append(PYTHON)
    return "\n".join(out).rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the file is out of date; write nothing")
    parser.add_argument("--output", type=Path, default=OUTPUT, help=f"file to write (default: {OUTPUT})")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = args.output.read_text() if args.output.is_file() else ""
        if current != text:
            diff = difflib.unified_diff(
                current.splitlines(), text.splitlines(), str(args.output), "generated", lineterm="", n=1
            )
            print("\n".join(list(diff)[:40]), file=sys.stderr)
            print(
                f"{args.output} is out of date; run `.venv/bin/python scripts/gen_config_docs.py`.",
                file=sys.stderr,
            )
            return 1
        return 0
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
