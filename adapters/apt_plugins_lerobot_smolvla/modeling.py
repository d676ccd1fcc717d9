"""APT forward passes for LeRobot's SmolVLA (``VLAFlowMatching``, installed by class swap).

SmolVLA's prefix is ``[image tokens | language tokens | one state token]``: images and language
attend to each other, the state token attends to everything before it. Its action expert runs one
layer per VLM layer (or per group of them): self-attention layers concatenate the prefix's keys
and values with the expert's own, cross-attention layers (every other one by default) project the
VLM layer's keys/values with the expert's own ``k_proj``/``v_proj`` and attend to them only.

One code path serves training and cached inference:

1. **Image pass.** The valid image tokens run through every VLM layer *without* the language
   tokens (compacted, positions counting only them). No image token may attend to language in
   Stage 1, so leaving the language out of this pass is the same function, minus the last-bit
   floating-point noise masked columns would add. No autograd when the VLM is frozen.
2. **State pass.** The state token runs through every VLM layer attending to the image keys/values
   and itself, positioned right after the images. It runs with autograd: ``state_proj`` trains.
3. **Language pass** (Stage 2 only). The language tokens run through the VLM at their stock
   positions, attending to the image keys/values and to each other; only the fusion layers read it.
4. **Expert.** Each expert layer reads its VLM layer's visible (image + state) keys/values, in
   self- or cross-attention exactly as the host's layer does; in Stage 2 a gated fusion layer after
   each expert layer reads the keys/values of a VLM layer *including language*.

The action path is then exactly independent of the instruction (content and length), and Stage 2
with closed gates reproduces Stage 1 bit for bit. With the language mask lifted
(``inherited_layers_keep_language_mask=False``) one pass runs the whole prefix at the
stock positions, like the host's prefix prefill, and the expert sees every prefix token: the host's
function (sampled actions bit for bit).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from lerobot.policies.common.flow_matching import euler_integrate
from lerobot.policies.common.vla_utils import make_att_2d_masks
from lerobot.policies.smolvla.modeling_smolvla import VLAFlowMatching
from lerobot.policies.smolvla.smolvlm_with_expert import apply_rope
from torch import Tensor, nn

from apt_plugins import (
    AptConfig,
    AptConfigError,
    GatedCrossAttention,
    LanguageMaskError,
    gather_mask,
    gather_tokens,
    visible_first,
)

__all__ = ["APTVLAFlowMatching", "PrefixContext", "install", "fusion_layers", "layer_plan"]

KV = tuple[Tensor, Tensor]  # keys (post-RoPE), values: (B, T, KV heads, head_dim), SmolVLA's layout


@dataclass
class PrefixContext:
    """What the expert reads from the prefix: per-VLM-layer keys/values and their validity.

    ``visible_*`` are the tokens the inherited expert layers attend to (images then the state token,
    compacted); ``language_*`` the hidden language tokens, computed only when a fusion layer reads
    them. With the language mask lifted, language is part of the visible tokens
    (``visible_is_language`` marks it).
    """

    visible: Tensor  # (B, M) valid visible tokens
    visible_kv: list[KV]  # per VLM layer
    visible_is_language: Tensor  # (B, M)
    offset: Tensor  # (B,) position of the first suffix token in self-attention layers
    language: Tensor | None = None  # (B, L) valid hidden language tokens
    language_kv: list[KV] | None = None
    fusion: tuple[list[KV], Tensor] | None = None  # built once per prefix, reused every denoising step


def _tail(layer: nn.Module, hidden: Tensor, attn_out: Tensor) -> Tensor:
    """o_proj + residual, post-attention norm, MLP + residual: the host's per-layer tail, op for op."""
    if attn_out.dtype != layer.self_attn.o_proj.weight.dtype:
        attn_out = attn_out.to(layer.self_attn.o_proj.weight.dtype)
    # In-place adds, as the host: the sum takes the projection's dtype (a bf16 VLM turns an fp32
    # residual stream into bf16 after its first layer), which an out-of-place add would not.
    out = layer.self_attn.o_proj(attn_out)
    out += hidden
    residual = out.clone()
    out = layer.mlp(layer.post_attention_layernorm(out))
    out += residual
    return out


