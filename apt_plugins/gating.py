"""Gated fusion building blocks (torch). Adapters compose these into their Stage-2 layers.

A fusion layer adds ``sigmoid(gate) * o_proj(cross_attention(norm(x), context))`` to the action
stream. With ``o_proj`` zero-initialised the added term is exactly zero at step 0 (a closed
layer), so a Stage-2 model computes the Stage-1 function bit for bit until training opens it.
The sigmoid alone never reaches 0, which is why the zero-initialised projection is the default.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

__all__ = ["SigmoidGate", "RMSNorm", "GatedCrossAttention", "ATTENTION_MASK_VALUE"]

#: Additive mask value for hidden keys. Finite, so a row with every key hidden stays finite
#: (uniform attention) instead of NaN; the same convention as openpi and LeRobot's pi0.
ATTENTION_MASK_VALUE = -2.3819763e38


class SigmoidGate(nn.Module):
    """A learnable gate ``sigmoid(logit)``, one scalar or one value per channel."""

    def __init__(self, dim: int, granularity: str = "channel", init_logit: float = 0.0):
        super().__init__()
        if granularity not in ("scalar", "channel"):
            raise ValueError(f"granularity must be 'scalar' or 'channel', got {granularity!r}")
        shape = (dim,) if granularity == "channel" else ()
        self.logit = nn.Parameter(torch.full(shape, float(init_logit)))

    def forward(self) -> torch.Tensor:
        return torch.sigmoid(self.logit)


class RMSNorm(nn.Module):
    """Plain RMSNorm (weight initialised to one)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var = x.float().pow(2).mean(-1, keepdim=True)
        return (x.float() * torch.rsqrt(var + self.eps) * self.weight.float()).to(x.dtype)


class GatedCrossAttention(nn.Module):
    """The action stream reads a context's keys and values through a sigmoid gate.

    :param query_dim: width of the action stream.
    :param num_heads: query heads; the context may have fewer key/value heads (grouped queries).
    :param head_dim: width of one head (must equal the context's head width).
    :param gate_granularity: ``"scalar"`` or ``"channel"``.
    :param gate_init_logit: initial gate logit.
    :param zero_init: zero-initialise the output projection (exact carry-over at step 0).
    """

    def __init__(
        self,
        query_dim: int,
        num_heads: int,
        head_dim: int,
        *,
        gate_granularity: str = "channel",
        gate_init_logit: float = 0.0,
        zero_init: bool = True,
        eps: float = 1e-6,
    ):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.norm = RMSNorm(query_dim, eps)
        self.q_proj = nn.Linear(query_dim, num_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * head_dim, query_dim, bias=False)
        if zero_init:
            nn.init.zeros_(self.o_proj.weight)
        self.gate = SigmoidGate(query_dim, gate_granularity, gate_init_logit)

    def forward(
        self,
        x: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        mask: torch.Tensor,
        rotate_queries: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Return ``x`` plus the gated cross-attention output.

        :param x: ``(B, S, query_dim)`` action stream.
        :param keys: ``(B, KV, P, head_dim)`` context keys (already position-encoded if the host does so).
        :param values: ``(B, KV, P, head_dim)`` context values.
        :param mask: ``(B, S, P)`` boolean, True where a query may read a context token. A query with no
            readable token gets a zero update.
        :param rotate_queries: applies the host's positional encoding to ``(B, H, S, head_dim)`` queries.
        """
        bsz, seq, _ = x.shape
        dtype = self.q_proj.weight.dtype
        q = self.q_proj(self.norm(x).to(dtype)).view(bsz, seq, self.num_heads, self.head_dim).transpose(1, 2)
        if rotate_queries is not None:
            q = rotate_queries(q)
        kv_heads, ctx = keys.shape[1], keys.shape[2]
        groups = self.num_heads // kv_heads
        # Grouped queries: the query heads sharing a key/value head are stacked as the rows of one
        # matmul against it, instead of copying the keys/values once per query head (the host's
        # repeat_kv). Every score is still one dot product over head_dim, so the values are the same.
        q = q.reshape(bsz, kv_heads, groups * seq, self.head_dim)
        scores = torch.matmul(q, keys.to(dtype).transpose(-1, -2)).view(bsz, self.num_heads, seq, ctx)
        scores = scores * (self.head_dim**-0.5)
        bias = torch.zeros(mask.shape, dtype=torch.float32, device=scores.device)
        bias = bias.masked_fill(~mask, ATTENTION_MASK_VALUE)[:, None]
        probs = torch.softmax(scores.float() + bias, dim=-1).to(dtype)
        attn = torch.matmul(probs.view(bsz, kv_heads, groups * seq, ctx), values.to(dtype))
        # A query with no visible context token reads nothing (instead of a uniform mix of hidden ones);
        # zeroing its (head_dim-wide) output equals zeroing its (context-wide) probabilities.
        attn = attn.view(bsz, self.num_heads, seq, self.head_dim) * mask.any(dim=-1)[:, None, :, None]
        attn = attn.transpose(1, 2).reshape(bsz, seq, self.num_heads * self.head_dim)
        out = self.gate() * self.o_proj(attn)
        return x + out.to(x.dtype)
