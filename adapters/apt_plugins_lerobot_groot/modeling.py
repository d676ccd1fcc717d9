"""APT forward passes for LeRobot's GR00T N1.7 (``GR00TN17``, installed by class swap).

Where language reaches GR00T's action tokens, and what APT does about each path:

1. **Backbone (Qwen3-VL).** Images precede the text in the one chat message and the LM is causal,
   so image tokens never see the instruction; the instruction tokens see the images. With the
   language mask in force the backbone runs on the *visible* tokens only: every valid token up to
   and including the last image / ``<|vision_end|>`` token (the chat header, vision markers and
   image tokens), compacted to the left, in order. Everything after it (the instruction and the
   closing template) is *language*. Without the language tokens in the tensor at all, the action
   path is independent of the instruction, its content and its length, bit for bit (a masked
   column would still change shapes and floating-point summation order).
2. **``vl_self_attention``** (stock: no mask, mixes every token, padding included): runs over the
   visible tokens only, with the padding of the compacted batch masked out as keys.
3. **DiT cross-attention blocks.** Image blocks read the visible image tokens. Text blocks (stock:
   every valid non-image token, i.e. the instruction) read the visible *non-image* tokens: the chat
   header and vision markers, which carry no instruction. A sample with no such token falls back to
   all its visible tokens, so no attention row is ever left without a valid key (no NaN, no
   kernel-dependent all-masked rows). Plain ``DiT`` (``use_alternate_vl_dit=False``) reads all
   visible tokens.
4. **Stage 2.** After every DiT block a gated cross-attention (:class:`GrootFusionLayer`) reads the
   language tokens (``fusion_context='language'``) or every VL token (``'all'``) of the stock
   prompt (after ``vlln``). These are not a second full backbone pass: the visible pass (exactly the
   Stage-1 one) runs with a KV cache, then only the language tokens run through the language model
   against that cache, with the (m)RoPE position ids the full prompt gives them and a causal mask
   over the valid visible and earlier language tokens. The vision tower runs once; a causal LM gives
   the full-pass language features up to rounding. Its output projection is zero-initialised, so
   Stage 2 at step 0 is Stage 1 bit for bit. The inherited blocks keep the masks above unless
   ``inherited_layers_keep_language_mask=False``, which restores the stock paths exactly.

Training (``forward``) and inference (``get_action``) share :meth:`APTGR00TN17._apt_context` and
:func:`_apt_dit`, so the masking is identical in both. The frozen backbone runs without autograd.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from lerobot.policies.groot.action_head.cross_attention_dit import AlternateVLDiT
from lerobot.policies.groot.groot_n1_7 import GR00TN17
from torch import Tensor, nn
from transformers.cache_utils import DynamicCache
from transformers.feature_extraction_utils import BatchFeature

from apt_plugins import AptConfig, AptConfigError, GatedCrossAttention, LanguageMaskError, gather_tokens, visible_first

__all__ = ["APTGR00TN17", "GrootFusionLayer", "VLContext", "install", "fusion_layers", "language_tokens"]

_OPTIONAL_BACKBONE_KEYS = ("pixel_values_videos", "video_grid_thw")


@dataclass
class VLContext:
    """What the action head reads from the VL side for one call.

    ``features``/``valid``/``image`` feed the inherited DiT blocks (the visible tokens under the
    language mask, else the stock full sequence); ``fusion_*`` feed the Stage-2 fusion layers.
    """

    features: Tensor  # (B, M, D) after vlln (+ vl_self_attention)
    valid: Tensor  # (B, M) valid tokens
    image: Tensor  # (B, M) image tokens among them
    masked: bool  # the language mask is in force
    fusion_features: Tensor | None = None  # (B, P, D)
    fusion_valid: Tensor | None = None  # (B, P)


class GrootFusionLayer(nn.Module):
    """A gated cross-attention from the DiT's action stream to VL features.

    GR00T's VL side is one feature tensor (not per-layer keys/values as in pi0), so the layer owns
    its key/value projections; the query/gate/zero-initialised output are a
    :class:`~apt_plugins.GatedCrossAttention`.
    """

    def __init__(self, query_dim: int, context_dim: int, num_heads: int, head_dim: int, config: AptConfig):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        self.k_proj = nn.Linear(context_dim, num_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(context_dim, num_heads * head_dim, bias=False)
        self.attn = GatedCrossAttention(query_dim, num_heads, head_dim, gate_granularity=config.gate_granularity,
                                        gate_init_logit=config.gate_init_logit, zero_init=config.fusion_zero_init)

    def gate(self) -> Tensor:
        """The current gate value ``sigmoid(logit)``."""
        return self.attn.gate()

    def forward(self, x: Tensor, context: Tensor, valid: Tensor) -> Tensor:
        """``x`` (B, S, query_dim) plus the gated read of ``context`` (B, P, context_dim) where ``valid``."""
        bsz, length = context.shape[:2]
        context = context.to(self.k_proj.weight.dtype)
        k = self.k_proj(context).view(bsz, length, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(context).view(bsz, length, self.num_heads, self.head_dim).transpose(1, 2)
        mask = valid[:, None, :].expand(bsz, x.shape[1], length)
        return self.attn(x, k, v, mask)


#: Attribute of the action head holding per-row seeds while ``GrootAdapter.seeded_noise`` is active.
ROW_SEEDS = "apt_row_seeds"


def _row_draw(head: nn.Module, kind: str, draw: Any, shape: tuple[int, ...], device: Any, dtype: Any) -> Tensor:
    """``draw(shape)`` (torch.rand/randn), or, under seeded noise, one row per seed from its own generator."""
    seeds = head.__dict__.get(ROW_SEEDS)
    if seeds is None:
        return draw(shape, device=device, dtype=dtype)
    offset = {"noise": 17, "state_dropout": 29}[kind]
    rows = [draw((1, *shape[1:]), generator=torch.Generator().manual_seed(1_000_003 * s + offset)) for s in seeds]
    return torch.cat(rows).to(device=device, dtype=dtype)


def language_tokens(input_ids: Tensor, valid: Tensor, image_token_id: int, vision_end_id: int | None) -> Tensor:
    """(B, T) mask of the language tokens: valid tokens after the last image / vision-end token.

    The groot processor puts every image first and the text last in one user message, so this is
    the instruction plus the closing chat template; the header and vision markers before it carry
    no instruction. Raises :class:`LanguageMaskError` for a sample without an image token.
    """
    marker = (input_ids == image_token_id) & valid
    if not bool(marker.any(dim=1).all()):
        raise LanguageMaskError(
            "APT for GR00T finds the instruction as the text after the images, but a sample has no image "
            "token: feed at least one camera through the groot processor (images first, then the text)."
        )
    if vision_end_id is not None:
        marker = marker | ((input_ids == vision_end_id) & valid)
    positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    last = torch.where(marker, positions, torch.full_like(positions, -1)).max(dim=1, keepdim=True).values
    return valid & (positions > last)


def _run_block(block: nn.Module, hidden: Tensor, encoder: Tensor | None, mask: Tensor | None, temb: Tensor,
               fusion: nn.Module | None, fusion_features: Tensor | None, fusion_valid: Tensor | None) -> Tensor:
    hidden = block(hidden, attention_mask=None, encoder_hidden_states=encoder, encoder_attention_mask=mask, temb=temb)
    if fusion is not None:
        hidden = fusion(hidden, fusion_features, fusion_valid)
    return hidden


def _apt_dit(dit: nn.Module, hidden: Tensor, ctx: VLContext, timestep: Tensor, fusion: nn.ModuleList | None) -> Tensor:
    """The DiT (``AlternateVLDiT`` or ``DiT``) with APT masks and fusion; mirrors the stock forward op for op."""
    temb = dit.timestep_encoder(timestep)
    hidden = hidden.contiguous()
    encoder = ctx.features.contiguous()
    interleave = dit.config.interleave_self_attention
    if isinstance(dit, AlternateVLDiT):
        image_mask = ctx.image & ctx.valid
        text_mask = (~ctx.image) & ctx.valid
        if ctx.masked:
            # A sample whose visible tokens are all images reads them all in the text blocks: no row
            # without a valid key (an all-masked softmax is NaN or kernel-dependent).
            text_mask = torch.where(text_mask.any(dim=1, keepdim=True), text_mask, ctx.valid)
        every = 2 * dit.attend_text_every_n_blocks
        if not interleave:
            raise ValueError("AlternateVLDiT requires interleave_self_attention=True.")
    plain_mask = ctx.valid if ctx.masked else None  # stock DiT reads everything, padding included
    checkpointing = getattr(dit, "gradient_checkpointing", False) and dit.training and torch.is_grad_enabled()
    for idx, block in enumerate(dit.transformer_blocks):
        if idx % 2 == 1 and interleave:
            encoder_i, mask_i = None, None
        elif isinstance(dit, AlternateVLDiT):
            encoder_i, mask_i = encoder, (text_mask if idx % every == 0 else image_mask)
        else:
            encoder_i, mask_i = encoder, plain_mask
        layer = fusion[idx] if fusion is not None else None
        args = (block, hidden, encoder_i, mask_i, temb, layer, ctx.fusion_features, ctx.fusion_valid)
        if checkpointing:
            hidden = torch.utils.checkpoint.checkpoint(_run_block, *args, use_reentrant=False)
        else:
            hidden = _run_block(*args)
    shift, scale = dit.proj_out_1(F.silu(temb)).chunk(2, dim=1)
    hidden = dit.norm_out(hidden) * (1 + scale[:, None]) + shift[:, None]
    return dit.proj_out_2(hidden)


def _masked_self_attention(module: nn.Module, hidden: Tensor, valid: Tensor) -> Tensor:
    """``vl_self_attention`` with the invalid (padding) keys masked out; Identity passes through."""
    blocks = getattr(module, "transformer_blocks", None)
    if blocks is None:
        return module(hidden)
    hidden = hidden.contiguous()
    for block in blocks:
        hidden = block(hidden, attention_mask=valid)
    return hidden


class APTGR00TN17(GR00TN17):
    """``GR00TN17`` with APT stages (installed on an existing instance by class swap).

    State lives in ``self.__dict__["_apt_config"]``; the Stage-2 fusion layers are
    ``self.action_head.apt_fusion`` (one per DiT block).
    """

    @property
    def apt_config(self) -> AptConfig:
        return self.__dict__["_apt_config"]

    # ------------------------------------------------------------------ VL side
    def _apt_backbone_grad(self) -> bool:
        return torch.is_grad_enabled() and any(p.requires_grad for p in self.backbone.parameters())

    def _apt_backbone(self, inputs: dict[str, Any], cache: DynamicCache | None = None) -> Tensor:
        """The stock backbone forward; with ``cache`` the same computation, keeping the LM's keys/values."""
        backbone = self.backbone
        with torch.set_grad_enabled(self._apt_backbone_grad()):
            if cache is None:
                return backbone(BatchFeature(data=inputs))["backbone_features"]
            # ``Qwen3Backbone.forward`` op for op (the LM builds a DynamicCache of its own when
            # ``use_cache`` is on, so passing one changes nothing but who holds it).
            backbone.set_frozen_modules_to_eval_mode()
            model_input = dict(inputs)
            backbone._ensure_mm_token_type_ids(model_input)
            backbone._ensure_legacy_qwen3_position_ids(model_input)
            model_input["past_key_values"] = cache
            return backbone._last_decoder_layer_output(model_input)

    def _apt_can_continue(self) -> bool:
        """Whether the language tokens can run as a KV-cache continuation of the visible pass.

        Not under gradient checkpointing of a training LM (transformers drops the cache there) nor
        without Qwen3-VL's ``compute_3d_position_ids``; the full prompt is run instead.
        """
        backbone = self.backbone
        lm = backbone.language_model
        qwen = getattr(backbone.model, "model", backbone.model)
        if getattr(qwen, "compute_3d_position_ids", None) is None:
            return False
        return not (lm.training and any(getattr(layer, "gradient_checkpointing", False) for layer in lm.layers))

    def _apt_language_continuation(self, base: dict[str, Any], language: Tensor, visible_valid: Tensor,
                                   cache: DynamicCache) -> tuple[Tensor, Tensor]:
        """Backbone features (select_layer, before the final norm) of the language tokens, compacted to
        the left, computed against the visible pass's ``cache``; and their validity.

        Position ids: those of the full prompt (``_ensure_legacy_qwen3_position_ids`` over the full
        ``input_ids``, as the stock pass computes them), taken at the language tokens. Mask: a query
        sees the valid visible tokens (``visible_valid``, the cache's columns) and the valid language
        tokens up to itself (the cache offset makes the 2D mask causal over the language block).
        """
        backbone = self.backbone
        lm = backbone.language_model
        qwen = getattr(backbone.model, "model", backbone.model)
        full = dict(base)
        backbone._ensure_mm_token_type_ids(full)
        backbone._ensure_legacy_qwen3_position_ids(full)
        positions = full["position_ids"]  # (4, B, T): text row + t/h/w rows
        index, keep = visible_first(language)
        ids = torch.where(keep, gather_tokens(base["input_ids"], index), torch.zeros_like(index))
        positions = positions.gather(2, index[None].expand(positions.shape[0], -1, -1).to(positions.device))
        mask = torch.cat((visible_valid, keep), dim=1).long()
        captured: dict[str, Tensor] = {}

        def capture(_module: nn.Module, _inputs: Any, output: Any) -> None:
            captured["features"] = output if isinstance(output, Tensor) else output[0]

        hook = lm.layers[-1].register_forward_hook(capture)
        try:
            with torch.set_grad_enabled(self._apt_backbone_grad()):
                lm(input_ids=None, inputs_embeds=qwen.get_input_embeddings()(ids), attention_mask=mask,
                   position_ids=positions, past_key_values=cache, use_cache=True)
        finally:
            hook.remove()
        return captured["features"], keep

    def _apt_context(self, backbone_inputs: dict[str, Any]) -> VLContext:
        """Run the VL side once for this call (see the module docstring for the masking)."""
        cfg = self.apt_config
        head = self.action_head
        qwen_config = self.backbone.model.config
        ids = backbone_inputs["input_ids"]
        valid = backbone_inputs["attention_mask"] == 1
        image = (ids == qwen_config.image_token_id) & valid
        language = language_tokens(ids, valid, qwen_config.image_token_id,
                                   getattr(qwen_config, "vision_end_token_id", None))
        fusion = head._modules.get("apt_fusion")
        only_language = cfg.fusion_context == "language"
        base = {k: backbone_inputs[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")}
        base.update({k: backbone_inputs[k] for k in _OPTIONAL_BACKBONE_KEYS if k in backbone_inputs})
        if not cfg.masks_language_in_inherited_layers:
            full = head.vlln(self._apt_backbone(dict(base, **{
                k: backbone_inputs[k] for k in ("mm_token_type_ids",) if k in backbone_inputs})))
            ctx = VLContext(head.vl_self_attention(full), valid, image, masked=False)
            if fusion is not None:
                ctx.fusion_features, ctx.fusion_valid = full, (valid & language) if only_language else valid
            return ctx
        index, keep = visible_first(valid & ~language)
        # Invalid slots of the compacted batch must not hold image/video ids (the VLM counts them).
        fill = torch.zeros_like(ids[:, :1]).expand(-1, index.shape[1])
        compact = dict(base, input_ids=torch.where(keep, gather_tokens(ids, index), fill), attention_mask=keep.long())
        continued = fusion is not None and self._apt_can_continue()
        cache = DynamicCache(config=self.backbone.language_model.config) if continued else None
        visible = head.vlln(self._apt_backbone(compact, cache=cache))
        features = _masked_self_attention(head.vl_self_attention, visible, keep)
        ctx = VLContext(features, keep, gather_tokens(image, index) & keep, masked=True)
        if continued:
            types = {k: backbone_inputs[k] for k in ("mm_token_type_ids",) if k in backbone_inputs}
            lang, lang_valid = self._apt_language_continuation(dict(base, **types), language, keep, cache)
            lang = head.vlln(lang)
            if only_language:
                ctx.fusion_features, ctx.fusion_valid = lang, lang_valid
            else:  # every VL token: the visible ones (this pass) and the language ones (order is immaterial)
                ctx.fusion_features = torch.cat((visible, lang), dim=1)
                ctx.fusion_valid = torch.cat((keep, lang_valid), dim=1)
        elif fusion is not None:
            full = head.vlln(self._apt_backbone(base))
            ctx.fusion_features, ctx.fusion_valid = full, (valid & language) if only_language else valid
        return ctx

    # ------------------------------------------------------------------ host entry points
    def forward(self, inputs: dict[str, Any]) -> BatchFeature:
        """Training loss; the stock ``GR00TN17ActionHead.forward`` with the APT VL context and DiT."""
        backbone_inputs, action_input = self.prepare_input(inputs)
        self.backbone.set_frozen_modules_to_eval_mode()
        head = self.action_head
        head.set_frozen_modules_to_eval_mode()
        ctx = self._apt_context(backbone_inputs)
        embodiment_id = action_input.embodiment_id
        if action_input.state.shape[1] != head.config.state_history_length:
            raise ValueError("state history length does not match GR00T N1.7 config.")
        state = action_input.state.view(action_input.state.shape[0], 1, -1)
        state_features = head.state_encoder(state, embodiment_id)
        if head.training and head.state_dropout_prob > 0:
            drop = _row_draw(head, "state_dropout", torch.rand, (state_features.shape[0],), state_features.device,
                             state_features.dtype) < head.state_dropout_prob
            state_features = state_features * (1 - drop[:, None, None].to(dtype=state_features.dtype))
        actions = action_input.action
        noise = _row_draw(head, "noise", torch.randn, actions.shape, actions.device, actions.dtype)
        t = head.sample_time(actions.shape[0], device=actions.device, dtype=actions.dtype)[:, None, None]
        noisy = (1 - t) * noise + t * actions
        velocity = actions - noise
        t_discretized = (t[:, 0, 0] * head.num_timestep_buckets).long()
        sa_embs = torch.cat((state_features, self._apt_action_features(noisy, t_discretized, embodiment_id)), dim=1)
        model_output = _apt_dit(head.model, sa_embs, ctx, t_discretized, head._modules.get("apt_fusion"))
        pred_actions = head.action_decoder(model_output, embodiment_id)[:, -actions.shape[1]:]
        action_mask = action_input.action_mask
        action_loss = F.mse_loss(pred_actions, velocity, reduction="none") * action_mask
        loss = action_loss.sum() / (action_mask.sum() + 1e-6)
        return BatchFeature(data={"loss": loss, "action_loss": action_loss, "action_mask": action_mask,
                                  "backbone_features": ctx.features, "state_features": state_features})

    def _apt_action_features(self, actions: Tensor, timesteps: Tensor, embodiment_id: Tensor) -> Tensor:
        head = self.action_head
        features = head.action_encoder(actions, timesteps, embodiment_id)
        if head.config.add_pos_embed:
            pos_ids = torch.arange(features.shape[1], dtype=torch.long, device=features.device)
            features = features + head.position_embedding(pos_ids).unsqueeze(0)
        return features

    @torch.no_grad()
    def get_action(self, inputs: dict[str, Any], options: dict[str, Any] | None = None) -> BatchFeature:
        """Euler sampling (``get_action_with_features``, RTC overlap included) with the APT masks."""
        backbone_inputs, action_input = self.prepare_input(inputs)
        head = self.action_head
        ctx = self._apt_context(backbone_inputs)
        state = action_input.state
        if state.shape[1] != head.config.state_history_length:
            raise ValueError("state history length does not match GR00T N1.7 config.")
        embodiment_id = action_input.embodiment_id
        state_features = head.state_encoder(state.view(state.shape[0], 1, -1), embodiment_id)
        vl = ctx.features
        batch_size, device = vl.shape[0], vl.device
        actions = torch.randn(size=(batch_size, head.config.action_horizon, head.action_dim), dtype=vl.dtype,
                              device=device)
        dt = 1.0 / head.num_inference_timesteps
        strength = torch.ones_like(actions)
        if "action" in action_input:
            if options is None:
                raise ValueError("RTC options are required when action is provided to get_action.")
            before = options["action_horizon"]
            overlap, frozen = options["rtc_overlap_steps"], options["rtc_frozen_steps"]
            actions[:, :overlap, :] = action_input["action"][:, before - overlap: before, :]
            strength[:, :frozen, :] = 0.0
            t = torch.linspace(0.0, 1.0, overlap - frozen + 2, device=device)
            ramp = 1 - torch.exp(-options["rtc_ramp_rate"] * t)
            ramp = ramp / ramp[-1].clamp_min(1e-8)
            strength[:, frozen:overlap, :] = ramp[1:-1][None, :, None].to(device)
        fusion = head._modules.get("apt_fusion")
        for step in range(head.num_inference_timesteps):
            t_discretized = int(step / float(head.num_inference_timesteps) * head.num_timestep_buckets)
            timesteps = torch.full(size=(batch_size,), fill_value=t_discretized, device=device)
            sa_embs = torch.cat((state_features, self._apt_action_features(actions, timesteps, embodiment_id)), dim=1)
            model_output = _apt_dit(head.model, sa_embs, ctx, timesteps, fusion)
            pred = head.action_decoder(model_output, embodiment_id)
            actions = actions + dt * pred[:, -head.action_horizon:] * strength
        return BatchFeature(data={"action_pred": actions, "backbone_features": vl, "state_features": state_features})


def install(model: nn.Module, config: AptConfig) -> None:
    """Swap ``model`` (a ``GR00TN17``) to :class:`APTGR00TN17` and add the Stage-2 fusion layers.

    Called after ``GR00TN17.from_pretrained`` has returned (``AptPolicyMixin`` prepares the stage
    after the host constructor), so the transformers loader never sees, and never re-initialises,
    the fusion layers; they are initialised here, explicitly.
    """
    if config.fusion_source_layers is not None:
        raise AptConfigError(
            "apt.fusion_source_layers", config.fusion_source_layers,
            "GR00T's DiT reads one VL feature tensor (the selected backbone layer), so there is no per-layer "
            "source to choose; leave it unset.",
        )
    if not isinstance(model, APTGR00TN17):
        if type(model) is not GR00TN17:
            raise AptConfigError("policy", type(model).__name__, "the GR00T adapter handles GR00TN17 models only.")
        model.__class__ = APTGR00TN17
    model.__dict__["_apt_config"] = config
    head = model.action_head
    if config.stage != 2 or "apt_fusion" in head._modules:
        return
    dit = head.model
    ref = next(dit.parameters())
    layers = nn.ModuleList(
        GrootFusionLayer(dit.inner_dim, model.config.backbone_embedding_dim, dit.config.num_attention_heads,
                         dit.config.attention_head_dim, config)
        for _ in dit.transformer_blocks
    )
    head.apt_fusion = layers.to(device=ref.device, dtype=torch.float32)


def fusion_layers(model: nn.Module) -> Any:
    """The Stage-2 fusion layers of an APT GR00T model, or None in Stage 1."""
    return model.action_head._modules.get("apt_fusion")
