"""FakeEngine: the LLMEngine contract without a model, for testing the server fast and exactly.

Tokens are characters (token id = code point; 1 = BOS, 2 = EOS). Greedy output walks a fixed phrase
from an offset that depends on the prompt, then emits EOS; sampled output draws letters from a
per-sample `random.Random(seed + index)`, so seeded requests are reproducible. Each step sleeps
`step_delay_s` (like a forward pass, releasing the GIL) and emits one token per running sample.
Magic prompts: "__crash__" makes step() raise (the engine thread dies); "__add_fails__" makes
add_request raise RuntimeError (one request fails); "__say:TEXT__" makes the greedy answer TEXT
(then EOS), e.g. a recorded answer with tool calls or <think> blocks.

Like LLMEngine it reports deltas when the server's loop asks (`emit_deltas`), and in the engine
process (`emit_token_ids`) a plain request's new token ids alone (a TokenRow), which the API
process detokenizes with the same FakeTokenizer (appliance/text_streams.py).
"""

from __future__ import annotations

import math
import random
import re
import threading
import time
from dataclasses import dataclass, field
from types import SimpleNamespace

from hearth.appliance.deltas import DeltaTracker
from hearth.engine.fair_share import FairShare
from hearth.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput, TokenLogprob
from hearth.engine.prepare import ModelInfo, PreparedRequest, prepare
from hearth.engine.request_state import reports_token_ids
from hearth.engine.sampling_params import SamplingParams

PHRASE = "the quick brown fox jumps over the lazy dog. "
_SAY = re.compile(r"__say:(.*?)__", re.S)
BOS, EOS = 1, 2
BLOCK_SIZE = 16


class FakeTokenizer:
    vocab_size = 50_000
    eos_token_ids = (EOS,)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [ord(c) if ord(c) < self.vocab_size else ord("?") for c in text]
        return [BOS, *ids] if add_special_tokens else ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        specials = {BOS: "<s>", EOS: "</s>"}
        return "".join(
            ("" if skip_special_tokens else specials[i]) if i in specials else chr(i) for i in ids
        )

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            **kwargs) -> str:
        text = "".join(f"<{m['role']}>{m['content']}\n" for m in messages)
        return text + ("<assistant>" if add_generation_prompt else "")


@dataclass
class _Sample:
    index: int
    rng: random.Random
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None


@dataclass
class _Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int
    samples: list[_Sample]
    arrival: float
    first_token_time: float | None = None
    crash: bool = False
    share_key: str | None = None  # the fair-share flow, as engine Sequences have it
    share_weight: float = 1.0

    @property
    def arrival_time(self) -> float:
        return self.arrival

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + max(len(s.token_ids) for s in self.samples)

    @property
    def finished(self) -> bool:
        return all(s.finish_reason for s in self.samples)


