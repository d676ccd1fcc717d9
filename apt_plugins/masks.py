"""Language-visibility masks shared by adapters.

APT defines Stage 1 by *visibility*: rows that must not see language lose those columns. An
adapter may then compute the visible rows without the hidden tokens at all (the pi adapter does,
to make invariance bit-exact), as long as Stage 1 and Stage 2 compute them the same way; what it
must not do is change what the *language* rows see, or Stage 2 loses the language context.
"""

from __future__ import annotations

from typing import Any

__all__ = ["block_language", "merge_language_columns"]


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
