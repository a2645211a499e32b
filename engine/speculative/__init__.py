"""Speculative decoding: cheap proposals for the next K tokens, checked by the target model in one
forward pass over the K + 1 positions.

    config.py           SpeculativeConfig: method, K, draft model, switch-off batch size (no torch)
    proposer_ngram.py   prompt lookup: the tokens that followed the last n-gram's earlier match
    proposer_draft.py   a small model of the same tokenizer drafts K tokens greedily
    verify.py           greedy acceptance and rejection sampling over the K + 1 target rows
    stats.py            SpecDecodeStats: vLLM's counters (drafts, draft tokens, accepted, per pos)
    speculator.py       Speculator: which sequences speculate this step, and their proposals
"""

from hearth.engine.speculative.config import SPECULATIVE_METHODS, SpeculativeConfig
from hearth.engine.speculative.stats import SpecDecodeStats

__all__ = ["SPECULATIVE_METHODS", "SpecDecodeStats", "SpeculativeConfig"]
