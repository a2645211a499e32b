"""Draft-model proposals: a small model with the target's tokenizer drafts K tokens greedily.

The draft keeps its own KV cache and block tables: each target sequence has a shadow Sequence in
the draft's BlockManager. A step brings the shadow up to the target's tokens (a prefill the first
time, then the tokens the target accepted since), then decodes K - 1 more, all sequences batched:

    round 0   shadow [ ... t41 ] computed up to its last accepted token -> draft d0
    round i   shadow [ ... t41 d0 .. d(i-1) ] one decode token          -> draft di

The shadow's K/V stay valid for the positions the target accepted (its accepted tokens are the
drafts), so after verification it only rolls back to the target's computed count; blocks that
held rejected drafts are freed. Decode rounds replay the draft runner's CUDA graphs on a GPU.
"""

from __future__ import annotations

from hearth.engine.block_manager import BlockManager
from hearth.engine.model_runner import ModelRunner
from hearth.engine.outputs import ScheduledChunk, ScheduleOutput
from hearth.engine.sampling_params import SamplingParams
from hearth.engine.sequence import Sequence, SequenceStatus

_GREEDY = SamplingParams(temperature=0.0, max_tokens=None, detokenize=False)


class DraftProposer:
    def __init__(self, runner: ModelRunner, num_speculative_tokens: int) -> None:
        self.runner = runner
        self.k = num_speculative_tokens
        self.blocks = BlockManager(runner.num_blocks, runner.block_size,
                                   enable_prefix_caching=False)
        self._shadows: dict[int, tuple[Sequence, Sequence]] = {}  # seq_id -> (target, shadow)

    def propose(self, seqs: list[Sequence], limits: list[int]) -> list[list[int]]:
        """Up to limits[i] (<= K) greedy draft tokens for each target sequence."""
        self._drop_stale()
        shadows = [self._catch_up(seq, limit) for seq, limit in zip(seqs, limits, strict=True)]
        proposals: list[list[int]] = [[] for _ in seqs]
        for round_index in range(max(limits, default=0)):
            live = [i for i, s in enumerate(shadows) if s is not None and round_index < limits[i]]
            if not live:
                break
            chunks = [_chunk(shadows[i]) for i in live]
            out = self.runner.execute(ScheduleOutput(chunks=chunks))
            for i, chunk in zip(live, chunks, strict=True):
                shadow = shadows[i]
                token_id = out.sampled_token_ids[shadow.seq_id][0]
                shadow.num_computed_tokens = chunk.end_pos
                shadow.append_token(token_id)
                proposals[i].append(token_id)
        return proposals

    def _catch_up(self, seq: Sequence, limit: int) -> Sequence | None:
        """The shadow of `seq` with the target's tokens and room for `limit` - 1 draft tokens
        beyond them; None when the draft's cache has no room (no proposal this step)."""
        if limit <= 0:
            return None
        _, shadow = self._shadows.get(seq.seq_id, (seq, None))
        if shadow is None:
            shadow = Sequence(seq.seq_id, seq.request_id, [], _GREEDY)
            self._shadows[seq.seq_id] = (seq, shadow)
        keep = min(shadow.num_computed_tokens, seq.num_computed_tokens)
        del shadow.token_ids[keep:]
        shadow.token_ids.extend(seq.token_ids[keep:])
        shadow.num_computed_tokens = keep
        self.blocks.free_tail(shadow, keep)
        if not self.blocks.allocate(shadow, seq.num_tokens - keep + limit - 1):
            self._forget(seq.seq_id)
            return None
        return shadow

    def _drop_stale(self) -> None:
        """Forget the shadows of finished or preempted sequences (their blocks return)."""
        for seq_id, (target, _) in list(self._shadows.items()):
            if target.is_finished or target.status is SequenceStatus.WAITING:
                self._forget(seq_id)

    def _forget(self, seq_id: int) -> None:
        _, shadow = self._shadows.pop(seq_id)
        self.blocks.free(shadow)

    @property
    def num_shadows(self) -> int:
        return len(self._shadows)


def _chunk(shadow: Sequence) -> ScheduledChunk:
    start = shadow.num_computed_tokens
    return ScheduledChunk(shadow, start, shadow.num_tokens - start)


def build_draft(config, progress: bool = False):
    """Load the draft model of `config.speculative` beside the target: same device, dtype, block
    size and context length; its own KV cache (1 GiB on CPU, 2 GiB on CUDA unless the target
    sets kv_cache_gib) -> a BuiltModel (engine/model_builder.py)."""
    import dataclasses

    from hearth.engine.model_builder import build_model

    spec = config.speculative
    kv_gib = config.kv_cache_gib or (2.0 if _on_cuda(config.device) else 1.0)
    draft_config = dataclasses.replace(
        config, model=spec.draft_model, speculative=None, num_kv_blocks=None, kv_cache_gib=kv_gib,
        max_num_seqs=min(config.max_num_seqs, spec.disable_by_batch_size),
        async_scheduling=False, structured_output=False)
    return build_model(draft_config, progress=progress)


def check_draft(draft, target) -> None:
    """The draft must share the target's vocabulary and cover its context length."""
    draft_vocab = getattr(draft.tokenizer, "vocab_size", None)
    target_vocab = getattr(target.tokenizer, "vocab_size", None)
    too_big = draft.model_config.vocab_size > target.model_config.vocab_size
    if draft_vocab != target_vocab or too_big:
        raise ValueError(
            f"the draft model {draft.name!r} has a different vocabulary (tokenizer {draft_vocab}, "
            f"embeddings {draft.model_config.vocab_size}) from the target {target.name!r} "
            f"({target_vocab}, {target.model_config.vocab_size}): a draft model must use the "
            "target's tokenizer")
    if draft.max_model_len < target.max_model_len:
        raise ValueError(
            f"the draft model {draft.name!r} covers {draft.max_model_len} tokens, fewer than the "
            f"target's context of {target.max_model_len}: set max_model_len (--max-model-len) to "
            f"at most {draft.max_model_len}")


def _on_cuda(device: str) -> bool:
    import torch

    return device == "cuda" or (device == "auto" and torch.cuda.is_available())
