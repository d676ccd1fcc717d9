"""The GR00T N1.7 adapter: where things live in LeRobot's ``GrootPolicy``."""

from __future__ import annotations

from typing import Any

from apt_plugins import Adapter, AptConfig

_QWEN = "_groot_model.backbone.model"  # Qwen3VLForConditionalGeneration
_VISUAL = f"{_QWEN}.model.visual"
_LM = f"{_QWEN}.model.language_model"
_HEAD = "_groot_model.action_head"
_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class GrootAdapter(Adapter):
    """LeRobot ``GrootPolicy`` (GR00T N1.7): Qwen3-VL backbone + DiT action head (alternating VL cross-attention)."""

    name = "lerobot_groot"
    host = "lerobot"
    supported_host_versions = ">=0.6.1,<0.7"
    description = "LeRobot GR00T N1.7 (GrootPolicy): language-free VL tokens + gated fusion after each DiT block"
    policy_types = ("groot",)
    apt_policy_types = ("apt_groot",)
    host_modules = ("apt_plugins_lerobot_groot.configuration_apt_groot",)

    def matches(self, policy: Any) -> bool:
        try:
            from lerobot.policies.groot.groot_n1_7 import GR00TN17
        except ImportError:  # the groot extra (diffusers, dm-tree) is not installed
            return False
        return isinstance(getattr(policy, "_groot_model", None), GR00TN17)

    def module_groups(self, policy: Any) -> dict[str, list[str]]:
        return {
            "vision_tower": [_VISUAL],
            # Qwen3-VL's patch merger (and its deepstack mergers) map vision features into the LM.
            "projector": [f"{_VISUAL}.merger", f"{_VISUAL}.deepstack_merger_list"],
            "language_model": [_LM],
            # The whole action head, vlln and vl_self_attention included (tune_vlln=True is the default).
            "action_expert": [_HEAD],
            "fusion": [f"{_HEAD}.apt_fusion"],
            # The head reads the pre-final-norm output of the last kept layer: the final norm and the
            # (tied) LM head are never on the action path and stay frozen in every vlm_mode.
            "unused": [f"{_LM}.norm", f"{_QWEN}.lm_head"],
        }

    def inject(self, policy: Any, config: AptConfig) -> None:
        from .modeling import install

        install(policy._groot_model, config)

    def lora_targets(self, policy: Any, config: AptConfig) -> tuple[str, list[str] | str]:
        # Every projection of every kept LM layer: the head reads the last layer's output.
        return _LM, list(_LORA_TARGETS)

    def masking_summary(self, policy: Any, config: AptConfig) -> str:
        if config.masks_language_in_inherited_layers:
            where = ("instruction tokens (text after the images) removed from the backbone pass the action path "
                     "reads, from vl_self_attention and from every DiT cross-attention block (text blocks read "
                     "the chat header/vision markers); training and inference")
        else:
            where = "no mask on inherited layers (stock GR00T paths, language visible everywhere)"
        if config.stage == 2:
            n = len(policy._groot_model.action_head.model.transformer_blocks)
            where += f"; {n} gated fusion layers (one after each DiT block) read " + (
                "all VL tokens" if config.fusion_context == "all" else "the language tokens")
        return where

    def normalize_state_dict(self, policy: Any, state_dict: dict[str, Any]) -> dict[str, Any]:
        # The LM head is tied to the token embedding; safetensors stores shared tensors once, so a
        # checkpoint may carry only one of the two names.
        emb, head = f"{_LM}.embed_tokens.weight", f"{_QWEN}.lm_head.weight"
        expected = policy.state_dict().keys()
        if head in expected and head not in state_dict and emb in state_dict:
            state_dict = {**state_dict, head: state_dict[emb]}
        return state_dict

    def seeded_noise(self, policy: Any, seeds: list[int]) -> Any:
        """Per-row flow noise, flow time and state dropout from each sample's seed (the head draws all three).

        ``nn.Dropout`` layers (``vl_self_attention`` has p=0.1) draw one mask for the whole batch from
        the global generator, which no per-row seed can reproduce: they are off while this is active.
        """
        import contextlib

        import torch

        from .modeling import ROW_SEEDS

        head = policy._groot_model.action_head

        def sample_time(batch_size, device, dtype):
            # The head's own Beta(alpha, beta) time distribution, one draw per row from its seed.
            alpha = torch.tensor(float(head._noise_beta_alpha))
            beta = torch.tensor(float(head._noise_beta_beta))
            rows = []
            for s in seeds:
                # Beta.sample takes no generator: draw under the global RNG, forked and seeded per row.
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(1_000_003 * s + 23)
                    rows.append(torch.distributions.Beta(alpha, beta).sample([1]))
            sample = torch.cat(rows).to(device, dtype=dtype)
            return (1 - sample) * head.config.noise_s

        @contextlib.contextmanager
        def patched():
            dropouts = [m for m in policy.modules() if isinstance(m, torch.nn.Dropout) and m.training]
            head.__dict__[ROW_SEEDS], head.__dict__["sample_time"] = list(seeds), sample_time
            for m in dropouts:
                m.training = False
            try:
                yield
            finally:
                head.__dict__.pop(ROW_SEEDS, None)
                head.__dict__.pop("sample_time", None)
                for m in dropouts:
                    m.training = True

        return patched()

    def probe_batch(self, policy: Any, variant: str = "original", seed: int = 0) -> dict[str, Any]:
        from .testing import probe_batch

        return probe_batch(policy, variant=variant, seed=seed)

    def gate_values(self, policy: Any) -> dict[str, Any]:
        from .modeling import fusion_layers

        layers = fusion_layers(policy._groot_model)
        return {} if layers is None else {str(i): layer.gate() for i, layer in enumerate(layers)}

    def conformance_kit(self) -> Any:
        from .testing import GrootConformanceKit

        return GrootConformanceKit(self.name)
