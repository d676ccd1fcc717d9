"""The openpi pi0 / pi0.5 adapters: where things live in openpi's ``PI0Pytorch``.

The "policy" is the ``PI0Pytorch`` module itself (openpi has no policy wrapper around it in PyTorch
training); pi0 and pi0.5 are the same class with ``config.pi05`` telling them apart.
"""

from __future__ import annotations

from typing import Any

from apt_plugins import Adapter, AptConfig

_PWE = "paligemma_with_expert"
_LM = f"{_PWE}.paligemma.model.language_model"
#: The openpi versions this adapter was verified on (the pinned snapshot, commit 15a9616, is 0.1.0).
SUPPORTED_OPENPI = "==0.1.0"


def _host_class() -> type | None:
    try:
        from openpi.models_pytorch.pi0_pytorch import PI0Pytorch
    except ImportError:
        return None
    return PI0Pytorch


class _OpenpiAdapter(Adapter):
    host = "openpi"
    supported_host_versions = SUPPORTED_OPENPI
    _pi05: bool

    def matches(self, policy: Any) -> bool:
        cls = _host_class()
        return cls is not None and isinstance(policy, cls) and bool(getattr(policy, "pi05", False)) == self._pi05

    def module_groups(self, policy: Any) -> dict[str, list[str]]:
        last = len(policy.paligemma_with_expert.paligemma.language_model.layers) - 1
        heads = [n for n in ("action_in_proj", "action_out_proj", "state_proj", "action_time_mlp_in",
                             "action_time_mlp_out", "time_mlp_in", "time_mlp_out") if hasattr(policy, n)]
        return {
            "vision_tower": [f"{_PWE}.paligemma.model.vision_tower"],
            "projector": [f"{_PWE}.paligemma.model.multi_modal_projector"],
            "language_model": [_LM],
            "action_expert": [f"{_PWE}.gemma_expert.model", *heads],
            "fusion": [f"{_PWE}.apt_fusion"],
            # Never on the action path: the LM heads, the VLM's final norm and the last VLM layer
            # beyond its keys/values (the expert reads only those). Frozen in every vlm_mode.
            "unused": [
                f"{_PWE}.paligemma.lm_head",
                f"{_PWE}.gemma_expert.lm_head",
                f"{_LM}.norm",
                f"{_LM}.layers.{last}.self_attn.q_proj",
                f"{_LM}.layers.{last}.self_attn.o_proj",
                f"{_LM}.layers.{last}.post_attention_layernorm",
                f"{_LM}.layers.{last}.mlp",
            ],
        }

    def inject(self, policy: Any, config: AptConfig) -> None:
        from .modeling import install

        install(policy, config)

    def lora_targets(self, policy: Any, config: AptConfig) -> tuple[str, list[str] | str]:
        n = len(policy.paligemma_with_expert.paligemma.language_model.layers)
        body = "|".join(str(i) for i in range(n - 1))
        # Every projection of every LM layer except the parts of the last layer the expert never reads.
        pattern = (rf".*layers\.({body})\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
                   rf"|.*layers\.{n - 1}\.self_attn\.(k|v)_proj")
        return _LM, pattern

    def masking_summary(self, policy: Any, config: AptConfig) -> str:
        task_only = self._pi05 and config.language_mask_scope == "task" and getattr(
            policy.config, "discrete_state_input", True)
        what = "task clause of the prompt" if task_only else "prompt tokens"
        if config.masks_language_in_inherited_layers:
            where = (f"{what} hidden from image-token queries in the VLM prefix and from state/action queries "
                     "in every expert layer, positions included (training and sampling)")
            if task_only:
                where += "; the discretised state tokens stay visible"
        else:
            where = "no mask on inherited layers (language visible everywhere)"
        if config.stage == 2:
            n = len(policy.paligemma_with_expert.gemma_expert.model.layers)
            where += f"; {n} gated fusion layers read " + (
                "all prefix tokens" if config.fusion_context == "all" else "the language tokens")
        return where

    def gate_values(self, policy: Any) -> dict[str, Any]:
        from .modeling import fusion_layers

        layers = fusion_layers(policy)
        return {} if layers is None else {str(i): layer.gate() for i, layer in enumerate(layers)}

    def conformance_kit(self) -> Any:
        if self.host_version() is None:  # no openpi here (the LeRobot environment): nothing to build
            return None
        from .testing import OpenpiConformanceKit

        return OpenpiConformanceKit(self.name)


class OpenpiPI0Adapter(_OpenpiAdapter):
    """openpi ``PI0Pytorch`` with ``pi05=False``: PaliGemma prefix + Gemma expert, state as its own token."""

    name = "openpi_pi0"
    description = "openpi pi0 (PI0Pytorch, PyTorch): masked prefix + gated fusion after each expert layer"
    _pi05 = False


class OpenpiPI05Adapter(_OpenpiAdapter):
    """openpi ``PI0Pytorch`` with ``pi05=True``: the discretised state is part of the prompt."""

    name = "openpi_pi05"
    description = "openpi pi0.5 (PI0Pytorch pi05=True): task-clause mask (state stays visible) + gated fusion"
    _pi05 = True
