"""APT forward passes for openpi's ``PI0Pytorch`` (pi0 and pi0.5), installed by class swap.

openpi's PyTorch model runs prefix (images, prompt) and suffix (state/actions) jointly in training
and through a ``DynamicCache`` at inference. APT replaces both with one code path over the same
sub-modules (the host's layers, norms, projections and attention kernel, never copies):

1. the prefix runs through the VLM once, producing every layer's keys/values, without autograd
   whenever no VLM parameter trains. With language masked, the tokens the action path may see
   (images, and pi0.5's discretised-state tokens) run *without* the hidden language tokens and at
   positions that do not count them, so the action path is exactly blind to the instruction, its
   content and its length, bit for bit. No visible token may attend to language, so leaving it out
   of their pass is the same function minus the floating-point noise masked columns would add.
   The language tokens run separately (attending to the visible ones) only when a Stage-2 fusion
   layer reads them;
2. the action expert runs on the suffix against those keys/values; in Stage 2 a gated fusion
   layer after each expert layer reads the corresponding VLM layer's keys/values, language
   included.

This equals openpi's joint pass (its prefix never attends to the suffix) while skipping autograd
on a frozen VLM; Stage 2 with closed gates reproduces Stage 1 bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from openpi.models_pytorch.pi0_pytorch import PI0Pytorch, make_att_2d_masks
from torch import Tensor, nn
from transformers.models.gemma import modeling_gemma

from apt_plugins import (
    AptConfig,
    AptConfigError,
    GatedCrossAttention,
    LanguageMaskError,
    gather_mask,
    gather_tokens,
    visible_first,
)

__all__ = ["APTPI0Pytorch", "PrefixContext", "install", "fusion_layers", "set_state_marker"]


@dataclass
class PrefixContext:
    """What the expert reads from the prefix: per-layer keys/values and their validity.

    ``visible_*``: the prefix tokens the inherited expert layers attend to (compacted, original
    order). ``language_*``: the hidden language tokens, computed only for Stage-2 fusion.
    """

    visible: Tensor  # (B, M) valid visible tokens
    visible_kv: list[tuple[Tensor, Tensor]]  # per VLM layer, post-RoPE, (B, KV, M, head_dim)
    visible_is_language: Tensor  # (B, M) visible tokens that are language (mask lifted only)
    offset: Tensor  # (B,) position of the first suffix token
    language: Tensor | None = None
    language_kv: list[tuple[Tensor, Tensor]] | None = None
    fusion: tuple[list[tuple[Tensor, Tensor]], Tensor] | None = None  # built once per prefix


def _mask4d(mask_2d: Tensor) -> Tensor:
    # openpi's own additive convention (PI0Pytorch._prepare_attention_masks_4d): finite, never NaN.
    return torch.where(mask_2d[:, None, :, :], 0.0, -2.3819763e38)


def _layer(layer: nn.Module, hidden: Tensor, mask4d: Tensor, cos: Tensor, sin: Tensor, adarms: Tensor | None,
           context: tuple[Tensor, Tensor] | None = None, kv_only: bool = False):
    """One Gemma decoder layer of openpi's patched transformers, pure (no cache), checkpointable.

    The same sub-module calls as ``PaliGemmaWithExpertModel.forward``'s per-layer step, for one
    stream. ``context`` keys/values are prepended to the layer's own. Returns ``(hidden, (k, v))``;
    with ``kv_only`` only the keys/values (the last VLM layer feeds the expert through them alone).
    """
    attn = layer.self_attn
    normed, gate = layer.input_layernorm(hidden, cond=adarms)
    shape = (*normed.shape[:-1], -1, attn.head_dim)
    k = attn.k_proj(normed).view(shape).transpose(1, 2)
    v = attn.v_proj(normed).view(shape).transpose(1, 2)
    if kv_only:
        k = (k * cos.unsqueeze(1)) + (modeling_gemma.rotate_half(k) * sin.unsqueeze(1))
        return hidden, (k, v)
    q = attn.q_proj(normed).view(shape).transpose(1, 2)
    q, k = modeling_gemma.apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)
    own = (k, v)
    if context is not None:
        k = torch.cat([context[0], k], dim=2)
        v = torch.cat([context[1], v], dim=2)
    out, _ = modeling_gemma.eager_attention_forward(attn, q, k, v, mask4d, attn.scaling)
    out = out.reshape(*normed.shape[:-1], -1)
    if out.dtype != attn.o_proj.weight.dtype:
        out = out.to(attn.o_proj.weight.dtype)
    hidden = modeling_gemma._gated_residual(hidden, attn.o_proj(out), gate)
    residual = hidden
    normed, gate = layer.post_attention_layernorm(hidden, cond=adarms)
    if layer.mlp.up_proj.weight.dtype == torch.bfloat16:
        normed = normed.to(torch.bfloat16)
    hidden = modeling_gemma._gated_residual(residual, layer.mlp(normed), gate)
    return hidden, own


class APTPI0Pytorch(PI0Pytorch):
    """openpi ``PI0Pytorch`` (pi0 and pi0.5) with APT stages; installed on an instance by class swap.

    State in ``self.__dict__``: ``_apt_config`` (the :class:`AptConfig`), ``_apt_state_marker_id``
    (pi0.5: the token id that starts the ``State:`` clause), ``_apt_fusion_sources``; the fusion
    layers are ``paligemma_with_expert.apt_fusion`` (Stage 2 only).
    """

    @property
    def apt_config(self) -> AptConfig:
        return self.__dict__["_apt_config"]

    def _apt_vlm_trains(self) -> bool:
        return any(p.requires_grad for p in self.paligemma_with_expert.paligemma.parameters())

    # ------------------------------------------------------------------ language span
    def _apt_language_tokens(self, lang_tokens: Tensor, lang_masks: Tensor) -> Tensor:
        """(B, L) mask of the prompt tokens to hide: the whole prompt, or pi0.5's task clause."""
        lang_masks = lang_masks.bool()
        discrete_state = self.pi05 and getattr(self.config, "discrete_state_input", self.pi05)
        if self.apt_config.language_mask_scope == "prompt" or not discrete_state:
            # pi0 (and pi0.5 without discrete_state_input): every prompt token is the task.
            return lang_masks
        marker = self.__dict__.get("_apt_state_marker_id")
        if marker is None:
            marker = state_marker_id()
            self.__dict__["_apt_state_marker_id"] = marker
        # openpi's pi0.5 prompt is "Task: <text>, State: <bins>;\nAction: ": hide everything after BOS
        # up to the first marker token; the state bins and the scaffolding after them stay visible.
        is_marker = lang_tokens == marker
        found = is_marker.any(dim=1)
        if not bool(found.all()):
            raise LanguageMaskError(
                f"pi0.5 prompt rows {torch.nonzero(~found).flatten().tolist()} have no 'State' marker token "
                f"(id {marker}), so the task span cannot be found: the prompt was truncated (raise max_token_len) "
                "or not built by openpi's pi0.5 tokenizer. Set apt.language_mask_scope='prompt' to hide the "
                "whole prompt (state included), or fix the marker id (APT_OPENPI_STATE_TOKEN_ID)."
            )
        first = is_marker.int().argmax(dim=1)
        cols = torch.arange(lang_tokens.shape[1], device=lang_tokens.device)[None, :]
        return (cols >= 1) & (cols < first[:, None]) & lang_masks

    # ------------------------------------------------------------------ prefix
    def _apt_prefix(self, images, img_masks, lang_tokens, lang_masks) -> PrefixContext:
        """Run the VLM over the prefix once; return the keys/values the expert reads (module docstring)."""
        cfg = self.apt_config
        with torch.set_grad_enabled(torch.is_grad_enabled() and self._apt_vlm_trains()):
            embs, pad, att = self.embed_prefix(images, img_masks, lang_tokens, lang_masks)
            language = torch.zeros_like(pad)
            language[:, pad.shape[1] - lang_tokens.shape[1]:] = self._apt_language_tokens(lang_tokens, lang_masks)
            att_2d = make_att_2d_masks(pad, att)
            lm = self.paligemma_with_expert.paligemma.language_model
            if lm.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16:
                embs = embs.to(torch.bfloat16)
            usual = torch.cumsum(pad, dim=1) - 1
            if not cfg.masks_language_in_inherited_layers:
                kv = self._apt_run_vlm(lm, embs, att_2d, usual)
                return PrefixContext(visible=pad, visible_kv=kv, visible_is_language=language, offset=pad.sum(dim=-1))
            index, visible = visible_first(pad & ~language)
            positions = (torch.cumsum(visible, dim=1) - 1).clamp(min=0)
            mask = gather_mask(att_2d, index, index) & visible[:, None, :]
            visible_kv = self._apt_run_vlm(lm, gather_tokens(embs, index), mask, positions)
            prefix = PrefixContext(visible=visible, visible_kv=visible_kv, visible_is_language=torch.zeros_like(visible),
                                   offset=visible.sum(dim=-1))
            if cfg.stage == 2:
                lang_index, lang_valid = visible_first(language)
                rows = gather_mask(att_2d, lang_index, torch.cat([index, lang_index], dim=1))
                mask = rows & torch.cat([visible, lang_valid], dim=1)[:, None, :]
                prefix.language = lang_valid
                prefix.language_kv = self._apt_run_vlm(
                    lm, gather_tokens(embs, lang_index), mask, gather_tokens(usual, lang_index), context=visible_kv
                )
        return prefix

    def _apt_checkpointing(self) -> bool:
        return self.gradient_checkpointing_enabled and self.training and torch.is_grad_enabled()

    def _apt_run_vlm(self, lm: nn.Module, embs: Tensor, mask_2d: Tensor, positions: Tensor,
                     context: list[tuple[Tensor, Tensor]] | None = None) -> list[tuple[Tensor, Tensor]]:
        """The VLM layers over ``embs`` (attending ``context`` keys/values first); per-layer K/V."""
        mask4d = _mask4d(mask_2d)
        cos, sin = lm.rotary_emb(embs, positions)
        hidden, kv = embs, []
        last = len(lm.layers) - 1
        checkpointing = self._apt_checkpointing()
        for i, layer in enumerate(lm.layers):
            ctx = context[i] if context is not None else None
            if checkpointing and i != last:
                hidden, layer_kv = torch.utils.checkpoint.checkpoint(
                    _layer, layer, hidden, mask4d, cos, sin, None, ctx, use_reentrant=False, preserve_rng_state=False
                )
            else:
                hidden, layer_kv = _layer(layer, hidden, mask4d, cos, sin, None, ctx, kv_only=i == last)
            kv.append(layer_kv)
        return kv

    # ------------------------------------------------------------------ suffix
    def _apt_velocity(self, prefix: PrefixContext, state, x_t: Tensor, timestep: Tensor) -> Tensor:
        """One evaluation of the action expert (with fusion in Stage 2): the flow velocity."""
        embs, pad, att, adarms = self.embed_suffix(state, x_t, timestep)
        expert = self.paligemma_with_expert.gemma_expert.model
        if expert.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16:
            embs = embs.to(torch.bfloat16)
        bsz, seq = pad.shape
        visible = prefix.visible[:, None, :].expand(bsz, seq, prefix.visible.shape[1])
        mask4d = _mask4d(torch.cat([visible, make_att_2d_masks(pad, att)], dim=2))
        positions = prefix.offset[:, None] + torch.cumsum(pad, dim=1) - 1
        # openpi's joint pass rotates both streams with the VLM's rotary embedding.
        cos, sin = self.paligemma_with_expert.paligemma.language_model.rotary_emb(embs, positions)
        fusion = fusion_layers(self)
        sources = self.__dict__.get("_apt_fusion_sources")
        if fusion is not None:
            fusion_kv, fusion_valid = self._apt_fusion_context(prefix)
            fusion_mask = fusion_valid[:, None, :].expand(bsz, seq, fusion_valid.shape[1])

        def rotate(q: Tensor) -> Tensor:
            return (q * cos.unsqueeze(1)) + (modeling_gemma.rotate_half(q) * sin.unsqueeze(1))

        def block(hidden: Tensor, i: int) -> Tensor:
            hidden, _ = _layer(expert.layers[i], hidden, mask4d, cos, sin, adarms, context=prefix.visible_kv[i])
            if fusion is not None:
                keys, values = fusion_kv[sources[i]]
                hidden = fusion[i](hidden, keys, values, fusion_mask, rotate_queries=rotate)
            return hidden

        hidden = embs
        checkpointing = self._apt_checkpointing()
        for i in range(len(expert.layers)):
            if checkpointing:
                hidden = torch.utils.checkpoint.checkpoint(block, hidden, i, use_reentrant=False, preserve_rng_state=False)
            else:
                hidden = block(hidden, i)
        hidden, _ = expert.norm(hidden, cond=adarms)
        out = hidden[:, -self.config.action_horizon:].to(torch.float32)
        return self.action_out_proj(out)

    def _apt_fusion_context(self, prefix: PrefixContext):
        """Keys/values the fusion layers read and their validity; built once per prefix (sampling reuses it)."""
        if prefix.fusion is None:
            only_language = self.apt_config.fusion_context == "language"
            if prefix.language_kv is None:  # language mask lifted: everything is in the visible pass
                valid = prefix.visible & prefix.visible_is_language if only_language else prefix.visible
                prefix.fusion = (prefix.visible_kv, valid)
            elif only_language:
                prefix.fusion = (prefix.language_kv, prefix.language)
            else:
                kv = [(torch.cat([vk, lk], dim=2), torch.cat([vv, lv], dim=2))
                      for (vk, vv), (lk, lv) in zip(prefix.visible_kv, prefix.language_kv, strict=True)]
                prefix.fusion = (kv, torch.cat([prefix.visible, prefix.language], dim=1))
        return prefix.fusion

    # ------------------------------------------------------------------ host entry points
    def forward(self, observation, actions, noise=None, time=None) -> Tensor:
        """openpi's training loss (B x H x D), with the APT masks and fusion; same signature and RNG order."""
        images, img_masks, lang_tokens, lang_masks, state = self._preprocess_observation(observation, train=True)
        if noise is None:
            noise = self.sample_noise(actions.shape, actions.device)
        if time is None:
            time = self.sample_time(actions.shape[0], actions.device)
        t = time[:, None, None]
        x_t = t * noise + (1 - t) * actions
        u_t = noise - actions
        prefix = self._apt_prefix(images, img_masks, lang_tokens, lang_masks)
        v_t = self._apt_velocity(prefix, state, x_t, time)
        return F.mse_loss(u_t, v_t, reduction="none")

    @torch.no_grad()
    def sample_actions(self, device, observation, noise=None, num_steps=10) -> Tensor:
        """openpi's Euler sampler (t from 1 to 0) over an APT prefix built once."""
        bsize = observation.state.shape[0]
        if noise is None:
            noise = self.sample_noise((bsize, self.config.action_horizon, self.config.action_dim), device)
        images, img_masks, lang_tokens, lang_masks, state = self._preprocess_observation(observation, train=False)
        prefix = self._apt_prefix(images, img_masks, lang_tokens, lang_masks)
        dt = torch.tensor(-1.0 / num_steps, dtype=torch.float32, device=device)
        x_t = noise
        time = torch.tensor(1.0, dtype=torch.float32, device=device)
        while time >= -dt / 2:
            x_t = x_t + dt * self.denoise_step(state, prefix.visible, prefix, x_t, time.expand(bsize))
            time += dt
        return x_t

    def denoise_step(self, state, prefix_pad_masks, past_key_values, x_t, timestep):
        """One denoising step against the :class:`PrefixContext` built by :meth:`sample_actions`.

        A plain ``DynamicCache`` from the stock prefix pass carries no language mask; guessing it would
        silently leak language, so it is refused.
        """
        if not isinstance(past_key_values, PrefixContext):
            raise LanguageMaskError(
                "APT denoise_step needs the PrefixContext built by sample_actions (it carries the language "
                "visibility mask); a DynamicCache from the stock prefix pass has none. Call "
                "model.sample_actions(device, observation) instead."
            )
        return self._apt_velocity(past_key_values, state, x_t, timestep)


