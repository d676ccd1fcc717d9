"""The pi0 / pi0.5 adapters: where things live in LeRobot's ``PI0Policy``/``PI05Policy``."""

from __future__ import annotations

from typing import Any

from apt_plugins import Adapter, AptConfig

_PWE = "model.paligemma_with_expert"
_LM = f"{_PWE}.paligemma.model.language_model"


class _PiAdapter(Adapter):
    host = "lerobot"
    supported_host_versions = ">=0.6.1,<0.7"
    _model_class: str  # "pi0.modeling_pi0.PI0Pytorch"

    def _host_model_class(self) -> type | None:
        try:
            import importlib

            module, cls = self._model_class.rsplit(".", 1)
            return getattr(importlib.import_module(f"lerobot.policies.{module}"), cls)
        except ImportError:
            return None

    def matches(self, policy: Any) -> bool:
        cls = self._host_model_class()
        return cls is not None and isinstance(getattr(policy, "model", None), cls)

    def module_groups(self, policy: Any) -> dict[str, list[str]]:
        model = policy.model
        last = len(model.paligemma_with_expert.paligemma.model.language_model.layers) - 1
        expert_parts = [
            n for n in ("action_in_proj", "action_out_proj", "state_proj", "action_time_mlp_in",
                        "action_time_mlp_out", "time_mlp_in", "time_mlp_out") if hasattr(model, n)
        ]
        return {
            "vision_tower": [f"{_PWE}.paligemma.model.vision_tower"],
            "projector": [f"{_PWE}.paligemma.model.multi_modal_projector"],
            "language_model": [_LM],
            "action_expert": [f"{_PWE}.gemma_expert.model", *(f"model.{n}" for n in expert_parts)],
            "fusion": ["model.apt_fusion"],
            # Never on the action path: the LM head and final norm, and the last VLM layer beyond its
            # keys/values (the expert reads only those). They stay frozen in every vlm_mode.
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

    def bind_inputs(self, policy: Any, batch: dict[str, Any]) -> Any:
        from .modeling import bind_batch_inputs

        return bind_batch_inputs(policy.model, batch)

    def inject(self, policy: Any, config: AptConfig) -> None:
        from .modeling import install

        install(policy.model, config)

    def lora_targets(self, policy: Any, config: AptConfig) -> tuple[str, list[str] | str]:
        n = len(policy.model.paligemma_with_expert.paligemma.model.language_model.layers)
        body = "|".join(str(i) for i in range(n - 1))
        # Every projection of every LM layer except the parts of the last layer the expert never reads.
        pattern = rf".*layers\.({body})\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)|.*layers\.{n - 1}\.self_attn\.(k|v)_proj"
        return _LM, pattern

    def masking_summary(self, policy: Any, config: AptConfig) -> str:
        what = "task-text tokens" if (config.language_mask_scope == "task" and self.name == "lerobot_pi05") else (
            "prompt tokens")
        if config.masks_language_in_inherited_layers:
            where = (f"{what} hidden from image-token queries in the VLM prefix and from state/action queries "
                     "in every expert layer, positions included (training and cached inference)")
            if self.name == "lerobot_pi05" and config.language_mask_scope == "task":
                where += "; the state tokens in the prompt stay visible"
        else:
            where = "no mask on inherited layers (language visible everywhere)"
        if config.stage == 2:
            where += f"; {len(policy.model.paligemma_with_expert.gemma_expert.model.layers)} gated fusion layers read " + (
                "all prefix tokens" if config.fusion_context == "all" else "the language tokens")
        return where

    def normalize_state_dict(self, policy: Any, state_dict: dict[str, Any]) -> dict[str, Any]:
        # LeRobot's own pi loader adds the `model.` prefix and renames legacy (openpi-converted) keys;
        # the renamer is only needed (and only quiet) when some names do not match already.
        prefixed = {k if k.startswith("model.") else f"model.{k}": v for k, v in state_dict.items()}
        if prefixed.keys() <= policy.state_dict().keys():
            return prefixed
        fixed = policy._fix_pytorch_state_dict_keys(state_dict, policy.config)
        return {k if k.startswith("model.") else f"model.{k}": v for k, v in fixed.items()}

    def rewrite_processor_config(self, filename: str, data: dict[str, Any],
                                 config: AptConfig) -> tuple[dict[str, Any], list[str]]:
        # pi0 needs nothing: its prompt is the task alone, so the attention mask already spans it.
        from .processing import PREPROCESSOR_FILE, apt_pi05_preprocessor_config

        if self.name == "lerobot_pi05" and filename == PREPROCESSOR_FILE:
            return apt_pi05_preprocessor_config(data)
        return data, []

    def probe_batch(self, policy: Any, variant: str = "original", seed: int = 0) -> dict[str, Any]:
        from .testing import probe_batch

        return probe_batch(policy.config, variant=variant, seed=seed)

    def gate_values(self, policy: Any) -> dict[str, Any]:
        from .modeling import fusion_layers

        layers = fusion_layers(policy.model)
        return {} if layers is None else {str(i): layer.gate() for i, layer in enumerate(layers)}

    def conformance_kit(self) -> Any:
        from .testing import PiConformanceKit

        return PiConformanceKit(self.name)


class PI0Adapter(_PiAdapter):
    """LeRobot ``PI0Policy``: PaliGemma prefix + Gemma action expert, state as its own token."""

    name = "lerobot_pi0"
    description = "LeRobot pi0 (PI0Policy): masked prefix + gated fusion after each expert layer"
    policy_types = ("pi0",)
    apt_policy_types = ("apt_pi0",)
    host_modules = ("apt_plugins_lerobot_pi.configuration_apt_pi0", "apt_plugins_lerobot_pi.processing")
    _model_class = "pi0.modeling_pi0.PI0Pytorch"


class PI05Adapter(_PiAdapter):
    """LeRobot ``PI05Policy``: like pi0, but the discretised state is part of the prompt."""

    name = "lerobot_pi05"
    description = "LeRobot pi0.5 (PI05Policy): task-span mask (state stays visible) + gated fusion"
    policy_types = ("pi05",)
    apt_policy_types = ("apt_pi05",)
    host_modules = ("apt_plugins_lerobot_pi.configuration_apt_pi05", "apt_plugins_lerobot_pi.processing")
    _model_class = "pi05.modeling_pi05.PI05Pytorch"
