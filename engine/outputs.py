"""Typed boundaries between scheduler, runner and callers: ScheduleOutput, RunnerOutput,
RequestOutput.

    Scheduler.schedule()  -> ScheduleOutput   what to compute this step (no torch)
    ModelRunner.execute() -> RunnerOutput     what was sampled
    LLMEngine.step()      -> RequestOutput    what the caller sees (text so far, finish reason)
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hearth.engine.sequence import Sequence


@dataclass(slots=True)  # one per sequence per step: not frozen (its __init__ costs 5x more)
class ScheduledChunk:
    """`num_new_tokens` tokens of `seq`, starting at position `start_pos`, computed this step.

    A speculating decode chunk also computes its proposed tokens, which are not (yet) the
    sequence's: `num_new_tokens` counts them, and every one of its positions is sampled.

        seq.token_ids [ ... t41 ]   spec_token_ids ( d0 d1 d2 )
        chunk          [ t41 d0 d1 d2 ]   start_pos 41, num_new_tokens 4"""

    seq: Sequence
    start_pos: int  # == seq.num_computed_tokens when scheduled
    num_new_tokens: int
    spec_token_ids: tuple[int, ...] = ()  # proposals verified this step (speculative decoding)

    @property
    def token_ids(self) -> list[int]:
        end = self.end_pos - len(self.spec_token_ids)
        return self.seq.token_ids[self.start_pos : end] + list(self.spec_token_ids)

    @property
    def end_pos(self) -> int:
        return self.start_pos + self.num_new_tokens

    @property
    def samples(self) -> bool:
        """The chunk reaches the end of the sequence: its last position is sampled."""
        return self.end_pos - len(self.spec_token_ids) == self.seq.num_tokens

    @property
    def num_sampled_rows(self) -> int:
        """Positions whose logits are read: K + 1 for a speculating chunk."""
        return 1 + len(self.spec_token_ids) if self.samples else 0


@dataclass(frozen=True)
class BlockCopy:
    """Copy-on-write: copy the K/V of block `src` into block `dst` before this step's forward."""

    src: int
    dst: int


@dataclass
class ScheduleOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    block_copies: list[BlockCopy] = field(default_factory=list)
    preempted_seq_ids: list[int] = field(default_factory=list)
    finished_seq_ids: list[int] = field(default_factory=list)  # since the last schedule (aborts)

    @property
    def num_batched_tokens(self) -> int:
        return sum(c.num_new_tokens for c in self.chunks)

    @property
    def is_empty(self) -> bool:
        return not self.chunks


@dataclass(frozen=True)
class TokenLogprob:
    """Log-probability of a chosen token, with the top-N alternatives (most likely first)."""

    token_id: int
    logprob: float
    top_token_ids: tuple[int, ...] = ()
    top_logprobs: tuple[float, ...] = ()


@dataclass
class RunnerOutput:
    """Per sampled sequence: `num_samples_to_draw` token ids (and logprobs when asked for); a
    speculating sequence gets its accepted proposals followed by the target's token."""

    sampled_token_ids: dict[int, list[int]] = field(default_factory=dict)
    logprobs: dict[int, list[TokenLogprob]] = field(default_factory=dict)


@dataclass
class CompletionOutput:
    """One of a request's n samples, cumulative so far."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] | None = None
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    num_cached_tokens: int = 0
    metrics: RequestMetrics | None = None


@dataclass
class RequestMetrics:
    arrival_time: float
    first_token_time: float | None = None
    finished_time: float | None = None


@dataclass(slots=True)  # one per request per step when serving: not frozen (5x cheaper)
class SampleDelta:
    """New text, token ids and logprobs of one of a request's n samples."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None  # set once, on the sample's last delta
    stop_reason: str | int | None = None


@dataclass(slots=True)
class RequestDelta:
    request_id: str
    samples: list[SampleDelta]  # only the samples that changed
    prompt_token_ids: list[int]
    finished: bool  # every sample has its finish_reason; this is the request's last delta
    num_cached_tokens: int = 0
    time: float = 0.0  # time.monotonic() on the engine thread when the step ended


@dataclass(slots=True)
class SampleProgress:
    """How much of one sample was handed out as deltas (RequestState.delta, and
    appliance/deltas.py's DeltaTracker for engines that report cumulative outputs)."""

    num_tokens: int = 0
    text_len: int = 0
    num_logprobs: int = 0
    finished: bool = False

    def advance(self, index: int, text: str, token_ids: list[int], first: int,
                logprobs: list[TokenLogprob] | None, reason: str | None,
                stop_reason: str | int | None) -> SampleDelta | None:
        """The sample's delta since the last call (`token_ids[first:]` are its output ids: no
        copy of the whole output to slice again), or None when nothing changed."""
        new_text = text[self.text_len :]
        new_ids = token_ids[first + self.num_tokens :]
        self.text_len, self.num_tokens = len(text), len(token_ids) - first
        new_logprobs = None
        if logprobs is not None:
            new_logprobs, self.num_logprobs = logprobs[self.num_logprobs :], len(logprobs)
        self.finished = reason is not None
        if new_text or new_ids or reason:
            return SampleDelta(index, new_text, new_ids, new_logprobs, reason, stop_reason)
        return None
