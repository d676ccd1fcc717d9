"""Language-visibility masks shared by adapters.

APT defines Stage 1 by *visibility*: rows that must not see language lose those columns. An
adapter may then compute the visible rows without the hidden tokens at all (the pi adapter does,
to make invariance bit-exact), as long as Stage 1 and Stage 2 compute them the same way; what it
must not do is change what the *language* rows see, or Stage 2 loses the language context.
"""

from __future__ import annotations

from typing import Any

__all__ = ["block_language", "gather_mask", "gather_tokens", "merge_language_columns", "visible_first"]


def block_language(mask: Any, query_is_language: Any, key_is_language: Any) -> Any:
    """Remove language keys from every non-language query of a boolean attention mask.

    :param mask: ``(B, Q, K)`` boolean, True where attention is allowed.
    :param query_is_language: ``(B, Q)`` boolean, True for language queries (they keep their view).
    :param key_is_language: ``(B, K)`` boolean, True for language keys to hide.
    :return: the masked ``(B, Q, K)`` boolean mask (a new tensor).
    """
    blocked = (~query_is_language)[:, :, None] & key_is_language[:, None, :]
    return mask & ~blocked


def merge_language_columns(prefix_len: int, language_start: int, language_mask: Any) -> Any:
    """Place a ``(B, L)`` language mask at ``language_start`` of a ``(B, prefix_len)`` prefix mask."""
    import torch

    out = torch.zeros(language_mask.shape[0], prefix_len, dtype=torch.bool, device=language_mask.device)
    out[:, language_start : language_start + language_mask.shape[1]] = language_mask.bool()
    return out


# Token compaction: adapters that make Stage 1 bit-exact run the visible tokens *without* the hidden
# ones (plain column masking leaves 1-ulp differences and leaks the instruction length through
# positions). These three are the gathers every such adapter needs.


def visible_first(keep: Any) -> tuple[Any, Any]:
    """Indices putting the ``keep`` tokens first (stable order), trimmed to the batch maximum, and their validity.

    :param keep: ``(B, T)`` boolean, True for the tokens to keep.
    :return: ``(index, valid)``, both ``(B, W)`` with ``W = max(1, max_b keep[b].sum())``; one (invalid) slot
        when nothing is kept, so no tensor is ever empty.
    """
    import torch

    order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices
    width = max(1, int(keep.sum(dim=1).max()))
    index = order[:, :width]
    return index, keep.gather(1, index)


def gather_tokens(x: Any, index: Any) -> Any:
    """``x[b, index[b]]`` along dim 1, for any trailing dims (``x`` is ``(B, T, ...)``, ``index`` ``(B, W)``)."""
    return x.gather(1, index.view(*index.shape, *([1] * (x.dim() - 2))).expand(*index.shape, *x.shape[2:]))


def gather_mask(mask: Any, rows: Any, cols: Any) -> Any:
    """``mask[b, rows[b]][:, cols[b]]`` for a ``(B, P, P)`` mask: the sub-mask of the kept queries and keys."""
    picked = mask.gather(1, rows[:, :, None].expand(-1, -1, mask.shape[2]))
    return picked.gather(2, cols[:, None, :].expand(-1, rows.shape[1], -1))
