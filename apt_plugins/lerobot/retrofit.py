"""Turn a plain LeRobot checkpoint into an APT checkpoint (``apt-plugins retrofit``).

Weights and processor files are copied, the APT config is written into ``config.json``, and the
manifest lists every added tensor. Nothing is written to OUT unless everything succeeded: the
result is assembled in a temporary sibling directory, fsynced and renamed into place at the end
(:func:`apt_plugins.atomic.atomic_directory`), so even a killed retrofit leaves OUT absent or complete.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import AptConfig, AptError, CheckpointMismatchError, load_state_dict_strict, write_manifest
from ..atomic import atomic_directory

__all__ = ["RetrofitReport", "retrofit"]

PROCESSOR_GLOBS = ("policy_preprocessor*", "policy_postprocessor*")


@dataclass
class RetrofitReport:
    """What ``retrofit`` produced, printed by the CLI."""

    source: str
    output: str
    adapter: str
    apt_type: str
    stage: int
    added: dict[str, list[int]] = field(default_factory=dict)
    reinitialized: list[str] = field(default_factory=list)
    copied: list[str] = field(default_factory=list)
    probe: dict[str, Any] | None = None

    def summary(self) -> str:
        """Human-readable lines."""
        lines = [
            f"retrofitted {self.source} -> {self.output}",
            f"  type {self.apt_type} (adapter {self.adapter}), APT stage {self.stage}",
            f"  added tensors: {len(self.added)}" + (f" ({', '.join(list(self.added)[:3])}, ...)" if self.added else ""),
            f"  re-initialised expert tensors: {len(self.reinitialized)}",
            f"  copied files: {', '.join(self.copied)}",
        ]
        if self.probe:
            lines.append(f"  probe: {self.probe['verdict']}")
        return "\n".join(lines)


def _fail(src: Any, cause: str) -> CheckpointMismatchError:
    return CheckpointMismatchError(str(src), cause=cause)


def _read_source(src: str | Path) -> tuple[Path, dict[str, Any]]:
    from .policy import resolve_checkpoint_dir

    directory = resolve_checkpoint_dir(src)
    missing = [f for f in ("config.json", "model.safetensors") if not (directory / f).is_file()]
    if missing:
        raise _fail(directory, f"wrong file layout: {', '.join(missing)} not found. SRC must be a LeRobot "
                    "`pretrained_model` directory (config.json + model.safetensors + processor files).")
    try:
        config = json.loads((directory / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _fail(directory, f"config.json is corrupt ({exc}).") from None
    if not isinstance(config, dict) or "type" not in config:
        raise _fail(directory, "config.json has no 'type' field; is this a LeRobot policy checkpoint?")
    return directory, config


def retrofit(
    src: str | Path,
    out: str | Path,
    stage: int,
    *,
    apt_overrides: dict[str, Any] | None = None,
    reinit_expert: bool = False,
    seed: int = 0,
    probe: bool = True,
) -> RetrofitReport:
    """Convert the plain LeRobot checkpoint ``src`` into an APT checkpoint at ``out``.

    :param stage: 1 prepares a Stage-1 run from the checkpoint; 2 adds closed gated fusion.
    :param apt_overrides: further APT fields (for example ``inherited_layers_keep_language_mask``).
    :param reinit_expert: re-initialise the action expert (the paper trains it from scratch).
    :param probe: compare the retrofitted policy with the source on a probe batch (fp32, fixed noise).
        When nothing that changes the function was asked for (Stage 2 with inherited layers keeping
        their language paths), the outputs must be identical, or nothing is written.
    """
    import torch
    from lerobot.configs.policies import PreTrainedConfig
    from lerobot.policies.factory import get_policy_class
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from . import apt_type_for, register_lerobot_types

    register_lerobot_types()
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise AptError(f"retrofit: OUT {out} already exists and is not empty; choose a new directory (nothing was written).")
    directory, source_config = _read_source(src)
    stock_type = source_config["type"]
    if stock_type.startswith("apt_"):
        raise _fail(directory, f"this is already an APT checkpoint (type {stock_type!r}); promote it with "
                    "--policy.pretrained_path or load it with --policy.path instead of retrofitting.")
    adapter, apt_type = apt_type_for(stock_type)
    apt = AptConfig.parse({"stage": stage, **(apt_overrides or {})})
    try:
        state_dict = load_file(str(directory / "model.safetensors"))
    except (SafetensorError, OSError) as exc:
        raise _fail(directory, f"model.safetensors is corrupt or unreadable ({exc}).") from None

    # All or nothing (apt_plugins.atomic): OUT appears only, complete, when every check passed.
    with atomic_directory(out) as tmp:
        new_config = {**source_config, "type": apt_type, "apt": apt.model_dump()}
        (tmp / "config.json").write_text(json.dumps(new_config, indent=4))
        config = PreTrainedConfig.from_pretrained(tmp)
        config.device = "cpu"
        policy_cls = get_policy_class(apt_type)
        torch.manual_seed(seed)
        policy = policy_cls(config)
        state_dict = adapter.normalize_state_dict(policy, state_dict)
        fusion = tuple(adapter.fusion_prefixes(policy)) if stage == 2 else ()
        report_load = load_state_dict_strict(
            policy, state_dict, source=str(directory), fresh_prefixes=fusion,
            fresh_substrings=(".lora_",) if apt.vlm_mode == "lora" else (),
            explain=lambda missing, unexpected: (
                f"the checkpoint does not match a {stock_type} policy built from its own config.json "
                "(edited config, or weights from another variant)."
            ),
        )
        reinitialized: list[str] = []
        if reinit_expert:
            torch.manual_seed(seed)
            fresh = policy_cls(config)
            groups = policy.__dict__["_apt_state"].groups
            fresh_params = dict(fresh.named_parameters())
            with torch.no_grad():
                for name, param in policy.named_parameters():
                    if groups[name] == "action_expert":
                        param.copy_(fresh_params[name])
                        reinitialized.append(name)
        policy.apt_load_report = report_load
        policy.apt_parent = {"path": str(directory), "stage": None, "retrofit_from": stock_type}
        policy.save_pretrained(tmp)
        copied = ["config.json", "model.safetensors"]
        for pattern in PROCESSOR_GLOBS:
            for path in sorted(directory.glob(pattern)):
                shutil.copy2(path, tmp / path.name)
                copied.append(path.name)
        from .processors import rewrite_processor_files

        rewrite_processor_files(adapter, tmp, apt)
        adapter.retrofit_processors(tmp, apt)
        added = {k: list(policy.state_dict()[k].shape) for k in report_load.fresh}
        manifest = json.loads((tmp / "apt_manifest.json").read_text())
        manifest["retrofit"] = {"source": str(directory), "source_type": stock_type, "added_tensors": added,
                                "reinitialized_tensors": reinitialized}
        write_manifest(tmp, manifest)
        report = RetrofitReport(str(directory), str(out), adapter.name, apt_type, stage, added, reinitialized, copied)
        if probe:
            report.probe = _probe(adapter, policy, stock_type, directory, apt, reinit_expert)
            if report.probe["must_match"] and not report.probe["identical"]:
                raise AptError(
                    f"retrofit: the retrofitted policy does not reproduce the source (max |diff| "
                    f"{report.probe['max_abs_diff']:.3g}); nothing was written. Please report this as a bug."
                )
    return report


def _probe(adapter: Any, policy: Any, stock_type: str, directory: Path, apt: AptConfig, reinit: bool) -> dict[str, Any]:
    """Sampled actions of the retrofitted and the source policy on one probe batch, fixed noise."""
    import torch
    from lerobot.policies.factory import get_policy_class

    source = get_policy_class(stock_type).from_pretrained(str(directory))
    source.to("cpu").eval()
    policy.to("cpu").eval()
    batch = adapter.probe_batch(policy)
    observation = {k: v for k, v in batch.items() if k != "action"}
    outs = []
    for p in (source, policy):
        torch.manual_seed(0)
        p.reset()
        outs.append(p.predict_action_chunk(observation))
    diff = float((outs[0] - outs[1]).abs().max())
    function_preserved = apt.stage == 2 and not apt.inherited_layers_keep_language_mask and not reinit
    if diff == 0.0:
        verdict = "sampled actions identical to the source policy (fp32, fixed noise)"
    elif function_preserved:
        verdict = f"MISMATCH: max |diff| {diff:.3g} although the retrofit should preserve the function"
    else:
        why = "the expert was re-initialised" if reinit else "Stage-1 masking hides language from the inherited layers"
        verdict = f"differs from the source by max |diff| {diff:.3g}, as expected: {why}"
    return {"identical": diff == 0.0, "max_abs_diff": diff, "must_match": function_preserved, "verdict": verdict}