class FakeEngine:
    def __init__(
        self,
        max_model_len: int = 256,
        max_num_seqs: int = 8,
        num_blocks: int = 512,
        step_delay_s: float = 0.005,
        model_name: str = "fake-model",
    ) -> None:
        self.tokenizer = FakeTokenizer()
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.model_info = ModelInfo(model_name, max_model_len, FakeTokenizer.vocab_size,
                                    self.tokenizer)
        self.max_num_seqs = max_num_seqs
        self.num_blocks = num_blocks
        self.step_delay_s = step_delay_s
        self._waiting: list[_Request] = []
        self._running: list[_Request] = []
        self._lock = threading.Lock()
        self._num_prompt_tokens = 0
        self._num_generation_tokens = 0
        self.shut_down = False
        self.fair_share = FairShare()
        self.paused = threading.Event()  # set: steps admit and run nothing (queue up a load first)
        # the share key of every finished request, in finishing order: fair-sharing tests read
        # the engine's order, which a loaded machine's client-side timing would blur
        self.finished_keys: list[str | None] = []
        self.emit_deltas = False  # LLMEngine's switches (engine/llm_engine.py)
        self.emit_token_ids = False
        self._deltas = DeltaTracker()  # the deltas of requests that are not reported as rows
        self._rows_sent: dict[str, int] = {}  # row requests: output tokens reported so far

    def add_request(
        self, request_id: str, prompt: str | list[int], params: SamplingParams, priority: int = 0
    ) -> None:
        self.add_prepared(request_id, prepare(self.model_info, prompt, params), priority)

    def add_prepared(self, request_id: str, request: PreparedRequest, priority: int = 0) -> None:
        ids, params = request.token_ids, request.params
        text = request.prompt or self.tokenizer.decode(ids)
        if "__add_fails__" in text:
            raise RuntimeError("add_request blew up")
        if any(r.request_id == request_id for r in self._waiting + self._running):
            raise ValueError(f"duplicate request id {request_id!r}")
        seed = params.seed if params.seed is not None else random.randrange(1 << 30)
        samples = [
            _Sample(
                i, random.Random(seed + i), logprobs=[] if params.logprobs is not None else None
            )
            for i in range(params.n)
        ]
        queued = _Request(
            request_id,
            request.prompt,
            ids,
            params,
            priority,
            samples,
            time.monotonic(),
            crash="__crash__" in text,
            share_key=request.share_key,
            share_weight=request.share_weight,
        )
        with self._lock:
            self._waiting.append(queued)
            self._num_prompt_tokens += len(ids)
            if self.emit_token_ids and reports_token_ids(params):
                self._rows_sent[request_id] = 0
            else:
                self._deltas.start(request_id, params.n)

    def abort_request(self, request_id: str) -> None:
        with self._lock:
            self._waiting = [r for r in self._waiting if r.request_id != request_id]
            self._running = [r for r in self._running if r.request_id != request_id]
            self._rows_sent.pop(request_id, None)
            self._deltas.forget(request_id)

    def has_unfinished_requests(self) -> bool:
        return bool(self._waiting or self._running)

    def step(self) -> list[RequestOutput]:
        time.sleep(self.step_delay_s)
        if self.paused.is_set():
            return []
        with self._lock:
            self._admit()
            outputs = [self._advance(r) for r in self._running]
            self.finished_keys.extend(r.share_key for r in self._running if r.finished)
            self._running = [r for r in self._running if not r.finished]
        if not self.emit_deltas:
            return outputs
        rows = [self._row(o) for o in outputs if o.request_id in self._rows_sent]
        others = [o for o in outputs if o.request_id not in self._rows_sent]
        return [*self._deltas.update(others, time.monotonic()), *rows]

    def _row(self, output: RequestOutput) -> tuple:
        """A TokenRow (engine/request_state.py): the new ids; the text is the API process's."""
        [sample] = output.outputs
        ids = sample.token_ids[self._rows_sent[output.request_id] :]
        self._rows_sent[output.request_id] += len(ids)
        if output.finished:
            del self._rows_sent[output.request_id]
        stop = sample.stop_reason if isinstance(sample.stop_reason, int) else None
        return (output.request_id, ids, sample.finish_reason, stop, output.num_cached_tokens)

    def _admit(self) -> None:
        """The real scheduler's admission order: priority, then fair share across keys."""
        while self._waiting:
            request = self.fair_share.pick(self._waiting)
            if self._num_seqs_running() + request.params.n > self.max_num_seqs:
                return
            self._waiting.remove(request)
            self._running.append(request)
            self.fair_share.charge(request, request.num_tokens)

    def _num_seqs_running(self) -> int:
        return sum(len(r.samples) for r in self._running)

    def _advance(self, request: _Request) -> RequestOutput:
        if request.crash:
            raise RuntimeError("simulated engine crash")
        now = time.monotonic()
        request.first_token_time = request.first_token_time or now
        for sample in request.samples:
            if not sample.finish_reason:
                self._sample_one(request, sample)
        outputs = [
            CompletionOutput(
                s.index,
                s.text,
                list(s.token_ids),
                s.finish_reason,
                None if s.logprobs is None else list(s.logprobs),
                s.stop_reason,
            )
            for s in request.samples
        ]
        return RequestOutput(
            request.request_id,
            request.prompt,
            list(request.prompt_token_ids),
            outputs,
            request.finished,
            0,
            RequestMetrics(
                request.arrival, request.first_token_time, now if request.finished else None
            ),
        )

    def _sample_one(self, request: _Request, sample: _Sample) -> None:
        params = request.params
        token = self._next_token(request, sample)
        self._num_generation_tokens += 1
        self.fair_share.charge(request, 1)
        sample.token_ids.append(token)
        if sample.logprobs is not None:
            top = tuple(range(97, 97 + (params.logprobs or 0)))
            sample.logprobs.append(
                TokenLogprob(token, -0.25, top, tuple(-0.5 - i for i in range(len(top))))
            )
        if token == EOS and not params.ignore_eos or token in params.stop_token_ids:
            sample.finish_reason, sample.stop_reason = "stop", token if token != EOS else None
            sample.text = self._visible_text(sample, params, final=True)
            return
        full = self.tokenizer.decode(sample.token_ids)
        for stop in params.stop:
            at = full.find(stop)
            if at >= 0:
                end = at + len(stop) if params.include_stop_str_in_output else at
                sample.text, sample.finish_reason, sample.stop_reason = full[:end], "stop", stop
                return
        max_tokens = params.max_tokens or self.max_model_len - len(request.prompt_token_ids)
        if len(sample.token_ids) >= max_tokens:
            sample.finish_reason = "length"
            sample.text = full
            return
        sample.text = self._visible_text(sample, params, final=False)

    def _visible_text(self, sample: _Sample, params: SamplingParams, final: bool) -> str:
        """Hold back text that could still become a stop string, as a real detokenizer does."""
        full = self.tokenizer.decode(sample.token_ids)
        hold = 0 if final or not params.stop else max(len(s) for s in params.stop) - 1
        return full[: max(len(sample.text), len(full) - hold)]

    def _next_token(self, request: _Request, sample: _Sample) -> int:
        position = len(sample.token_ids)
        if request.params.temperature > 0:
            return ord(sample.rng.choice("abcdefghijklmnopqrstuvwxyz "))
        script = _SAY.search(self.tokenizer.decode(request.prompt_token_ids))
        if script is not None:
            text = script.group(1)
            return EOS if position >= len(text) else ord(text[position])
        if position == len(PHRASE):
            return EOS
        offset = sum(request.prompt_token_ids) % len(PHRASE)
        return ord(PHRASE[(offset + position) % len(PHRASE)])

    def snapshot(self) -> SimpleNamespace:
        with self._lock:
            running, waiting = list(self._running), list(self._waiting)
            num_used = sum(
                math.ceil((len(r.prompt_token_ids) + len(s.token_ids)) / BLOCK_SIZE)
                for r in running
                for s in r.samples
            )
            return SimpleNamespace(
                scheduler=SimpleNamespace(
                    num_running=sum(len(r.samples) for r in running),
                    num_waiting=sum(len(r.samples) for r in waiting),
                    num_preemptions=0,
                ),
                blocks=SimpleNamespace(
                    num_blocks=self.num_blocks,
                    num_free=self.num_blocks - num_used,
                    num_used=num_used,
                    num_cached=0,
                    usage=num_used / self.num_blocks,
                    prefix_queries_tokens=self._num_prompt_tokens,
                    prefix_hits_tokens=0,
                ),
                num_prompt_tokens_total=self._num_prompt_tokens,
                num_generation_tokens_total=self._num_generation_tokens,
                spec_decode=None,
                replicas=(),
            )

    def check_health(self) -> None:
        pass

    def shutdown(self) -> None:
        self.shut_down = True


def failing_factory(message: str) -> FakeEngine:
    """An engine factory that cannot load (a picklable one: it also runs in an engine process)."""
    raise ValueError(message)