def _vlm_layer(attend: Any, layer: nn.Module, hidden: Tensor, mask: Tensor, positions: Tensor,
               context: KV | None = None, kv_only: bool = False) -> tuple[Tensor, KV]:
    """One VLM text layer over ``hidden``; ``context`` keys/values are prepended to its own.

    Pure (no cache), so it can be checkpointed. With ``kv_only`` only the keys/values are computed:
    the expert reads nothing else from the last VLM layer.
    """
    attn = layer.self_attn
    normed = layer.input_layernorm(hidden).to(attn.q_proj.weight.dtype)
    shape = (*normed.shape[:-1], -1, attn.head_dim)
    k = apply_rope(attn.k_proj(normed).view(shape), positions)
    v = attn.v_proj(normed).view(shape)
    if kv_only:
        return hidden, (k, v)
    q = apply_rope(attn.q_proj(normed).view(shape), positions)
    keys, values = (k, v) if context is None else (torch.cat([context[0], k], 1), torch.cat([context[1], v], 1))
    out = attend(mask, hidden.shape[0], attn.head_dim, q, keys, values)
    return _tail(layer, hidden, out), (k, v)


def _expert_layer(attend: Any, layer: nn.Module, hidden: Tensor, prefix_kv: KV, cross: bool, mask: Tensor,
                  positions: Tensor) -> Tensor:
    """One expert layer against a VLM layer's prefix keys/values, as the host's self/cross layer."""
    attn = layer.self_attn
    normed = layer.input_layernorm(hidden).to(attn.q_proj.weight.dtype)
    shape = (*normed.shape[:-1], -1, attn.head_dim)
    q = apply_rope(attn.q_proj(normed).view(shape), positions)
    pk, pv = prefix_kv
    if cross:
        # The expert's own k/v projections read the VLM's post-RoPE keys/values (its input width).
        keys = attn.k_proj(pk.to(attn.k_proj.weight.dtype).reshape(*pk.shape[:2], -1)).view(*pk.shape[:2], -1, attn.head_dim)
        values = attn.v_proj(pv.to(attn.v_proj.weight.dtype).reshape(*pv.shape[:2], -1)).view(*pv.shape[:2], -1, attn.head_dim)
    else:
        k = apply_rope(attn.k_proj(normed).view(shape), positions)
        v = attn.v_proj(normed).view(shape)
        keys, values = torch.cat([pk, k], 1), torch.cat([pv, v], 1)
    return _tail(layer, hidden, attend(mask, hidden.shape[0], attn.head_dim, q, keys, values))


