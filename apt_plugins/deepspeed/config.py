"""DeepSpeed recipes: load by name, fill the ``"auto"`` fields from the LeRobot config, refuse traps.

The traps are the ones measured in ``shared/research/deepspeed.md``: DeepSpeed clips gradients at
1.0 when ``gradient_clipping`` is absent (LeRobot's ``grad_clip_norm`` would be ignored), a fixed
``gradient_accumulation_steps`` disagrees with the training loop, ``"auto"`` bucket sizes cannot be
filled for LeRobot policies (no ``config.hidden_size``), an optimizer block collides with the
adapter's parameter groups, and whole-module bf16 casts the model but not its inputs.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from ..errors import AptConfigError

__all__ = ["PRECISIONS", "load_recipe", "resolve_recipe", "validate_recipe", "recipe_names"]

#: ``fp32``: no mixed precision (CPU tests, exactness). ``autocast_bf16``: fp32 parameters, bf16
#: matmuls (DeepSpeed's torch_autocast; the verified default for these policies on GPU). ``bf16``:
#: DeepSpeed casts the whole module to bf16 with fp32 master weights (least memory; only for policies
#: that cast their own inputs).
PRECISIONS = ("fp32", "autocast_bf16", "bf16")
_NO_AUTO = ("reduce_bucket_size", "allgather_bucket_size", "stage3_prefetch_bucket_size",
            "stage3_param_persistence_threshold")


def recipe_names() -> list[str]:
    """Names of the DeepSpeed recipes shipped in the package (``stage1_zero2``, ...)."""
    from ..recipes import list_recipes

    return [n.split("/", 1)[1] for n in list_recipes() if n.startswith("deepspeed/")]


def load_recipe(name_or_path: str) -> dict[str, Any]:
    """A shipped recipe by name, or a JSON file by path."""
    path = Path(name_or_path)
    if path.suffix == ".json" and path.is_file():
        return json.loads(path.read_text())
    from ..recipes import load_recipe as load

    try:
        return load(f"deepspeed/{name_or_path}")
    except AptConfigError:
        raise AptConfigError("ds.recipe", name_or_path,
                             f"unknown DeepSpeed recipe; shipped recipes: {', '.join(recipe_names())}, "
                             "or give the path of a .json file.") from None


def validate_recipe(recipe: dict[str, Any], name: str = "recipe") -> None:
    """Refuse the settings that silently break training (see the module docstring)."""
    zero = recipe.get("zero_optimization", {})
    offload = zero.get("offload_optimizer", {}).get("device") not in (None, "none")
    if "optimizer" in recipe and not offload:
        raise AptConfigError(f"{name}.optimizer", recipe["optimizer"],
                             "remove the optimizer block: APT passes LeRobot's optimizer with the adapter's parameter "
                             "groups (per-group lr, no weight decay on gates); a JSON optimizer would replace them.")
    if "scheduler" in recipe:
        raise AptConfigError(f"{name}.scheduler", recipe["scheduler"],
                             "remove the scheduler block: LeRobot's scheduler (from the policy preset) is used.")
    ga = recipe.get("gradient_accumulation_steps", "auto")
    if ga != "auto":
        raise AptConfigError(f"{name}.gradient_accumulation_steps", ga,
                             "use \"auto\": the value comes from the training loop, so DeepSpeed and the loop agree "
                             "on when an optimizer step happens.")
    for key in _NO_AUTO:
        if zero.get(key) == "auto":
            raise AptConfigError(f"{name}.zero_optimization.{key}", "auto",
                                 "give an integer: DeepSpeed fills this \"auto\" from model.config.hidden_size, "
                                 "which LeRobot policies do not have.")
    if zero.get("stage") == 3 and zero.get("stage3_gather_16bit_weights_on_model_save") is not True:
        raise AptConfigError(f"{name}.zero_optimization.stage3_gather_16bit_weights_on_model_save",
                             zero.get("stage3_gather_16bit_weights_on_model_save"),
                             "set true: checkpoints are consolidated from the gathered weights (otherwise saving "
                             "would write empty tensors).")
    if recipe.get("compile", {}).get("deepcompile"):
        raise AptConfigError(f"{name}.compile.deepcompile", True,
                             "DeepCompile fails on frozen parameters in DeepSpeed 0.19; keep it off.")


def resolve_recipe(
    recipe: dict[str, Any],
    *,
    micro_batch_size: int,
    grad_clip_norm: float,
    precision: str = "fp32",
    gradient_accumulation_steps: int = 1,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A DeepSpeed config with every ``"auto"`` filled from the LeRobot config and ``precision``."""
    if precision not in PRECISIONS:
        raise AptConfigError("ds.precision", precision, f"allowed values: {', '.join(PRECISIONS)}.")
    config = copy.deepcopy(recipe)
    config.pop("_comment", None)
    validate_recipe(config)
    fill = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": gradient_accumulation_steps,
        # DeepSpeed's silent default would be 1.0 whatever LeRobot's grad_clip_norm says.
        "gradient_clipping": float(grad_clip_norm),
    }
    for key, value in fill.items():
        if config.get(key, "auto") == "auto":
            config[key] = value
    config.pop("precision", None)
    config.pop("bf16", None)
    config.pop("fp16", None)
    config.pop("torch_autocast", None)
    config["bf16"] = {"enabled": precision == "bf16"}
    if precision == "autocast_bf16":
        config["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    for key, value in (overrides or {}).items():
        if key == "gradient_accumulation_steps":
            raise AptConfigError("ds.set.gradient_accumulation_steps", value,
                                 "the training loop steps the optimizer once per batch; change --batch_size instead.")
        node = config
        *parents, leaf = key.split(".")
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = value
    left = [k for k, v in config.items() if v == "auto"]
    if left:
        raise AptConfigError(f"recipe.{left[0]}", "auto", "no value is known for this field; set it explicitly.")
    return config
