"""Streaming deltas: what changed in a request since the last step, computed on the engine thread.

LLMEngine makes them itself when the server asks (`emit_deltas`: RequestState.delta); for an
engine that reports cumulative text and token ids (the fake engine, data parallel), DeltaTracker
slices off what was already delivered. Either way the asyncio side never holds a list the engine
may still append to, and each step copies only the new tokens (not the whole output: long
generations would go quadratic).

    step k:   text "The cap"      token_ids [a b c]   -> SampleDelta(text "The cap", ids [a b c])
    step k+1: text "The capital"  token_ids [a b c d] -> SampleDelta(text "ital",    ids [d])

A consumer that falls behind (a busy event loop, a slow client) takes the deltas queued for it
as one (`merge_deltas`): one SSE chunk for several steps' tokens, as vLLM's output collector
does, so that the per-chunk cost (JSON, ASGI send) is paid per wake-up, not per token, and the
server keeps up with the engine instead of stealing its GIL time.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hearth.engine.outputs import RequestDelta, RequestOutput, SampleDelta, SampleProgress
from hearth.engine.request_state import TokenRow

ABORT = "abort"


def merge_deltas(first: RequestDelta, then: RequestDelta) -> RequestDelta:
    """`first` followed by `then` (the next delta of the same request), as one delta."""
    by_index = {sample.index: sample for sample in first.samples}
    for sample in then.samples:
        before = by_index.get(sample.index)
        if before is None:
            by_index[sample.index] = sample
            continue
        logprobs = before.logprobs
        if sample.logprobs is not None:
            logprobs = [*(logprobs or ()), *sample.logprobs]
        by_index[sample.index] = SampleDelta(
            sample.index,
            before.text + sample.text,
            [*before.token_ids, *sample.token_ids],
            logprobs,
            sample.finish_reason or before.finish_reason,
            sample.stop_reason if sample.finish_reason else before.stop_reason,
        )
    return RequestDelta(
        then.request_id,
        sorted(by_index.values(), key=lambda sample: sample.index),
        then.prompt_token_ids or first.prompt_token_ids,
        then.finished,
        then.num_cached_tokens,
        then.time,
    )


@dataclass
class _Progress:
    samples: list[SampleProgress]
    prompt_token_ids: list[int] = field(default_factory=list)
    num_cached_tokens: int = 0

    def sample(self, index: int) -> SampleProgress:
        """Sample `index`'s progress (made on first sight: an engine may report more samples
        than `start` was told)."""
        while index >= len(self.samples):
            self.samples.append(SampleProgress())
        return self.samples[index]


class DeltaTracker:
    """Remembers how much of each request was delivered. Used by the engine thread only."""

    def __init__(self) -> None:
        self._requests: dict[str, _Progress] = {}

    def start(self, request_id: str, n: int) -> None:
        self._requests[request_id] = _Progress([SampleProgress() for _ in range(n)])

    def forget(self, request_id: str) -> None:
        self._requests.pop(request_id, None)

    def update(self, outputs: list[RequestOutput], now: float) -> list[RequestDelta]:
        deltas = []
        for output in outputs:
            progress = self._requests.get(output.request_id)
            if progress is None:  # aborted already, or not ours
                continue
            delta = self._delta(output, progress, now)
            if delta is not None:
                deltas.append(delta)
            if output.finished or (delta is not None and delta.finished):
                del self._requests[output.request_id]
        return deltas

    def observe(self, deltas: list[RequestDelta | TokenRow]) -> list[RequestDelta | TokenRow]:
        """Deltas an engine made itself (LLMEngine.emit_deltas): those of requests still
        tracked, noting which samples finished (for `abort`) and forgetting finished requests.
        A TokenRow (LLMEngine.emit_token_ids: one sample) is kept the same way."""
        kept = []
        requests = self._requests
        for delta in deltas:
            if type(delta) is tuple:  # a TokenRow: (request id, ids, finish reason, ...)
                if delta[0] in requests:
                    if delta[2] is not None:
                        del requests[delta[0]]
                    kept.append(delta)
                continue
            progress = requests.get(delta.request_id)
            if progress is None:  # aborted already, or not ours
                continue
            if not progress.prompt_token_ids:
                progress.prompt_token_ids = delta.prompt_token_ids
                progress.num_cached_tokens = delta.num_cached_tokens
            for sample in delta.samples:
                if sample.finish_reason is not None:  # what `abort` needs to know
                    progress.sample(sample.index).finished = True
            if delta.finished:
                del requests[delta.request_id]
            kept.append(delta)
        return kept

    def abort(self, request_id: str, now: float) -> RequestDelta | None:
        """The last delta of a request the server aborts: unfinished samples end with 'abort'."""
        progress = self._requests.pop(request_id, None)
        if progress is None:
            return None
        samples = [
            SampleDelta(index=i, text="", token_ids=[], finish_reason=ABORT)
            for i, sample in enumerate(progress.samples)
            if not sample.finished
        ]
        return RequestDelta(
            request_id, samples, progress.prompt_token_ids, True, progress.num_cached_tokens, now
        )

    def _delta(self, output: RequestOutput, progress: _Progress, now: float) -> RequestDelta | None:
        if not progress.prompt_token_ids:
            progress.prompt_token_ids = list(output.prompt_token_ids)
            progress.num_cached_tokens = output.num_cached_tokens
        samples = []
        for completion in output.outputs:
            sample = progress.sample(completion.index)
            if sample.finished:
                continue
            delta = sample.advance(completion.index, completion.text, completion.token_ids, 0,
                                   completion.logprobs, completion.finish_reason,
                                   completion.stop_reason)
            if delta is not None:
                samples.append(delta)
        finished = output.finished or all(s.finished for s in progress.samples)
        if not samples and not finished:
            return None
        return RequestDelta(
            output.request_id,
            samples,
            progress.prompt_token_ids,
            finished,
            progress.num_cached_tokens,
            now,
        )
