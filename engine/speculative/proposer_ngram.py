"""Prompt-lookup (n-gram) proposals: no extra model (no torch).

The last n tokens of a sequence are looked up in its earlier tokens (prompt and output); the K
tokens that followed their latest earlier occurrence are the proposal. Longer n-grams are tried
first (`prompt_lookup_max` down to `prompt_lookup_min`). It pays where the output copies its
context: code edits, "repeat this", RAG answers quoting their sources.

    tokens   [ a b c d x y a b c ]      n = 3: "a b c" also ends at position 2
    proposal               [ d x y ]    the K = 3 tokens after that match
"""

from __future__ import annotations

from array import array

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
        tokens = _array(token_ids[-_MAX_LOOKBACK:])
        end = _latest_match(tokens, self.min_n, self.max_n)
        return [] if end is None else tokens[end + 1 : end + 1 + k].tolist()

    def matches(self, token_ids: list[int], skip_last: bool = False) -> bool:
        """Whether `propose` would propose anything, on `token_ids` less its last token with
        `skip_last` (a placeholder whose id is still on the device, async scheduling)."""
        end = len(token_ids) - 1 if skip_last else len(token_ids)
        if self.k <= 0 or end <= self.min_n:
            return False
        tokens = _array(token_ids[max(end - _MAX_LOOKBACK, 0):end])
        return _latest_match(tokens, self.min_n, self.max_n) is not None


def _array(token_ids: list[int]) -> np.ndarray:
    """int64 array of a list of ids (through array.array: about half np.asarray's time)."""
    return np.frombuffer(array("q", token_ids), dtype=np.int64)


def _latest_match(tokens: np.ndarray, min_n: int, max_n: int) -> int | None:
    """End of the latest earlier occurrence of the longest suffix of min_n..max_n tokens that
    has a token after it (None: no suffix of min_n tokens recurs).

    One pass over the tokens finds where the last token recurs; the candidates (few, usually)
    are then extended backwards a token at a time, so the cost is O(L + candidates x max_n)
    instead of comparing every window of every length."""
    last = len(tokens) - 1
    max_n = min(max_n, last)
    ends = np.flatnonzero(tokens[:last] == tokens[last])  # a token follows each of them
    if ends.size == 0 or max_n < min_n:
        return None
    length = np.ones(ends.size, dtype=np.int64)  # how many tokens match, ending there
    alive = np.ones(ends.size, dtype=bool)
    for j in range(1, max_n):
        before = ends - j
        alive &= before >= 0
        alive[alive] = tokens[before[alive]] == tokens[last - j]
        if not alive.any():
            break
        length += alive
    for n in range(max_n, min_n - 1, -1):
        hits = np.flatnonzero(length >= n)
        if hits.size:
            return int(ends[hits[-1]])
    return None
