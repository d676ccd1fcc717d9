"""The SmolVLA adapter: where things live in LeRobot's ``SmolVLAPolicy``."""

from __future__ import annotations

from typing import Any

from apt_plugins import Adapter, AptConfig

_VWE = "model.vlm_with_expert"
_VLM = f"{_VWE}.vlm.model"
_LM = f"{_VLM}.text_model"


class SmolVLAAdapter(Adapter):
    """LeRobot ``SmolVLAPolicy``: SmolVLM prefix [images, language, state] + interleaved self/cross-attention expert."""

    name = "lerobot_smolvla"
    host = "lerobot"
    supported_host_versions = ">=0.6.1,<0.7"
    description = "LeRobot SmolVLA (SmolVLAPolicy): language-free image/state passes + gated fusion after each expert layer"
    policy_types = ("smolvla",)
    apt_policy_types = ("apt_smolvla",)
    host_modules = ("apt_plugins_lerobot_smolvla.configuration_apt_smolvla",)

    def matches(self, policy: Any) -> bool:
        try:
            from lerobot.policies.smolvla.modeling_smolvla import VLAFlowMatching
        except ImportError:
            return False
        return isinstance(getattr(policy, "model", None), VLAFlowMatching)

    def module_groups(self, policy: Any) -> dict[str, list[str]]:
        last = policy.model.vlm_with_expert.num_vlm_layers - 1
        return {
            "vision_tower": [f"{_VLM}.vision_model"],
            "projector": [f"{_VLM}.connector"],
            "language_model": [_LM],
            "action_expert": [f"{_VWE}.lm_expert", *(f"model.{n}" for n in (
                "state_proj", "action_in_proj", "action_out_proj", "action_time_mlp_in", "action_time_mlp_out"))],
            "fusion": ["model.apt_fusion"],
            # Never on the action path: the LM head, the final norm, and the last VLM layer beyond its
            # keys/values (the expert reads only those). They stay frozen in every vlm_mode.
            "unused": [
                f"{_VWE}.vlm.lm_head",
                f"{_LM}.norm",
                f"{_LM}.layers.{last}.self_attn.q_proj",
                f"{_LM}.layers.{last}.self_attn.o_proj",
                f"{_LM}.layers.{last}.post_attention_layernorm",
                f"{_LM}.layers.{last}.mlp",
            ],
        }

    def inject(self, policy: Any, config: AptConfig) -> None:
        from .modeling import install

        install(policy.model, config)

    def lora_targets(self, policy: Any, config: AptConfig) -> tuple[str, str]:
        n = policy.model.vlm_with_expert.num_vlm_layers
        body = "|".join(str(i) for i in range(n - 1))
        # Every projection of every text layer except the parts of the last one the expert never reads.
        pattern = rf".*layers\.({body})\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)|.*layers\.{n - 1}\.self_attn\.(k|v)_proj"
        return _LM, pattern

    def masking_summary(self, policy: Any, config: AptConfig) -> str:
        from .modeling import layer_plan

        if config.masks_language_in_inherited_layers:
            where = ("prompt tokens hidden from image-token and state-token queries in the VLM prefix and from "
                     "action queries in every expert layer (self and cross), positions included (training and "
                     "cached inference)")
        else:
            where = "no mask on inherited layers (language visible everywhere)"
        if config.stage == 2:
            n = len(layer_plan(policy.model.vlm_with_expert))
            where += f"; {n} gated fusion layers read " + (
                "all prefix tokens" if config.fusion_context == "all" else "the language tokens")
        return where

    def probe_batch(self, policy: Any, variant: str = "original", seed: int = 0) -> dict[str, Any]:
        from .testing import probe_batch

        return probe_batch(policy, variant=variant, seed=seed)

    def gate_values(self, policy: Any) -> dict[str, Any]:
        from .modeling import fusion_layers

        layers = fusion_layers(policy.model)
        return {} if layers is None else {str(i): layer.gate() for i, layer in enumerate(layers)}

    def conformance_kit(self) -> Any:
        from .testing import SmolVLAConformanceKit

        return SmolVLAConformanceKit(self.name)