def layer_plan(vwe: nn.Module) -> list[tuple[int, int, bool]]:
    """``(vlm layer, expert layer, cross-attention?)`` for every VLM layer that has an expert layer.

    Mirrors ``SmolVLMWithExpertModel.get_model_layers`` and the self/cross dispatch of its forward.
    """
    multiple = vwe.num_vlm_layers // vwe.num_expert_layers
    plan = []
    for i in range(vwe.num_vlm_layers):
        if multiple > 0 and i > 0 and i % multiple != 0:
            continue
        cross = "cross" in vwe.attention_mode and not (vwe.self_attn_every_n_layers > 0
                                                         and i % vwe.self_attn_every_n_layers == 0)
        plan.append((i, i // multiple if multiple > 0 else i, cross))
    return plan


def _checkpointed(enabled: bool, fn: Any, *args: Any) -> Any:
    if enabled:
        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=False)
    return fn(*args)


class APTVLAFlowMatching(VLAFlowMatching):
    """``VLAFlowMatching`` with APT stages (installed on an existing instance by class swap).

    State lives in ``self.__dict__``: ``_apt_config`` (the :class:`AptConfig` in force),
    ``_apt_fusion_sources`` (the VLM layer each fusion layer reads), ``_apt_gradient_checkpointing``
    (SmolVLA has no flag of its own). The Stage-2 fusion layers are ``self.apt_fusion``, one per
    expert layer.
    """

    @property
    def apt_config(self) -> AptConfig:
        return self.__dict__["_apt_config"]

    @property
    def apt_gradient_checkpointing(self) -> bool:
        """Checkpoint each VLM layer (when it runs with autograd) and each expert + fusion block."""
        return self.__dict__.get("_apt_gradient_checkpointing", False)

    @apt_gradient_checkpointing.setter
    def apt_gradient_checkpointing(self, enabled: bool) -> None:
        self.__dict__["_apt_gradient_checkpointing"] = bool(enabled)

    def _apt_vlm_trains(self) -> bool:
        return any(p.requires_grad for p in self.vlm_with_expert.vlm.parameters())

    def _apt_checkpointing(self) -> bool:
        return self.apt_gradient_checkpointing and self.training and torch.is_grad_enabled()

    # ------------------------------------------------------------------ prefix
    def _apt_run_vlm(self, embs: Tensor, mask: Tensor, positions: Tensor, context: list[KV] | None = None) -> list[KV]:
        """Every VLM text layer over ``embs`` (attending ``context`` first); each layer's keys/values."""
        vwe = self.vlm_with_expert
        layers = vwe.get_vlm_model().text_model.layers
        attend = vwe.get_attention_interface()
        checkpointing = self._apt_checkpointing() and torch.is_grad_enabled()
        hidden, kv = embs, []
        for i, layer in enumerate(layers):
            ctx = context[i] if context is not None else None
            last = i == len(layers) - 1
            if last:
                hidden, layer_kv = _vlm_layer(attend, layer, hidden, mask, positions, ctx, True)
            else:
                hidden, layer_kv = _checkpointed(checkpointing, _vlm_layer, attend, layer, hidden, mask, positions, ctx)
            kv.append(layer_kv)
        return kv

    def _apt_prefix(self, images, img_masks, lang_tokens, lang_masks, state) -> PrefixContext:
        """Run the VLM over the prefix (image, state and, in Stage 2, language passes; module docstring)."""
        cfg = self.apt_config
        if not cfg.masks_language_in_inherited_layers:
            return self._apt_joint_prefix(images, img_masks, lang_tokens, lang_masks, state)
        vlm_grad = torch.is_grad_enabled() and self._apt_vlm_trains()
        with torch.set_grad_enabled(vlm_grad):
            embs, pad, att = self.embed_prefix(images, img_masks, lang_tokens, lang_masks, state=state)
        # embed_prefix ran state_proj without autograd; state_proj trains, so its token is redone here.
        state_emb = self.state_proj(state)
        state_emb = state_emb[:, None, :] if state_emb.ndim == 2 else state_emb
        state_at, n_img = self._apt_layout(att, lang_tokens)
        idx = torch.arange(pad.shape[1], device=pad.device)[None, :]
        language = torch.zeros_like(pad)
        language[:, n_img:state_at] = lang_masks.bool()
        att_2d = make_att_2d_masks(pad, att)
        with torch.set_grad_enabled(vlm_grad):
            index, valid = visible_first(pad & (idx < n_img))
            mask = gather_mask(att_2d, index, index) & valid[:, None, :]
            # Images come first, so cumsum(valid)-1 over the compacted images are their stock positions.
            positions = (torch.cumsum(valid, dim=1) - 1).clamp(min=0)
            image_kv = self._apt_run_vlm(gather_tokens(embs, index), mask, positions)
        one = torch.ones(pad.shape[0], 1, dtype=torch.bool, device=pad.device)
        visible = torch.cat([valid, one], 1)
        state_kv = self._apt_run_vlm(state_emb.to(embs.dtype), visible[:, None, :], valid.sum(dim=1, keepdim=True),
                                     context=image_kv)
        visible_kv = [(torch.cat([ik, sk], 1), torch.cat([iv, sv], 1))
                      for (ik, iv), (sk, sv) in zip(image_kv, state_kv, strict=True)]
        prefix = PrefixContext(visible=visible, visible_kv=visible_kv, visible_is_language=torch.zeros_like(visible),
                               offset=visible.sum(dim=1))
        if cfg.stage == 2:
            # Language attends to the images and to itself (not to the state: its att bit hides it).
            with torch.set_grad_enabled(vlm_grad):
                lang_index, lang_valid = visible_first(language)
                rows = gather_mask(att_2d, lang_index, torch.cat([index, lang_index], 1))
                mask = rows & torch.cat([valid, lang_valid], 1)[:, None, :]
                usual = torch.cumsum(pad, dim=1) - 1
                prefix.language = lang_valid
                prefix.language_kv = self._apt_run_vlm(gather_tokens(embs, lang_index), mask, gather_tokens(usual, lang_index),
                                                       context=image_kv)
        return prefix

    def _apt_layout(self, att: Tensor, lang_tokens: Tensor) -> tuple[int, int]:
        """Index of the state token (the only prefix token whose att bit is set) and the image-token count."""
        state_at = int(att[0].to(torch.int8).argmax())
        return state_at, state_at - lang_tokens.shape[1]

    def _apt_joint_prefix(self, images, img_masks, lang_tokens, lang_masks, state) -> PrefixContext:
        """Language mask lifted: the whole prefix in one pass at the stock positions, as the host's prefill.

        Op for op the host's prefix prefill, so closed-gate sampling reproduces stock SmolVLA. The
        state token is part of the pass, so it runs with autograd (``state_proj`` trains).
        """
        embs, pad, att = self.embed_prefix(images, img_masks, lang_tokens, lang_masks, state=state)
        state_at, n_img = self._apt_layout(att, lang_tokens)
        language = torch.zeros_like(pad)
        language[:, n_img:state_at] = lang_masks.bool()
        kv = self._apt_run_vlm(embs, make_att_2d_masks(pad, att), torch.cumsum(pad, dim=1) - 1)
        return PrefixContext(visible=pad, visible_kv=kv, visible_is_language=language, offset=pad.sum(dim=-1))

    # ------------------------------------------------------------------ expert
    def _apt_velocity(self, prefix: PrefixContext, x_t: Tensor, timestep: Tensor) -> Tensor:
        """One evaluation of the action expert (with fusion in Stage 2): the flow velocity."""
        vwe = self.vlm_with_expert
        attend = vwe.get_attention_interface()
        expert = vwe.lm_expert
        embs, pad, att = self.embed_suffix(x_t, timestep)
        bsz, seq = pad.shape
        visible = prefix.visible[:, None, :].expand(bsz, seq, prefix.visible.shape[1])
        self_mask = torch.cat([visible, make_att_2d_masks(pad, att)], dim=2)
        positions = prefix.offset[:, None] + torch.cumsum(pad, dim=1) - 1
        # Cross-attention layers re-base the expert's positions to start at 0, as the host does.
        cross_positions = positions - positions.min(dim=1, keepdim=True).values
        fusion = self._modules.get("apt_fusion")
        sources = self.__dict__.get("_apt_fusion_sources")
        if fusion is not None:
            fusion_kv, fusion_valid = self._apt_fusion_context(prefix)
            fusion_mask = fusion_valid[:, None, :].expand(bsz, seq, fusion_valid.shape[1])

        def rotate(q: Tensor) -> Tensor:  # (B, H, S, D) queries at the self-attention positions
            return apply_rope(q.transpose(1, 2), positions).transpose(1, 2)

        def block(hidden: Tensor, vlm_layer: int, expert_layer: int, cross: bool) -> Tensor:
            mask = visible if cross else self_mask
            hidden = _expert_layer(attend, expert.layers[expert_layer], hidden, prefix.visible_kv[vlm_layer], cross,
                                   mask, cross_positions if cross else positions)
            if fusion is not None:
                keys, values = fusion_kv[sources[expert_layer]]
                hidden = fusion[expert_layer](hidden, keys, values, fusion_mask, rotate_queries=rotate)
            return hidden

        hidden = embs
        checkpointing = self._apt_checkpointing()
        for vlm_layer, expert_layer, cross in layer_plan(vwe):
            hidden = _checkpointed(checkpointing, block, hidden, vlm_layer, expert_layer, cross)
        hidden = expert.norm(hidden)
        out = hidden[:, -self.config.chunk_size :].to(torch.float32)
        return self.action_out_proj(out)

    def _apt_fusion_context(self, prefix: PrefixContext) -> tuple[list[KV], Tensor]:
        """Per-VLM-layer keys/values the fusion layers read, (B, KV, T, D), and their validity."""
        if prefix.fusion is None:
            only_language = self.apt_config.fusion_context == "language"
            if prefix.language_kv is None:  # mask lifted: language is among the visible tokens
                kv, valid = prefix.visible_kv, (prefix.visible & prefix.visible_is_language if only_language
                                                else prefix.visible)
            elif only_language:
                kv, valid = prefix.language_kv, prefix.language
            else:
                kv = [(torch.cat([vk, lk], 1), torch.cat([vv, lv], 1))
                      for (vk, vv), (lk, lv) in zip(prefix.visible_kv, prefix.language_kv, strict=True)]
                valid = torch.cat([prefix.visible, prefix.language], 1)
            prefix.fusion = ([(k.transpose(1, 2), v.transpose(1, 2)) for k, v in kv], valid)
        return prefix.fusion

    # ------------------------------------------------------------------ host entry points
    def forward(self, images, img_masks, lang_tokens, lang_masks, state, actions, noise=None, time=None) -> Tensor:
        """The training loss per element, as ``VLAFlowMatching.forward``, with the APT stage in force."""
        if noise is None:
            noise = self.sample_noise(actions.shape, actions.device)
        if time is None:
            time = self.sample_time(actions.shape[0], actions.device)
        t = time[:, None, None]
        x_t = t * noise + (1 - t) * actions
        u_t = noise - actions
        prefix = self._apt_prefix(images, img_masks, lang_tokens, lang_masks, state)
        v_t = self._apt_velocity(prefix, x_t, time)
        return F.mse_loss(u_t, v_t, reduction="none")

    @torch.no_grad()
    def sample_actions(self, images, img_masks, lang_tokens, lang_masks, state, noise=None, **kwargs) -> Tensor:
        """Sampled actions, as ``VLAFlowMatching.sample_actions``: the prefix once, the expert per step."""
        bsize = state.shape[0]
        if noise is None:
            noise = self.sample_noise((bsize, self.config.chunk_size, self.config.max_action_dim), state.device)
        prefix = self._apt_prefix(images, img_masks, lang_tokens, lang_masks, state)
        return euler_integrate(
            lambda x_t, timestep: self.denoise_step(prefix.visible, prefix, x_t, timestep),
            noise,
            self.config.num_steps,
            rtc_processor=self.rtc_processor,
            rtc_enabled=self._rtc_enabled(),
            inference_delay=kwargs.get("inference_delay"),
            prev_chunk_left_over=kwargs.get("prev_chunk_left_over"),
            execution_horizon=kwargs.get("execution_horizon"),
        )

    def denoise_step(self, prefix_pad_masks, past_key_values, x_t, timestep):
        """One denoising step against a prefix computed by APT (same masking as training).

        ``past_key_values`` must be the :class:`PrefixContext` that ``sample_actions`` built: a plain
        ``DynamicCache`` from the stock prefill holds keys/values computed with language visible.
        """
        if not isinstance(past_key_values, PrefixContext):
            raise LanguageMaskError(
                "APT SmolVLA denoise_step needs the PrefixContext built by sample_actions (it carries the "
                "language-free keys/values); a plain DynamicCache from the stock prefix prefill has language "
                "in every token. Call policy.predict_action_chunk / model.sample_actions instead."
            )
        return self._apt_velocity(past_key_values, x_t, timestep)


def install(model: nn.Module, config: AptConfig) -> None:
    """Swap ``model`` (a ``VLAFlowMatching``) to :class:`APTVLAFlowMatching`; add the Stage-2 fusion layers.

    :raises AptConfigError: ``compile_model`` is on, ``apt.attention='sdpa'`` or ``apt.prefix_cache`` is
        set (not supported by this adapter), or ``fusion_source_layers`` does not name one VLM layer per
        expert layer.
    """
    if getattr(model.config, "compile_model", False):
        raise AptConfigError(
            "policy.compile_model", True,
            "torch.compile stores compiled copies of forward/sample_actions at construction, which would bypass "
            "the APT masks. Set compile_model=false (compile after preparing the stage if needed).",
        )
    if config.attention == "sdpa":
        raise AptConfigError(
            "apt.attention", config.attention,
            "the lerobot_smolvla adapter runs SmolVLA's own eager attention (the host has no other kernel); "
            "use 'auto' or 'eager'.",
        )
    if config.prefix_cache is not None:
        raise AptConfigError(
            "apt.prefix_cache", config.prefix_cache,
            "the lerobot_smolvla adapter has no prefix cache yet (SmolVLA's state token runs through the VLM "
            "behind the trainable state_proj, so only the image keys/values could be cached); unset it.",
        )
    if type(model) is VLAFlowMatching:
        model.__class__ = APTVLAFlowMatching
    model.__dict__["_apt_config"] = config
    vwe = model.vlm_with_expert
    # The host re-evaluates these in train(); APT owns freezing (frozen groups stay in eval anyway),
    # so a VLM that trains under vlm_mode lora/full must not be forced into eval by the host.
    vlm_trains = config.stage == 2 and config.vlm_mode != "frozen"
    vwe.train_expert_only = not vlm_trains
    vwe.freeze_vision_encoder = vwe.freeze_vision_encoder and not vlm_trains
    if config.stage != 2:
        return
    n_vlm, expert_layers = vwe.num_vlm_layers, vwe.lm_expert.layers
    plan = layer_plan(vwe)
    default = [vlm_layer for vlm_layer, _, _ in plan]
    sources = list(config.fusion_source_layers) if config.fusion_source_layers is not None else default
    if len(sources) != len(expert_layers) or any(not 0 <= s < n_vlm for s in sources):
        raise AptConfigError(
            "apt.fusion_source_layers", config.fusion_source_layers,
            f"give one VLM layer index in [0, {n_vlm - 1}] per expert layer ({len(expert_layers)} entries), "
            f"or leave it unset for the default (each expert layer reads the VLM layer it runs with: {default}).",
        )
    model.__dict__["_apt_fusion_sources"] = sources
    if "apt_fusion" in model._modules:
        return
    attn = expert_layers[0].self_attn
    text = vwe.config.text_config
    layers = nn.ModuleList(
        GatedCrossAttention(vwe.expert_hidden_size, text.num_attention_heads, attn.head_dim,
                            gate_granularity=config.gate_granularity, gate_init_logit=config.gate_init_logit,
                            zero_init=config.fusion_zero_init)
        for _ in expert_layers
    )
    model.apt_fusion = layers.to(device=attn.q_proj.weight.device, dtype=torch.float32)


def fusion_layers(model: nn.Module) -> Any:
    """The Stage-2 fusion layers of an APT SmolVLA model, or None in Stage 1."""
    return model._modules.get("apt_fusion")
