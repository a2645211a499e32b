"""RequestState: what LLMEngine keeps of one request (its samples' sequences, detokenizers and
logprobs) and the RequestOutput built from it after each step.

For the server's engine process a plain request (`reports_token_ids`: one sample, no logprobs)
is not detokenized here: each step it reports a TokenRow, its new token ids and how it ended,
and the API process detokenizes them and applies the stop strings (appliance/text_streams.py),
as vLLM V1's front end does. That keeps a Python object per request per step off the engine's
host thread, which bounds the served rate on a GPU (docs/benchmarks.md, W7)."""

from __future__ import annotations

from dataclasses import dataclass, field

from hearth.engine.detokenizer import IncrementalDetokenizer
from hearth.engine.outputs import (
    CompletionOutput,
    RequestDelta,
    RequestMetrics,
    RequestOutput,
    SampleProgress,
    TokenLogprob,
)
from hearth.engine.sampling_params import SamplingParams
from hearth.engine.sequence import Sequence

# A plain request's step, for the caller to detokenize: (request id, new output token ids,
# finish reason, stop token id that ended it, prompt tokens read from the prefix cache).
TokenRow = tuple[str, list[int], str | None, int | None, int]


def reports_token_ids(params: SamplingParams) -> bool:
    """Whether a request can report TokenRows (LLMEngine.emit_token_ids): one sample, no
    logprobs. The API process asks the same question of each request it sends."""
    return params.n == 1 and params.logprobs is None


@dataclass
class RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float
    seqs: dict[int, Sequence] = field(default_factory=dict)  # sample index -> sequence
    detoks: dict[int, IncrementalDetokenizer] = field(default_factory=dict)
    logprobs: dict[int, list[TokenLogprob]] = field(default_factory=dict)
    num_cached_tokens: int = 0
    finished_time: float | None = None
    sent: dict[int, SampleProgress] = field(default_factory=dict)  # what `delta` handed out
    ids_only: bool = False  # reports TokenRows: no detokenizer here (the module doc)
    num_ids_sent: int = 0  # output tokens `token_row` handed out

    @property
    def finished(self) -> bool:
        if len(self.seqs) != self.params.n:
            return False
        for seq in self.seqs.values():  # a loop, not all(genexpr): per request, every step
            if not seq.is_finished:
                return False
        return True

    def add_token(self, seq: Sequence, logprobs: list[TokenLogprob] | None, tokenizer,
                  num_new: int = 1) -> bool:
        """Record seq's `num_new` newest tokens (more than one after speculative decoding) and
        their logprobs; True if a stop string ends the sample."""
        index = seq.sample_index
        if index not in self.seqs:
            self.seqs[index] = seq
            self.num_cached_tokens = max(self.num_cached_tokens, seq.num_cached_tokens)
            if not self.ids_only:
                self.detoks[index] = IncrementalDetokenizer(tokenizer, self.prompt_token_ids,
                                                            self.params)
        if self.ids_only:  # one sample, no logprobs, detokenized by the caller
            return False
        if logprobs:
            # A parent that just forked got n entries; its own is the first, children take theirs.
            self.logprobs.setdefault(index, []).append(logprobs[0])
            for child_index, lp in enumerate(logprobs[1:], start=1):
                self.logprobs.setdefault(child_index, []).append(lp)
        if not self.params.detokenize:
            return False
        detok = self.detoks[index]
        if num_new == 1:
            return detok.add_token(seq.last_token_id)
        return any(detok.add_token(t) for t in seq.token_ids[seq.num_tokens - num_new :])

    def output(self, finished: bool | None = None) -> RequestOutput:
        """The request's output now (built for every running request after each step when the
        server streams: kept to plain loops). `finished`: `self.finished`, if already known."""
        if len(self.seqs) == 1:
            [(index, seq)] = self.seqs.items()
            first, outputs = seq.first_token_time or None, [self._completion(index)]
        else:
            first = min((s.first_token_time for s in self.seqs.values() if s.first_token_time),
                        default=None)
            outputs = [self._completion(i) for i in sorted(self.seqs)]
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=self.prompt_token_ids,
            outputs=outputs,
            finished=self.finished if finished is None else finished,
            num_cached_tokens=self.num_cached_tokens,
            metrics=RequestMetrics(self.arrival_time, first, self.finished_time),
        )

    def delta(self, finished: bool, now: float) -> RequestDelta | None:
        """What changed since the last delta (the server streams these: no cumulative output
        built each step and sliced again), or None. The same deltas as
        appliance/deltas.py's DeltaTracker makes from `output()`; tests compare the two."""
        samples = []
        want_logprobs = self.params.logprobs is not None
        for index in (self.seqs if len(self.seqs) == 1 else sorted(self.seqs)):
            progress = self.sent.get(index)
            if progress is None:
                progress = self.sent[index] = SampleProgress()
            elif progress.finished:
                continue
            seq = self.seqs[index]
            reason = seq.finish_reason.value if seq.finish_reason else None
            delta = progress.advance(
                index, self.detoks[index].visible_text(seq.is_finished), seq.token_ids,
                seq.num_prompt_tokens, (self.logprobs.get(index) or []) if want_logprobs else None,
                reason, self._stop_reason(index, reason))
            if delta is not None:
                samples.append(delta)
        if not samples and not finished:
            return None
        return RequestDelta(self.request_id, samples, self.prompt_token_ids, finished,
                            self.num_cached_tokens, now)

    def token_row(self) -> TokenRow:
        """An `ids_only` request's output tokens since the last row, and how it ended."""
        seq = self.seqs[0]
        ids = seq.token_ids[seq.num_prompt_tokens + self.num_ids_sent :]
        self.num_ids_sent += len(ids)
        reason = seq.finish_reason.value if seq.finish_reason else None
        return (self.request_id, ids, reason, self._stop_token(seq, reason),
                self.num_cached_tokens)

    def _stop_reason(self, index: int, reason: str | None) -> str | int | None:
        stop_reason = self.detoks[index].stop_reason
        return self._stop_token(self.seqs[index], reason) if stop_reason is None else stop_reason

    def _stop_token(self, seq: Sequence, reason: str | None) -> int | None:
        """The stop token id that ended `seq`, if one did."""
        if reason == "stop" and seq.num_tokens > seq.num_prompt_tokens:
            last = seq.last_token_id
            return last if last in self.params.stop_token_ids else None
        return None

    def _completion(self, index: int) -> CompletionOutput:
        seq, detok = self.seqs[index], self.detoks[index]
        reason = seq.finish_reason.value if seq.finish_reason else None
        stop_reason = self._stop_reason(index, reason)
        want = self.params.logprobs is not None
        logprobs = self.logprobs.get(index) if want else None
        return CompletionOutput(
            index=index,
            text=detok.visible_text(seq.is_finished),
            token_ids=seq.output_token_ids,
            finish_reason=reason,
            logprobs=list(logprobs or []) if want else None,
            stop_reason=stop_reason,
        )
