"""APT forward passes for LeRobot's ``PI0Pytorch`` and ``PI05Pytorch`` (installed by class swap).

One code path serves training and cached inference:

1. the prefix runs through the VLM once, producing every layer's keys/values; without autograd
   whenever the VLM is frozen. With language masked, the tokens the action path may see (images,
   pi0.5's state tokens) run without the hidden language tokens and with positions that do not
   count them; the language tokens run separately (attending to the visible ones) only when a
   Stage-2 fusion layer reads them. Visibility, not deletion, defines the function: no visible token
   may attend to language, so leaving language out of their pass is the same computation, minus
   the floating-point noise that masked columns would add;
2. the action expert runs on the suffix (state/action tokens) against those keys/values, and in
   Stage 2 a gated fusion layer after each expert layer reads the corresponding VLM layer's
   keys/values *including language*.

This equals LeRobot's joint training pass (the prefix never attends to the suffix) while skipping
all autograd work on a frozen VLM. Stage 1 is exactly blind to the instruction (content and
length), and Stage 2 with closed gates reproduces Stage 1 bit for bit.

With ``apt.prefix_cache`` set and the VLM frozen, step 1 is looked up per frame in a
:class:`~apt_plugins.PrefixCache` (keyed by the frame's prefix inputs and the frozen weights) and
only the frames not yet cached run through the VLM. ``apt.attention`` picks the attention kernel
(LeRobot's eager op, or PyTorch SDPA).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from lerobot.policies.common.flow_matching import euler_integrate
from lerobot.policies.common.vla_utils import make_att_2d_masks, prepare_attention_masks_4d
from lerobot.policies.pi0.modeling_pi0 import PI0Pytorch
from lerobot.policies.pi05.modeling_pi05 import PI05Pytorch
from lerobot.policies.pi_gemma import _gated_residual, layernorm_forward
from torch import Tensor, nn
from transformers.models.gemma import modeling_gemma

from apt_plugins import (
    AptConfig,
    GatedCrossAttention,
    LanguageMaskError,
    PrefixCache,
    PrefixCacheError,
    content_key,
    gather_mask,
    gather_tokens,
    visible_first,
)

__all__ = ["APTPI0Pytorch", "APTPI05Pytorch", "PrefixContext", "install", "fusion_layers", "bind_task_mask",
           "bind_batch_inputs", "prefix_cache_of"]


@dataclass
class PrefixContext:
    """What the expert needs from the prefix: per-layer keys/values and their validity.

    ``visible_*`` are the prefix tokens the inherited expert layers attend to (compacted, in their
    original order); ``language_*`` are the hidden language tokens, computed only when a Stage-2
    fusion layer reads them. With the language mask lifted, every prefix token is visible.
    """

    visible: Tensor  # (B, M) valid visible tokens
    visible_kv: list[tuple[Tensor, Tensor]]  # per VLM layer, post-RoPE, (B, KV, M, head_dim)
    visible_is_language: Tensor  # (B, M) visible tokens that are language (only when the mask is lifted)
    offset: Tensor  # (B,) position of the first suffix token
    language: Tensor | None = None  # (B, L) valid hidden language tokens
    language_kv: list[tuple[Tensor, Tensor]] | None = None  # per VLM layer, (B, KV, L, head_dim)
    fusion: tuple[list[tuple[Tensor, Tensor]], Tensor] | None = None  # built once, reused every denoising step


def _attend(attn: nn.Module, q: Tensor, k: Tensor, v: Tensor, mask4d: Tensor, attention: str) -> Tensor:
    """Multi-head attention of ``q`` over ``k``/``v`` under LeRobot's additive mask; ``(B, Q, H, D)`` out.

    ``eager`` is transformers' ``eager_attention_forward`` (what LeRobot runs), with grouped queries
    folded (:func:`_eager_grouped`) when there are fewer key/value heads than query heads. ``sdpa`` is
    ``F.scaled_dot_product_attention`` with the same additive mask: masked columns get the same
    large finite negative, so a row whose every column is masked (padding slots of the compacted
    prefix) stays finite, as in eager, and never turns into NaN that a later 0-weight would spread.
    """
    if attention == "eager":
        if k.shape[1] != q.shape[1] and mask4d.shape[1] == 1 and q.shape[1] % k.shape[1] == 0:
            return _eager_grouped(q, k, v, mask4d, attn.scaling)
        out, _ = modeling_gemma.eager_attention_forward(attn, q, k, v, mask4d, scaling=attn.scaling)
        return out
    groups = q.shape[1] // k.shape[1]
    k, v = modeling_gemma.repeat_kv(k, groups), modeling_gemma.repeat_kv(v, groups)
    bias = mask4d
    if bias.dtype != q.dtype:
        low = torch.finfo(q.dtype).min
        bias = bias.clamp(min=low).to(q.dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=0.0, scale=attn.scaling)
    return out.transpose(1, 2)


def _eager_grouped(q: Tensor, k: Tensor, v: Tensor, mask4d: Tensor, scaling: float) -> Tensor:
    """transformers' eager attention for grouped queries, without repeating the keys/values.

    ``q`` ``(B, H, Q, D)``, ``k``/``v`` ``(B, KV, K, D)`` with ``H = KV * G``, ``mask4d`` ``(B, 1, Q, K)``
    additive. The ``G`` query heads that share a key/value head are folded into the query rows, so
    each key/value head is one matmul over ``Q * G`` rows instead of ``G`` matmuls against ``G``
    copies of it: the same ops in the same order per element as ``eager_attention_forward`` (scale,
    mask, float32 softmax, cast back, no dropout: LeRobot's is 0), minus the ``repeat_kv`` copies and
    their backward sums (about 40 % of an expert layer's attention time on the CPU at the mid size,
    docs/benchmarks.md "Cached-prefix results"). The forward values equal the repeated form bit for
    bit at the tiny-test, mid and real head sizes (``tests/test_lerobot_pi.py``,
    ``tests/test_prefix_cache.py``); on very small matrices the BLAS may pick another kernel for the
    taller matmul and differ in the last bit. The key/value gradients sum the groups inside one matmul
    instead of after it, so they can differ from the repeated form in the last bits.
    """
    bsz, heads, rows, dim = q.shape
    kv_heads = k.shape[1]
    groups = heads // kv_heads
    # (B, H, Q, D) -> (B, KV, Q * G, D): a view when KV == 1 and q is a transposed (B, Q, H, D), as here.
    folded = q.transpose(1, 2).reshape(bsz, rows, kv_heads, groups, dim).transpose(1, 2)
    folded = folded.reshape(bsz, kv_heads, rows * groups, dim)
    scores = torch.matmul(folded, k.transpose(2, 3)) * scaling
    width = scores.shape[-1]
    scores = (scores.view(bsz, kv_heads, rows, groups, width) + mask4d[:, :, :, None, :]).view(
        bsz, kv_heads, rows * groups, width)
    weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    out = torch.matmul(weights, v)  # (B, KV, Q * G, D)
    return out.view(bsz, kv_heads, rows, groups, dim).transpose(1, 2).reshape(bsz, rows, heads, dim)


def _layer(layer: nn.Module, hidden: Tensor, mask4d: Tensor, cos: Tensor, sin: Tensor, adarms: Tensor | None,
           context: tuple[Tensor, Tensor] | None = None, kv_only: bool = False, attention: str = "eager"):
    """One Gemma decoder layer, pure (no cache mutation) so it can be checkpointed.

    Mirrors ``GemmaAttention`` + ``_PiGemmaDecoderLayerBase`` op for op. ``context`` keys/values are
    prepended to this layer's own. Returns ``(hidden_out, (k, v))``; with ``kv_only`` only the
    keys/values are computed (the last VLM layer feeds the expert through its K/V alone).
    ``attention``: ``"eager"`` or ``"sdpa"`` (see :func:`_attend`).
    """
    attn = layer.self_attn
    normed, gate = layernorm_forward(layer.input_layernorm, hidden, adarms)
    shape = (*normed.shape[:-1], -1, attn.head_dim)
    k = attn.k_proj(normed).view(shape).transpose(1, 2)
    v = attn.v_proj(normed).view(shape).transpose(1, 2)
    if kv_only:
        cos_u, sin_u = cos.unsqueeze(1), sin.unsqueeze(1)
        k = (k * cos_u) + (modeling_gemma.rotate_half(k) * sin_u)
        return hidden, (k, v)
    q = attn.q_proj(normed).view(shape).transpose(1, 2)
    q, k = modeling_gemma.apply_rotary_pos_emb(q, k, cos, sin)
    own = (k, v)
    if context is not None:
        k = torch.cat([context[0], k], dim=2)
        v = torch.cat([context[1], v], dim=2)
    out = _attend(attn, q, k, v, mask4d, attention).reshape(*normed.shape[:-1], -1)
    if out.dtype != attn.o_proj.weight.dtype:
        out = out.to(attn.o_proj.weight.dtype)
    hidden = _gated_residual(hidden, attn.o_proj(out), gate)
    residual = hidden
    normed, gate = layernorm_forward(layer.post_attention_layernorm, hidden, adarms)
    if layer.mlp.up_proj.weight.dtype == torch.bfloat16:
        normed = normed.to(torch.bfloat16)
    hidden = _gated_residual(residual, layer.mlp(normed), gate)
    return hidden, own


class APTPiMixin:
    """Methods shared by the pi0 and pi0.5 APT models. State lives in ``self.__dict__``:

    - ``_apt_config``: the :class:`AptConfig` in force;
    - ``_apt_task_mask``: ``(B, L)`` task-token mask for the current call, set by the APT policy;
    - ``apt_fusion``: the Stage-2 fusion layers (an ``nn.ModuleList``), absent in Stage 1.
    """

    _apt_uses_state_token: bool = True

    # ------------------------------------------------------------------ configuration
    @property
    def apt_config(self) -> AptConfig:
        return self.__dict__["_apt_config"]

    def _apt_vlm_trains(self) -> bool:
        vlm = self.paligemma_with_expert.paligemma
        return any(p.requires_grad for p in vlm.parameters())

    def _apt_attention(self, reference: Tensor) -> str:
        """The attention kernel in force for tensors like ``reference`` (``auto``: sdpa on CUDA)."""
        choice = self.apt_config.attention
        if choice == "auto":
            return "sdpa" if reference.device.type == "cuda" else "eager"
        return choice

    def _apt_language_tokens(self, lang_masks: Tensor) -> Tensor:
        """(B, L) mask of the prompt tokens to hide: the task text, or the whole prompt."""
        cfg = self.apt_config
        lang_masks = lang_masks.bool()
        if cfg.language_mask_scope == "prompt" or self._apt_uses_state_token:
            # pi0's prompt is the task itself; its state is a separate token.
            return lang_masks
        task = self.__dict__.get("_apt_task_mask")
        if task is None:
            raise LanguageMaskError(
                "pi0.5 puts the discretised state inside the prompt, so APT masks only the task text, "
                "and needs its token span: batch['observation.language.task_mask'] (bool, B x L), which "
                "the apt_pi05 processor adds. Run the batch through make_apt_pi05_pre_post_processors, "
                "or set apt.language_mask_scope='prompt' to hide the whole prompt (state included)."
            )
        task = task.to(lang_masks.device).bool()
        if task.shape != lang_masks.shape:
            raise LanguageMaskError(
                f"observation.language.task_mask has shape {tuple(task.shape)} but the prompt tokens have "
                f"{tuple(lang_masks.shape)}; both must come from the same processor call."
            )
        return task & lang_masks

    # ------------------------------------------------------------------ prefix
    def _apt_prefix(self, images, img_masks, lang_tokens, lang_masks) -> PrefixContext:
        """Run the VLM over the prefix once and return the keys/values the expert reads.

        Language masked (Stage 1, and Stage 2 by default): the visible tokens (images, and pi0.5's
        state tokens) run through the VLM *without* the hidden language tokens, compacted and with
        positions that do not count them. The action path is then exactly independent of the
        instruction, its content and its length, bit for bit (a masked column would still shift
        floating-point summation order). Masking by visibility and dropping from this pass are the
        same function: no visible token may attend to language anyway. The language tokens run only
        when a fusion layer reads them, attending to the visible keys/values and to each other, as in
        the full prefix. Language not masked: one pass over the whole prefix, as LeRobot does.
        """
        hidden_language = self._apt_language_tokens(lang_masks)
        cache = self._apt_prefix_cache()
        if cache is not None:
            return self._apt_cached_prefix(cache, images, img_masks, lang_tokens, lang_masks, hidden_language)
        return self._apt_compute_prefix(images, img_masks, lang_tokens, lang_masks, hidden_language)

    def _apt_compute_prefix(self, images, img_masks, lang_tokens, lang_masks, hidden_language) -> PrefixContext:
        """:meth:`_apt_prefix` without the cache; ``hidden_language``: the (B, L) prompt tokens to hide."""
        cfg = self.apt_config
        with torch.set_grad_enabled(torch.is_grad_enabled() and self._apt_vlm_trains()):
            embs, pad, att = self.embed_prefix(images, img_masks, lang_tokens, lang_masks)
            language = torch.zeros_like(pad)
            language[:, pad.shape[1] - lang_tokens.shape[1] :] = hidden_language
            att_2d = make_att_2d_masks(pad, att)
            lm = self.paligemma_with_expert.paligemma.model.language_model
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

    def _apt_run_vlm(self, lm: nn.Module, embs: Tensor, mask_2d: Tensor, positions: Tensor,
                     context: list[tuple[Tensor, Tensor]] | None = None) -> list[tuple[Tensor, Tensor]]:
        """The VLM layers over ``embs`` (attending ``context`` keys/values first); per-layer K/V."""
        mask4d = prepare_attention_masks_4d(mask_2d)
        cos, sin = lm.rotary_emb(embs, positions)
        attention = self._apt_attention(embs)
        hidden, kv = embs, []
        last = len(lm.layers) - 1
        checkpointing = self.gradient_checkpointing_enabled and self.training and torch.is_grad_enabled()
        for i, layer in enumerate(lm.layers):
            ctx = context[i] if context is not None else None
            if checkpointing and i != last:
                hidden, layer_kv = torch.utils.checkpoint.checkpoint(
                    _layer, layer, hidden, mask4d, cos, sin, None, ctx, False, attention,
                    use_reentrant=False, preserve_rng_state=False,
                )
            else:
                # The last layer feeds the expert through its keys/values only.
                hidden, layer_kv = _layer(layer, hidden, mask4d, cos, sin, None, ctx, kv_only=i == last,
                                          attention=attention)
            kv.append(layer_kv)
        return kv

    # ------------------------------------------------------------------ prefix cache
    def _apt_prefix_cache(self) -> PrefixCache | None:
        """The cache in force for this call: only in training with ``apt.prefix_cache`` set."""
        cfg = self.apt_config
        if cfg.prefix_cache is None or not self.training:
            return None
        if self._apt_vlm_trains():
            raise PrefixCacheError(
                "prefix_cache: some VLM parameters require gradients, so the prefix changes at every step. "
                "Freeze the VLM (apt.vlm_mode='frozen') or unset apt.prefix_cache."
            )
        cache = self.__dict__.get("_apt_prefix_cache_store")
        if cache is None or (cache.location, cache.dtype_name) != (cfg.prefix_cache, cfg.prefix_cache_dtype):
            cache = PrefixCache(cfg.prefix_cache, cfg.prefix_cache_dtype)
            self.__dict__["_apt_prefix_cache_store"] = cache
        return cache

    def _apt_prefix_keys(self, images, img_masks, lang_tokens, lang_masks, hidden_language):
        """Per sample: the image key (for the augmentation guard) and the entry key.

        The entry key covers exactly what the cached passes read: images and their masks, and the
        visible prompt tokens (pi0.5's state); in Stage 2 (or with the mask lifted) the whole prompt,
        because the language pass is cached too. Stage-1 keys never see the hidden instruction.
        """
        cfg = self.apt_config
        compact = cfg.masks_language_in_inherited_layers
        # One transfer per tensor, not per sample (no-ops on CPU).
        images = [i.detach().cpu() for i in images]
        img_masks = [m.detach().cpu().bool() for m in img_masks]
        tokens, masks, hidden = lang_tokens.cpu(), lang_masks.cpu().bool(), hidden_language.cpu().bool()
        layout = ("apt-pi-prefix-1", type(self).__name__, "compact" if compact else "full", cfg.stage,
                  self._apt_attention(lang_tokens))
        frame_keys, keys = [], []
        for b in range(tokens.shape[0]):
            frame = content_key(*(t for img, m in zip(images, img_masks, strict=True) for t in (img[b], m[b])))
            if compact and cfg.stage == 1:
                prompt = (tokens[b][masks[b] & ~hidden[b]],)
            else:
                prompt = (tokens[b], masks[b], hidden[b])
            frame_keys.append(frame)
            keys.append(content_key(*layout, frame, *prompt))
        return frame_keys, keys

    def _apt_cached_prefix(self, cache: PrefixCache, images, img_masks, lang_tokens, lang_masks,
                           hidden_language) -> PrefixContext:
        """:meth:`_apt_compute_prefix` through the cache: only frames not cached yet run the VLM.

        Every result, fresh or cached, is assembled from the stored entries, so a frame gives the
        same prefix in every epoch (with ``prefix_cache_dtype='model'``, the one the uncached pass
        computes).
        """
        vlm = self.paligemma_with_expert.paligemma.model
        namespace = cache.namespace([*vlm.parameters(), *vlm.buffers()])
        frame_keys, keys = self._apt_prefix_keys(images, img_masks, lang_tokens, lang_masks, hidden_language)
        frames = self.__dict__.get("_apt_frame_index")
        if isinstance(frames, Tensor) and frames.numel() == len(keys):
            cache.check_frames(frames.reshape(-1).tolist(), frame_keys)
        entries = [cache.get(namespace, key) for key in keys]
        missing = [b for b, entry in enumerate(entries) if entry is None]
        compact = self.apt_config.masks_language_in_inherited_layers
        if missing:
            if len(missing) == len(keys):
                fresh = self._apt_compute_prefix(images, img_masks, lang_tokens, lang_masks, hidden_language)
            else:
                idx = torch.tensor(missing, device=lang_tokens.device)
                fresh = self._apt_compute_prefix([i[idx] for i in images], [m[idx] for m in img_masks],
                                                 lang_tokens[idx], lang_masks[idx], hidden_language[idx])
            for b, entry in zip(missing, _prefix_entries(fresh, compact), strict=True):
                entries[b] = cache.put(namespace, keys[b], entry)
        lm = vlm.language_model
        return _assemble_prefix(entries, compact, lang_tokens.device, lm.layers[0].self_attn.k_proj.weight.dtype)

    # ------------------------------------------------------------------ suffix
    def _apt_suffix_embed(self, state, x_t, timestep):
        return self.embed_suffix(state, x_t, timestep)

    def _apt_velocity(self, prefix: PrefixContext, state, x_t: Tensor, timestep: Tensor) -> Tensor:
        """One evaluation of the action expert (with fusion in Stage 2): the flow velocity."""
        cfg = self.apt_config
        embs, pad, att, adarms = self._apt_suffix_embed(state, x_t, timestep)
        expert = self.paligemma_with_expert.gemma_expert.model
        if expert.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16:
            embs = embs.to(torch.bfloat16)
        bsz, seq = pad.shape
        visible = prefix.visible[:, None, :].expand(bsz, seq, prefix.visible.shape[1])
        mask4d = prepare_attention_masks_4d(torch.cat([visible, make_att_2d_masks(pad, att)], dim=2))
        positions = prefix.offset[:, None] + torch.cumsum(pad, dim=1) - 1
        cos, sin = expert.rotary_emb(embs, positions)
        attention = self._apt_attention(embs)
        fusion = self._modules.get("apt_fusion")
        sources = self.__dict__.get("_apt_fusion_sources")
        if fusion is not None:
            fusion_kv, fusion_valid = self._apt_fusion_context(prefix)
            fusion_mask = fusion_valid[:, None, :].expand(bsz, seq, fusion_valid.shape[1])

        def rotate(q: Tensor) -> Tensor:
            return (q * cos.unsqueeze(1)) + (modeling_gemma.rotate_half(q) * sin.unsqueeze(1))

        def block(hidden: Tensor, i: int) -> Tensor:
            hidden, _ = _layer(expert.layers[i], hidden, mask4d, cos, sin, adarms, context=prefix.visible_kv[i],
                               attention=attention)
            if fusion is not None:
                keys, values = fusion_kv[sources[i]]
                hidden = fusion[i](hidden, keys, values, fusion_mask, rotate_queries=rotate)
            return hidden

        hidden = embs
        checkpointing = self.gradient_checkpointing_enabled and self.training and torch.is_grad_enabled()
        for i in range(len(expert.layers)):
            if checkpointing:
                hidden = torch.utils.checkpoint.checkpoint(block, hidden, i, use_reentrant=False, preserve_rng_state=False)
            else:
                hidden = block(hidden, i)
        hidden, _ = layernorm_forward(expert.norm, hidden, adarms)
        out = hidden[:, -self.config.chunk_size :].to(torch.float32)
        return self.action_out_proj(out)

    def _apt_fusion_context(self, prefix: PrefixContext):
        """Per-layer keys/values the fusion layers read, and their validity (all VL tokens or language).

        Computed once per prefix: sampling evaluates the expert ``num_inference_steps`` times on it.
        """
        if prefix.fusion is None:
            prefix.fusion = self._apt_build_fusion_context(prefix)
        return prefix.fusion

    def _apt_build_fusion_context(self, prefix: PrefixContext):
        only_language = self.apt_config.fusion_context == "language"
        if prefix.language_kv is None:  # language mask lifted: everything is in the visible pass
            valid = prefix.visible & prefix.visible_is_language if only_language else prefix.visible
            return prefix.visible_kv, valid
        if only_language:
            return prefix.language_kv, prefix.language
        kv = [(torch.cat([vk, lk], dim=2), torch.cat([vv, lv], dim=2))
              for (vk, vv), (lk, lv) in zip(prefix.visible_kv, prefix.language_kv, strict=True)]
        return kv, torch.cat([prefix.visible, prefix.language], dim=1)

    # ------------------------------------------------------------------ host entry points
    def _apt_loss(self, images, img_masks, lang_tokens, lang_masks, state, actions, noise, time) -> Tensor:
        t = time[:, None, None]
        x_t = t * noise + (1 - t) * actions
        u_t = noise - actions
        prefix = self._apt_prefix(images, img_masks, lang_tokens, lang_masks)
        v_t = self._apt_velocity(prefix, state, x_t, time)
        return F.mse_loss(u_t, v_t, reduction="none")

    def _apt_sample(self, images, img_masks, lang_tokens, lang_masks, state, noise, num_steps, **kwargs) -> Tensor:
        num_steps = num_steps if num_steps is not None else self.config.num_inference_steps
        bsize = lang_tokens.shape[0]
        if noise is None:
            shape = (bsize, self.config.chunk_size, self.config.max_action_dim)
            noise = self.sample_noise(shape, lang_tokens.device)
        prefix = self._apt_prefix(images, img_masks, lang_tokens, lang_masks)
        return euler_integrate(
            lambda x_t, timestep: self.denoise_step(
                state=state, prefix_pad_masks=prefix.visible, past_key_values=prefix, x_t=x_t, timestep=timestep
            ),
            noise,
            num_steps,
            rtc_processor=self.rtc_processor,
            rtc_enabled=self._rtc_enabled(),
            inference_delay=kwargs.get("inference_delay"),
            prev_chunk_left_over=kwargs.get("prev_chunk_left_over"),
            execution_horizon=kwargs.get("execution_horizon"),
        )

    def denoise_step(self, state, prefix_pad_masks, past_key_values, x_t, timestep):
        """One denoising step against a prefix computed by APT (same masking as training).

        ``past_key_values`` must be the :class:`PrefixContext` that ``sample_actions`` built: a plain
        ``DynamicCache`` lacks the language mask, and guessing it would silently leak language.
        """
        if not isinstance(past_key_values, PrefixContext):
            raise LanguageMaskError(
                "APT denoise_step needs the PrefixContext built by sample_actions (it carries the "
                "language-visibility mask); a plain DynamicCache from the stock prefix prefill has none. "
                "Call policy.predict_action_chunk / model.sample_actions instead."
            )
        return self._apt_velocity(past_key_values, state, x_t, timestep)


def _prefix_entries(prefix: PrefixContext, compact: bool) -> list[dict[str, Tensor]]:
    """Split a batch's prefix into one cache entry per sample (only its valid slots when compacted)."""
    def stacked(kv):
        return torch.stack([k for k, _ in kv], dim=1), torch.stack([v for _, v in kv], dim=1)  # (B, layers, KV, M, D)

    vk, vv = stacked(prefix.visible_kv)
    lk, lv = stacked(prefix.language_kv) if prefix.language_kv is not None else (None, None)
    entries = []
    for b in range(vk.shape[0]):
        if not compact:  # one full pass at the stock layout: every slot, with its validity
            entries.append({"visible_k": vk[b], "visible_v": vv[b], "visible": prefix.visible[b],
                            "visible_is_language": prefix.visible_is_language[b]})
            continue
        n = int(prefix.visible[b].sum())  # compacted: the valid tokens come first
        entry = {"visible_k": vk[b, :, :, :n], "visible_v": vv[b, :, :, :n]}
        if lk is not None:
            m = int(prefix.language[b].sum())
            entry.update(language_k=lk[b, :, :, :m], language_v=lv[b, :, :, :m])
        entries.append(entry)
    return entries


def _assemble_prefix(entries: list[dict[str, Tensor]], compact: bool, device: Any, dtype: torch.dtype) -> PrefixContext:
    """The batch :class:`PrefixContext` of per-sample entries, laid out as the uncached pass lays it out.

    Compacted slots beyond a sample's valid tokens hold zeros where the uncached pass holds values of
    padding rows; both are masked with a finite negative, so their softmax weight is exactly 0.
    """
    def batch(name: str, width: int) -> Tensor:
        rows = [F.pad(e[name], (0, 0, 0, width - e[name].shape[2])) for e in entries]
        return torch.stack(rows).to(device=device, dtype=dtype)

    def per_layer(k: Tensor, v: Tensor) -> list[tuple[Tensor, Tensor]]:
        return [(k[:, i], v[:, i]) for i in range(k.shape[1])]

    def valid(counts: list[int], width: int) -> Tensor:
        return torch.arange(width, device=device)[None, :] < torch.tensor(counts, device=device)[:, None]

    if not compact:
        visible = torch.stack([e["visible"] for e in entries]).to(device)
        width = visible.shape[1]
        return PrefixContext(visible=visible, visible_kv=per_layer(batch("visible_k", width), batch("visible_v", width)),
                             visible_is_language=torch.stack([e["visible_is_language"] for e in entries]).to(device),
                             offset=visible.sum(dim=-1))
    counts = [e["visible_k"].shape[2] for e in entries]
    width = max(1, *counts)  # as _split: one (invalid) slot when nothing is visible
    visible = valid(counts, width)
    prefix = PrefixContext(visible=visible, visible_kv=per_layer(batch("visible_k", width), batch("visible_v", width)),
                           visible_is_language=torch.zeros_like(visible), offset=visible.sum(dim=-1))
    if "language_k" in entries[0]:
        counts = [e["language_k"].shape[2] for e in entries]
        width = max(1, *counts)
        prefix.language = valid(counts, width)
        prefix.language_kv = per_layer(batch("language_k", width), batch("language_v", width))
    return prefix


def prefix_cache_of(model: nn.Module) -> PrefixCache | None:
    """The :class:`~apt_plugins.PrefixCache` an APT pi model has used so far (None before the first use)."""
    return model.__dict__.get("_apt_prefix_cache_store")


class APTPI0Pytorch(APTPiMixin, PI0Pytorch):
    """``PI0Pytorch`` with APT stages (installed on an existing instance by class swap)."""

    _apt_uses_state_token = True

    def forward(self, images, img_masks, lang_tokens, lang_masks, state, actions, noise, time) -> Tensor:
        return self._apt_loss(images, img_masks, lang_tokens, lang_masks, state, actions, noise, time)

    @torch.no_grad()
    def sample_actions(self, images, img_masks, lang_tokens, lang_masks, state, noise=None, num_steps=None, **kwargs):
        return self._apt_sample(images, img_masks, lang_tokens, lang_masks, state, noise, num_steps, **kwargs)


class APTPI05Pytorch(APTPiMixin, PI05Pytorch):
    """``PI05Pytorch`` with APT stages; the state lives in the prompt, so only the task text is masked."""

    _apt_uses_state_token = False

    def _apt_suffix_embed(self, state, x_t, timestep):
        return self.embed_suffix(x_t, timestep)

    def forward(self, images, img_masks, tokens, masks, actions, noise, time) -> Tensor:
        return self._apt_loss(images, img_masks, tokens, masks, None, actions, noise, time)

    @torch.no_grad()
    def sample_actions(self, images, img_masks, tokens, masks, noise=None, num_steps=None, **kwargs):
        return self._apt_sample(images, img_masks, tokens, masks, None, noise, num_steps, **kwargs)


_SWAPS = {PI0Pytorch: APTPI0Pytorch, PI05Pytorch: APTPI05Pytorch}


def install(model: nn.Module, config: AptConfig) -> None:
    """Swap ``model`` (a PI0Pytorch/PI05Pytorch) to its APT class and add the Stage-2 fusion layers."""
    from apt_plugins import AptConfigError

    if getattr(model.config, "compile_model", False):
        raise AptConfigError(
            "policy.compile_model", True,
            "torch.compile stores compiled copies of forward/sample_actions at construction, which would bypass "
            "the APT masks. Set compile_model=false (compile after preparing the stage if needed).",
        )
    if not isinstance(model, tuple(_SWAPS.values())):
        base = next(b for b in _SWAPS if type(model) is b)
        model.__class__ = _SWAPS[base]
    model.__dict__["_apt_config"] = config
    if config.stage != 2:
        return
    pwe = model.paligemma_with_expert
    vlm_layers = len(pwe.paligemma.model.language_model.layers)
    expert_layers = pwe.gemma_expert.model.layers
    sources = list(config.fusion_source_layers) if config.fusion_source_layers is not None else list(
        range(len(expert_layers))
    )
    if len(sources) != len(expert_layers) or any(s >= vlm_layers for s in sources):
        raise AptConfigError(
            "apt.fusion_source_layers", config.fusion_source_layers,
            f"give one VLM layer index in [0, {vlm_layers - 1}] per expert layer ({len(expert_layers)} entries), "
            "or leave it unset for the layer-aligned default.",
        )
    model.__dict__["_apt_fusion_sources"] = sources
    if "apt_fusion" in model._modules:
        return
    attn = expert_layers[0].self_attn
    ref = attn.q_proj.weight
    width = expert_layers[0].input_layernorm.dim
    layers = nn.ModuleList(
        GatedCrossAttention(
            width,
            attn.config.num_attention_heads,
            attn.head_dim,
            gate_granularity=config.gate_granularity,
            gate_init_logit=config.gate_init_logit,
            zero_init=config.fusion_zero_init,
        )
        for _ in expert_layers
    )
    model.apt_fusion = layers.to(device=ref.device, dtype=torch.float32)


def fusion_layers(model: nn.Module) -> Any:
    """The Stage-2 fusion layers of an APT pi model, or None in Stage 1."""
    return model._modules.get("apt_fusion")


@contextlib.contextmanager
def bind_batch_inputs(model: nn.Module, batch: dict[str, Any]):
    """Hand one call's per-batch inputs to the model: the pi0.5 task mask and LeRobot's frame ``index``.

    The frame index lets the prefix cache notice a frame whose images changed (augmentation).
    """
    model.__dict__["_apt_frame_index"] = batch.get("index")
    try:
        with bind_task_mask(model, batch.get("observation.language.task_mask")):
            yield
    finally:
        model.__dict__.pop("_apt_frame_index", None)


@contextlib.contextmanager
def bind_task_mask(model: nn.Module, task_mask: Tensor | None):
    """Make the batch's task-token mask visible to the model for one call (pi0.5 task-span masking)."""
    model.__dict__["_apt_task_mask"] = task_mask
    try:
        yield
    finally:
        model.__dict__.pop("_apt_task_mask", None)