def state_marker_id() -> int:
    """The token id that starts pi0.5's ``State:`` clause (PaliGemma tokenizer ``"▁State"``).

    From ``APT_OPENPI_STATE_TOKEN_ID`` if set, else from openpi's own tokenizer when its model file
    is already in openpi's cache (never downloaded here).

    :raises LanguageMaskError: neither is available.
    """
    import os

    env = os.environ.get("APT_OPENPI_STATE_TOKEN_ID")
    if env:
        try:
            return int(env)
        except ValueError:
            raise LanguageMaskError(
                f"APT_OPENPI_STATE_TOKEN_ID={env!r} is not an integer token id; set it to the PaliGemma id of '▁State'."
            ) from None
    try:
        from openpi.shared import download

        cached = download.get_cache_dir() / "big_vision" / "paligemma_tokenizer.model"
        if cached.is_file():
            import sentencepiece

            sp = sentencepiece.SentencePieceProcessor(model_proto=cached.read_bytes())
            piece = sp.piece_to_id("\u2581State")
            if piece != sp.unk_id():
                return int(piece)
    except Exception:  # noqa: BLE001 - any failure means the tokenizer is not usable offline
        pass
    raise LanguageMaskError(
        "pi0.5 task-span masking needs the token id that starts the 'State:' clause, and openpi's PaliGemma "
        "tokenizer is not in its cache (offline). Run openpi once online (it caches "
        "gs://big_vision/paligemma_tokenizer.model), set APT_OPENPI_STATE_TOKEN_ID, or set "
        "apt.language_mask_scope='prompt' to hide the whole prompt (state included)."
    )


