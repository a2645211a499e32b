"""Prompt-lookup (n-gram) proposals: no extra model (no torch).

The last n tokens of a sequence are looked up in its earlier tokens (prompt and output); the K
tokens that followed their latest earlier occurrence are the proposal. Longer n-grams are tried
first (`prompt_lookup_max` down to `prompt_lookup_min`). It pays where the output copies its
context: code edits, "repeat this", RAG answers quoting their sources.

    tokens   [ a b c d x y a b c ]      n = 3: "a b c" also ends at position 2
    proposal               [ d x y ]    the K = 3 tokens after that match
"""

from __future__ import annotations

import numpy as np

# Only the last tokens are searched: the lookup's cost stays bounded on long contexts.
_MAX_LOOKBACK = 4096


class NgramProposer:
    def __init__(self, num_speculative_tokens: int, min_n: int, max_n: int) -> None:
        self.k = num_speculative_tokens
        self.min_n = min_n
        self.max_n = max_n

    def propose(self, token_ids: list[int], max_tokens: int | None = None) -> list[int]:
        """Up to min(K, max_tokens) tokens for `token_ids`' continuation; [] when nothing
        matches."""
        k = self.k if max_tokens is None else min(self.k, max_tokens)
        if k <= 0 or len(token_ids) <= self.min_n:
            return []
        tokens = np.asarray(token_ids[-_MAX_LOOKBACK:], dtype=np.int64)
        for n in range(min(self.max_n, len(tokens) - 1), self.min_n - 1, -1):
            start = _latest_match(tokens, n)
            if start is not None:
                return tokens[start + n : start + n + k].tolist()
        return []

    def matches(self, token_ids: list[int], skip_last: bool = False) -> bool:
        """Whether `propose` would propose anything, on `token_ids` less its last token with
        `skip_last` (a placeholder whose id is still on the device, async scheduling)."""
        end = len(token_ids) - 1 if skip_last else len(token_ids)
        if self.k <= 0 or end <= self.min_n:
            return False
        tokens = np.asarray(token_ids[max(end - _MAX_LOOKBACK, 0):end], dtype=np.int64)
        return any(_latest_match(tokens, n) is not None
                   for n in range(min(self.max_n, len(tokens) - 1), self.min_n - 1, -1))


def _latest_match(tokens: np.ndarray, n: int) -> int | None:
    """Start of the latest earlier occurrence of the last n tokens that has a token after it."""
    suffix = tokens[-n:]
    # (L - n, n): every window that ends before the last token, so a continuation exists
    windows = np.lib.stride_tricks.sliding_window_view(tokens[:-1], n)
    hits = np.flatnonzero((windows == suffix).all(axis=1))
    return int(hits[-1]) if hits.size else None
