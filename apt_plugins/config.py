"""APT configuration: one pydantic model, validated once at the boundary.

Hosts with their own config systems (LeRobot's draccus dataclasses) carry an :class:`AptSettings`
dataclass generated from :class:`AptConfig`, and convert it with :meth:`AptConfig.from_settings`.
So the fields, defaults and checks live in exactly one place.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import AptConfigError

#: Default :attr:`AptConfig.gate_lr_multiplier` (measured in docs/repro.md, "Gates that learn").
GATE_LR_MULTIPLIER = 100.0

__all__ = ["AptConfig", "AptSettings", "settings_dataclass"]


class AptConfig(BaseModel):
    """Everything APT needs to know to prepare a stage on a host policy.

    Stages use the paper's numbering: 1 is the vision-action prior, 2 is gated language fusion.
    (The reference code calls them ``train_stage=0`` and ``1``; do not carry that over.)
    """

    # allow_inf_nan=False: a NaN gate logit or an infinite lr multiplier would train silently into NaNs.
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, allow_inf_nan=False)

    stage: Literal[1, 2] = Field(
        1,
        description="1: vision-action prior (VLM frozen, language masked from every path to the actions). "
        "2: gated language fusion on top of a Stage-1 expert.",
    )
    vlm_mode: Literal["frozen", "lora", "full"] = Field(
        "frozen",
        description="How the VLM trains. Stage 1 requires 'frozen'. Stage 2: 'frozen', 'lora' (peft, "
        "adapter-chosen targets) or 'full' (own lr group).",
    )
    vlm_lr_multiplier: float = Field(
        0.1, gt=0, description="VLM learning rate = base lr x this (paper: 1e-5 vs 1e-4)."
    )
    vlm_weight_decay: float = Field(1e-10, ge=0, description="Weight decay of the VLM group (paper: 1e-10).")
    fusion_lr_multiplier: float = Field(1.0, gt=0, description="Fusion-layer learning rate = base lr x this.")
    gate_lr_multiplier: float = Field(
        GATE_LR_MULTIPLIER,
        gt=0,
        description="Gate-logit learning rate = fusion lr x this (own optimizer group, no weight decay). "
        "At 1 the gates barely move: the zero-initialised output projection learns the same scale faster.",
    )
    gate_granularity: Literal["scalar", "channel"] = Field(
        "channel", description="One gate logit per fusion layer ('scalar', paper text) or per channel (paper code)."
    )
    gate_init_logit: float = Field(
        0.0, description="Initial gate logit; sigmoid(0) = 0.5 as in the paper's code."
    )
    fusion_zero_init: bool = Field(
        True,
        description="Zero-initialise the fusion output projection, so Stage 2 at step 0 computes exactly the "
        "Stage-1 function (as long as inherited layers keep the language mask).",
    )
    fusion_source_layers: tuple[int, ...] | None = Field(
        None,
        description="Entry i is the VLM layer whose keys/values fusion layer i reads. None: the adapter's "
        "default (layer-aligned for pi0/pi0.5).",
    )
    fusion_context: Literal["all", "language"] = Field(
        "all", description="Which VLM tokens a fusion layer reads: all valid prefix tokens, or language only."
    )
    inherited_layers_keep_language_mask: bool = Field(
        True,
        description="Stage 2: inherited expert layers and the image tokens keep the Stage-1 language mask, "
        "so language reaches the actions only through the gates (paper code). False lifts the mask.",
    )
    language_mask_scope: Literal["task", "prompt"] = Field(
        "task",
        description="What counts as language to mask: the task text only (pi0.5 keeps its state tokens "
        "visible), or every prompt token.",
    )
    lora_rank: int = Field(16, gt=0, description="LoRA rank for vlm_mode='lora' (paper code: 16).")
    lora_alpha: int = Field(16, gt=0, description="LoRA alpha for vlm_mode='lora' (paper code: 16).")
    lora_targets: tuple[str, ...] | str | None = Field(
        None,
        description="Which VLM language-model modules get LoRA, as peft's target_modules takes them: a list of "
        "module-name suffixes ([q_proj,v_proj]) or one regex over whole module names ('.*\\.(q|v)_proj'), "
        "relative to the language model. Modules the action path never uses are skipped. None: the "
        "adapter's default.",
    )

    check_frozen: bool = Field(
        False,
        description="Fingerprint every frozen tensor when training starts and check the fingerprints at every "
        "checkpoint; refuse to write a checkpoint if any frozen tensor changed.",
    )
    prefix_cache: str | None = Field(
        None,
        description="Cache the frozen VLM prefix (per-layer keys/values) of every training frame and reuse it "
        "across epochs: a directory path, or 'memory:<size>' (e.g. 'memory:8GB') for an in-process LRU "
        "budget. None: off. Needs a frozen VLM (Stage 1, or Stage 2 with vlm_mode='frozen') and no image "
        "augmentation.",
    )
    prefix_cache_dtype: Literal["bfloat16", "float16", "model"] = Field(
        "bfloat16",
        description="Storage dtype of prefix_cache entries. 'model': the dtype the keys/values are computed "
        "in (exact: the cached loss equals the uncached one bit for bit); 'bfloat16'/'float16': half the "
        "size of float32, relative error per stored element at most 2^-9 / 2^-11.",
    )
    attention: Literal["auto", "eager", "sdpa"] = Field(
        "auto",
        description="Attention kernel of the APT forward: 'eager' (LeRobot's own op for op), 'sdpa' (PyTorch "
        "scaled_dot_product_attention), or 'auto': sdpa on CUDA, eager elsewhere.",
    )

    def __init__(self, **data: Any) -> None:
        # Direct construction gets the same field/value/fix errors as AptConfig.parse().
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise _to_config_error(exc, data, "apt") from None

    @field_validator("lora_targets")
    @classmethod
    def _check_lora_targets(cls, value: tuple[str, ...] | str | None) -> tuple[str, ...] | str | None:
        import re

        if isinstance(value, str):
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"not a valid regular expression ({exc})") from None
        elif value is not None and (not value or not all(value)):
            raise ValueError("needs at least one non-empty module-name suffix")
        return value

    @field_validator("stage", mode="before")
    @classmethod
    def _no_bool_stage(cls, value: Any) -> Any:
        if isinstance(value, bool):  # True == 1 in Python; a boolean stage is always a mistake
            raise ValueError("Input should be 1 or 2, not a boolean")
        return value

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_numbers(cls, value: Any, info: Any) -> Any:
        # Same reason as for the stage: pydantic would take lora_rank=True as 1 (found by the fuzz tests).
        annotation = cls.model_fields[info.field_name].annotation
        numeric = annotation in (int, float) or annotation == (tuple[int, ...] | None)
        items = value if isinstance(value, (list, tuple)) else [value]
        if numeric and any(isinstance(item, bool) for item in items):
            raise ValueError("Input should be a number, not a boolean")
        return value

    @model_validator(mode="after")
    def _check_stage_rules(self) -> AptConfig:
        if self.stage == 1 and self.vlm_mode != "frozen":
            raise ValueError(
                f"vlm_mode={self.vlm_mode!r} is not allowed in stage 1: Stage 1 trains only the action "
                "expert with the VLM frozen. Use vlm_mode='frozen', or stage=2 to fine-tune the VLM."
            )
        if self.fusion_source_layers is not None and any(i < 0 for i in self.fusion_source_layers):
            raise ValueError("fusion_source_layers entries must be non-negative VLM layer indices.")
        if self.prefix_cache is not None and self.vlm_mode != "frozen":
            raise ValueError(
                f"prefix_cache needs a frozen VLM, but vlm_mode={self.vlm_mode!r} changes the prefix at every "
                "step. Use vlm_mode='frozen' or unset prefix_cache."
            )
        return self

    @field_validator("prefix_cache")
    @classmethod
    def _check_prefix_cache(cls, value: str | None) -> str | None:
        if value is None or value.strip() == "":
            return None
        if value.startswith("memory:"):
            from .prefix_cache import parse_memory_budget

            parse_memory_budget(value)  # raises ValueError with the accepted forms
        return value

    # ------------------------------------------------------------------ boundary
    @classmethod
    def parse(cls, data: AptConfig | dict[str, Any] | Any, prefix: str = "apt") -> AptConfig:
        """Validate ``data`` (a dict, an :class:`AptSettings`, or an AptConfig) into an AptConfig.

        Raises :class:`~apt_plugins.errors.AptConfigError` naming the field (``prefix.field``), the
        value and the allowed values or fix.
        """
        if isinstance(data, AptConfig):
            return data
        if dataclasses.is_dataclass(data) and not isinstance(data, type):
            data = dataclasses.asdict(data)
        if not isinstance(data, dict):
            raise AptConfigError(prefix, data, "expected a mapping of APT fields or an AptConfig.")
        try:
            return cls(**data)
        except AptConfigError as exc:
            if prefix == "apt":
                raise
            raise AptConfigError(prefix + exc.field.removeprefix("apt"), exc.value, exc.fix) from None

    @classmethod
    def from_settings(cls, settings: Any, prefix: str = "apt") -> AptConfig:
        """Convert a host-side :class:`AptSettings` dataclass into a validated AptConfig."""
        return cls.parse(settings, prefix=prefix)

    def to_settings(self) -> Any:
        """The equivalent :class:`AptSettings` dataclass (for host configs such as LeRobot's)."""
        return AptSettings(**self.model_dump(mode="json"))

    def replace(self, **changes: Any) -> AptConfig:
        """A validated copy with ``changes`` applied."""
        return AptConfig.parse({**self.model_dump(), **changes})

    @property
    def masks_language_in_inherited_layers(self) -> bool:
        """Whether inherited expert layers and image tokens are kept language-blind."""
        return self.stage == 1 or self.inherited_layers_keep_language_mask


def _allowed(field: str) -> str:
    info = AptConfig.model_fields.get(field)
    if info is None:
        return ""
    ann = info.annotation
    if typing.get_origin(ann) is Literal:
        return "allowed values: " + ", ".join(repr(a) for a in typing.get_args(ann)) + "."
    desc = info.description or ""
    return desc


def _to_config_error(exc: ValidationError, data: dict[str, Any], prefix: str) -> AptConfigError:
    err = exc.errors()[0]
    loc = [str(p) for p in err.get("loc", ())]
    # Union members appear in the location ("lora_targets.tuple[str, ...]"); keep the field and item indices.
    loc = loc[:1] + [p for p in loc[1:] if p.isdigit()]
    field = loc[0] if loc else ""
    path = ".".join([prefix, *loc]) if loc else prefix
    if err["type"] == "extra_forbidden":
        close = difflib.get_close_matches(field, AptConfig.model_fields, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        return AptConfigError(
            path, data.get(field), f"unknown APT field.{hint} Known fields: {', '.join(AptConfig.model_fields)}."
        )
    if not field:  # model-level rule (stage/vlm_mode)
        msg = err["msg"].removeprefix("Value error, ")
        bad = "prefix_cache" if msg.startswith("prefix_cache") else (
            "vlm_mode" if "vlm_mode" in msg else ("fusion_source_layers" if "fusion_source" in msg else ""))
        return AptConfigError(f"{prefix}.{bad}" if bad else prefix, data.get(bad) if bad else data, msg)
    value = err.get("input") if len(loc) > 1 else data.get(field, err.get("input"))
    allowed = _allowed(field)
    msg = err["msg"].removeprefix("Value error, ")
    return AptConfigError(path, value, f"{msg}. {allowed}".strip())


def _plain_type(annotation: Any) -> Any:
    """Map a pydantic annotation to one draccus can parse from the CLI and from JSON."""
    if typing.get_origin(annotation) is Literal:
        return type(typing.get_args(annotation)[0])
    # Frozen configs hold tuples; host configs get lists, which their JSON/CLI parsers handle best.
    return {tuple[int, ...] | None: list[int] | None, tuple[str, ...] | None: list[str] | None,
            tuple[str, ...] | str | None: list[str] | str | None}.get(annotation, annotation)


def settings_dataclass(model: type[BaseModel] = AptConfig, name: str = "AptSettings") -> type:
    """Generate a plain dataclass mirroring ``model``'s fields and defaults.

    Host config systems that only understand dataclasses (draccus) nest this type; values are
    validated by converting back with :meth:`AptConfig.parse`.
    """
    fields = []
    for fname, info in model.model_fields.items():
        default = info.default
        if isinstance(default, (list, dict)):
            spec = dataclasses.field(default_factory=lambda d=default: type(d)(d))
        else:
            spec = dataclasses.field(default=default, metadata={"help": info.description or ""})
        fields.append((fname, _plain_type(info.annotation), spec))
    cls = dataclasses.make_dataclass(name, fields)
    cls.__module__ = __name__
    cls.__doc__ = (
        f"Dataclass mirror of :class:`{model.__name__}` for dataclass-based host configs. "
        "Field meanings and defaults are those of the pydantic model; validate with AptConfig.parse()."
    )
    return cls


AptSettings = settings_dataclass()