def set_state_marker(model: nn.Module, token_id: int) -> None:
    """Fix the pi0.5 ``State:`` marker token id on ``model`` (tests and custom tokenizers)."""
    model.__dict__["_apt_state_marker_id"] = int(token_id)


def install(model: nn.Module, config: AptConfig) -> None:
    """Swap ``model`` (an openpi ``PI0Pytorch``) to :class:`APTPI0Pytorch` and add the Stage-2 fusion layers."""
    if getattr(config, "prefix_cache", None) is not None:
        raise AptConfigError(
            "apt.prefix_cache", config.prefix_cache,
            "the openpi adapter has no prefix cache (openpi's trainer augments images at every step, so the prefix "
            "is never reused). Unset it.",
        )
    if getattr(config, "attention", "auto") == "sdpa":
        raise AptConfigError(
            "apt.attention", "sdpa",
            "the openpi adapter runs openpi's own eager attention kernel (the one its joint pass uses). Use "
            "apt.attention='eager' or 'auto' (eager here).",
        )
    # PI0Pytorch.__init__ stores torch.compile(self.sample_actions) on the instance, which would
    # shadow the APT sampler: compile the APT one instead, with the same mode.
    recompile = "sample_actions" in model.__dict__ and not model.__dict__.get("_apt_compiled")
    if recompile:
        del model.__dict__["sample_actions"]
    if type(model) is PI0Pytorch:
        model.__class__ = APTPI0Pytorch
    mode = getattr(model.config, "pytorch_compile_mode", None)
    if recompile and mode is not None:
        model.__dict__["sample_actions"] = torch.compile(model.sample_actions, mode=mode)
        model.__dict__["_apt_compiled"] = True
    model.__dict__["_apt_config"] = config
    if config.stage != 2:
        return
    pwe = model.paligemma_with_expert
    vlm_layers = len(pwe.paligemma.language_model.layers)
    expert_layers = pwe.gemma_expert.model.layers
    sources = list(config.fusion_source_layers) if config.fusion_source_layers is not None else list(
        range(len(expert_layers)))
    if len(sources) != len(expert_layers) or any(s < 0 or s >= vlm_layers for s in sources):
        raise AptConfigError(
            "apt.fusion_source_layers", config.fusion_source_layers,
            f"give one VLM layer index in [0, {vlm_layers - 1}] per expert layer ({len(expert_layers)} entries), "
            "or leave it unset for the layer-aligned default.",
        )
    model.__dict__["_apt_fusion_sources"] = sources
    if "apt_fusion" in pwe._modules:
        return
    attn = expert_layers[0].self_attn
    layers = nn.ModuleList(
        GatedCrossAttention(
            expert_layers[0].input_layernorm.dim,
            attn.config.num_attention_heads,
            attn.head_dim,
            gate_granularity=config.gate_granularity,
            gate_init_logit=config.gate_init_logit,
            zero_init=config.fusion_zero_init,
        )
        for _ in expert_layers
    )
    # fp32 like openpi's norms: the fusion output is added in the residual stream's dtype anyway.
    # Under paligemma_with_expert so every APT tensor name contains ".apt_" (the core's convention).
    pwe.apt_fusion = layers.to(device=attn.q_proj.weight.device, dtype=torch.float32)


def fusion_layers(model: nn.Module) -> Any:
    """The Stage-2 fusion layers of an APT openpi model, or None in Stage 1."""
    return model.paligemma_with_expert._modules.get("apt_fusion")

