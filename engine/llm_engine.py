"""LLMEngine: add_request / abort_request / step over scheduler, runner and detokenizers.

One step: Scheduler.schedule() -> ModelRunner.execute() -> Scheduler.update() -> detokenize and
apply stop strings -> RequestOutput for every request that changed. Synchronous and
single-threaded; the appliance's AsyncEngine runs it in its own thread. `snapshot()` may be
called from other threads.

Async scheduling (`EngineConfig.async_scheduling`, on for CUDA) overlaps the CPU with the GPU:

    step k:  schedule N+1 | launch N+1 (inputs gathered on the device from N's ids) |
             wait for N's ids (copied to pinned memory right after N's sampling, not behind N+1) |
             resolve + detokenize N -> outputs | update N+1 with placeholders
    GPU:     ....... N ........|.............. N+1 ..................................

A sequence that stops at N (EOS, stop string) was already scheduled at N+1: its token from N+1 is
discarded (update() skips finished sequences). Requests with penalties, logprobs or n > 1 need
their tokens on the host before the next step: while any is live, steps run synchronously. So
do speculating steps (their proposals need the last token); steps of a speculating engine with
no proposal to verify overlap as usual (engine/speculative/speculator.py, `in_sight`).

A grammar request's matcher (engine/grammar.py) advances with each of its tokens here; a sequence
whose grammar is complete finishes with "stop". Its bitmask row for step N+1 needs step N's token,
so a step with constrained sequences splits its launch around the read-back:

    launch N+1's forward | resolve N (matchers advance) | start filling N+1's bitmasks on a worker
    thread | update N+1 with placeholders || next step: schedule N+2 | N+1's bitmasks done: launch
    its sampling | launch N+2's forward | ...

so the bitmask fill runs beside the scheduler's Python work (synchronous steps fill it while the
forward pass runs).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from dataclasses import dataclass

from hearth.engine.block_manager import BlockManager
from hearth.engine.config import EngineConfig
from hearth.engine.grammar import GrammarCompiler, GrammarMatchers
from hearth.engine.kv_tiers.setup import open_tiers
from hearth.engine.model_builder import BuiltModel, build_model
from hearth.engine.model_runner import InFlightSample, PendingSample
from hearth.engine.outputs import RequestOutput, RunnerOutput, ScheduleOutput, TokenLogprob
from hearth.engine.phase_timer import PhaseTimer
from hearth.engine.prepare import ModelInfo, PreparedRequest, prepare
from hearth.engine.request_state import RequestState, reports_token_ids
from hearth.engine.sampling_params import SamplingParams
from hearth.engine.scheduler import PLACEHOLDER_TOKEN_ID, Scheduler
from hearth.engine.sequence import FinishReason, Sequence
from hearth.engine.snapshot import EngineSnapshot
from hearth.engine.speculative.proposer_draft import DraftProposer, build_draft, check_draft
from hearth.engine.speculative.speculator import Speculator
from hearth.engine.step_trace import StepTrace

logger = logging.getLogger(__name__)


@dataclass
class _InFlight:
    """A launched step whose sampled ids are still on the device (async scheduling)."""

    sample: InFlightSample | None  # None while its sampling waits for grammar bitmasks
    placeholders: list[tuple[Sequence, int]]  # (sequence, position of its placeholder token)
    pending: PendingSample | None = None


def _needs_sync(params: SamplingParams) -> bool:
    """Penalties read the token history, logprobs and n > 1 forks read the sampled ids."""
    return params.has_penalties or params.logprobs is not None or params.n > 1


_SNAPSHOT_REFRESH_S = 0.2


class LLMEngine:
    def __init__(self, config: EngineConfig | None = None, progress: bool = True) -> None:
        self.config = config or EngineConfig()
        timer = PhaseTimer()
        spec = self.config.speculative
        # The draft first: on CUDA the target's KV budget then counts the draft's memory.
        draft = build_draft(self.config, progress) if spec and spec.method == "draft" else None
        built: BuiltModel = build_model(self.config, progress=progress)
        timer.lap("model")
        if spec is not None:  # with K for the device and precision when none was given
            spec = built.speculative
            self.config = dataclasses.replace(self.config, speculative=spec)
        self.model_name = built.name
        self.tokenizer = built.tokenizer
        self.model_config = built.model_config
        self.max_model_len = built.max_model_len
        self.runner = built.runner
        self.device = str(self.runner.device)
        self.dtype = str(self.runner.dtype).removeprefix("torch.")
        self.precision = built.precision  # e.g. float32+kept-blocks+bf16-gemv
        block_manager = BlockManager(
            built.runner.num_blocks, self.config.block_size, self.config.enable_prefix_caching,
            sliding_window=self.model_config.kv_window,  # every layer windowed: blocks released
        )
        self.prefix_store = open_tiers(self.config, built.resolved, self.model_config,
                                       self.runner.kv_caches, built.precision)
        block_manager.tier = self.prefix_store  # host RAM / disk below the device cache
        eos = set(self.tokenizer.eos_token_ids) | set(self.model_config.eos_token_ids)
        self.scheduler = Scheduler(
            self.config.scheduler_config(self.max_model_len, self.model_config.rope.regime_switch),
            block_manager, sorted(eos),
        )
        self.grammars = self._grammar_compiler(sorted(eos))  # its tokenizer view is built lazily
        timer.lap("scheduler, prefix tiers, grammar compiler")
        self._matchers = GrammarMatchers(sorted(eos)) if self.grammars else None
        self.model_info = ModelInfo(
            self.model_name, self.scheduler.max_len, self.model_config.vocab_size,
            self.tokenizer, self.device, self.dtype, self.grammars,
            self.model_config.architecture, self.model_config.num_params, built.quantization,
            built.fim, getattr(self.tokenizer, "max_token_chars", None),
        )
        self._speculator: Speculator | None = None
        if spec is not None:
            if draft is not None:
                check_draft(draft, built)
            self._speculator = Speculator(spec, self.scheduler.max_len,
                                          DraftProposer(draft.runner, spec.num_speculative_tokens)
                                          if draft else None)
        self._requests: dict[str, RequestState] = {}
        self._lock = threading.Lock()
        self._snapshot: EngineSnapshot | None = None
        self._num_prompt_tokens = 0
        self._num_generation_tokens = 0
        self._trace = StepTrace.from_env()  # HEARTH_STEP_TRACE: benchmarks only
        self._num_finished = 0
        # step() returns RequestDeltas (only what changed) instead of RequestOutputs: set by the
        # server's engine loop (appliance/engine_loop.py); LLM.generate keeps the outputs
        self.emit_deltas = False
        # With emit_deltas, requests added from now on that `reports_token_ids` allows give a
        # TokenRow instead of a RequestDelta, not detokenized here: set by the server's engine
        # process, whose API process detokenizes them (appliance/text_streams.py)
        self.emit_token_ids = False
        overlap = self.config.async_scheduling
        if overlap is None:  # tensor parallelism steps synchronously (engine/distributed/)
            overlap = self.runner.device.type == "cuda" and self.config.tensor_parallel_size == 1
        self._async = overlap
        self._inflight: _InFlight | None = None
        self._sync_request_ids: set[str] = set()  # live requests that need synchronous steps
        self._grammar_request_ids: set[str] = set()  # live requests with a grammar
        logger.info("engine ready in %s", timer.summary())

    def _grammar_compiler(self, eos_token_ids: list[int]) -> GrammarCompiler | None:
        """None when switched off, or with a stand-in tokenizer (dummy weights, no tokenizer)."""
        to_json = getattr(self.tokenizer, "to_json", None)
        if not self.config.structured_output or to_json is None:
            return None
        known = [i for i in eos_token_ids if i < self.tokenizer.vocab_size]  # llguidance's rule
        return GrammarCompiler(to_json, self.model_config.vocab_size, known)

    # -- requests ---------------------------------------------------------------------------

    def prepare(self, prompt: str | list[int], params: SamplingParams,
                where: str = "prompt") -> PreparedRequest:
        """Tokenize and check a request (engine/prepare.py); callers may do it on any thread."""
        return prepare(self.model_info, prompt, params, where)

    def add_request(
        self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None,
        priority: int = 0,
    ) -> None:
        self.add_prepared(request_id, self.prepare(prompt, params or SamplingParams()), priority)

    def add_prepared(self, request_id: str, request: PreparedRequest, priority: int = 0) -> None:
        """Queue a request that `prepare` checked."""
        with self._lock:
            if request_id in self._requests:
                raise ValueError(f"request id {request_id!r} is already in use")
            now = time.monotonic()
            token_ids, params = request.token_ids, request.params
            req = RequestState(request_id, request.prompt, token_ids, params, now)
            req.ids_only = self.emit_token_ids and reports_token_ids(params)
            seq = Sequence(self.scheduler.next_seq_id(), request_id, token_ids, params, priority,
                           arrival_time=now)
            seq.grammar = request.grammar
            seq.share_key, seq.share_weight = request.share_key, request.share_weight
            self.scheduler.add(seq)
            self._requests[request_id] = req
            if _needs_sync(params):
                self._sync_request_ids.add(request_id)
            if request.grammar is not None:
                self._grammar_request_ids.add(request_id)
            self._num_prompt_tokens += len(token_ids)

    def abort_request(self, request_id: str) -> None:
        with self._lock:
            self._snapshot = None  # the blocks come back now: the next reader must see it
            req = self._requests.pop(request_id, None)
            self._sync_request_ids.discard(request_id)
            self._grammar_request_ids.discard(request_id)
            if req is not None:
                seqs = self.scheduler.abort_request(request_id)
                self._drop_matchers([seq.seq_id for seq in seqs])

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests)

    # -- the step ---------------------------------------------------------------------------

    def step(self, finished_only: bool = False) -> list[RequestOutput]:
        """One scheduler/runner/update round. `finished_only`: return only the requests that
        finished (offline generate reads nothing else, and a partial output costs O(tokens))."""
        with self._lock:
            if self._trace is not None:
                started, num_tokens = time.monotonic(), self._num_generation_tokens
            outputs = self._step(finished_only)
            if self.prefix_store is not None:
                self.prefix_store.transfer()  # blocks registered by this step: write through
            now = time.monotonic()
            cached = self._snapshot
            if cached is None or now - cached.taken_at > _SNAPSHOT_REFRESH_S or not self._requests:
                self._snapshot = self._build_snapshot()  # readers on other threads never wait
            if self._trace is not None:
                self._trace.record(started, self.scheduler.num_running,
                                   self._num_generation_tokens - num_tokens)
            return outputs

    def _step(self, finished_only: bool) -> list[RequestOutput]:
        spec = self._speculator
        speculate = spec is not None and spec.wants(self.scheduler.num_running)
        overlap = self._async and not self._sync_request_ids
        if overlap and not speculate:
            return self._step_overlapped(finished_only)
        if self._inflight is not None:
            if overlap and not spec.in_sight(self.scheduler.running):
                return self._step_overlapped(finished_only)  # nothing to verify in sight
            return self._drain(finished_only)  # the next step runs synchronously
        if speculate:
            spec.propose(self.scheduler.running)
            if overlap and not spec.has_proposals:
                return self._step_overlapped(finished_only)  # nothing to verify: no waiting
        schedule = self._schedule()
        if speculate:
            spec.clear()  # the scheduled chunks carry the proposals they verify
        if schedule.is_empty:
            return []
        runner_output = self.runner.execute(schedule, self._matchers)
        num_before = {c.seq.seq_id: c.seq.num_tokens for c in schedule.chunks if c.spec_token_ids}
        updated = self.scheduler.update(schedule, runner_output)
        if num_before:
            spec.record(schedule, runner_output)
        pairs = [(seq, runner_output.logprobs.get(seq.seq_id)) for seq in updated]
        return self._emit(pairs, finished_only, num_before)

    def _schedule(self) -> ScheduleOutput:
        schedule = self.scheduler.schedule()
        if self._trace is not None:
            self._trace.scheduled(schedule.num_batched_tokens, len(schedule.chunks))
        self._drop_matchers(schedule.preempted_seq_ids)  # rebuilt from their tokens when resumed
        if self.prefix_store is not None:
            self.prefix_store.transfer()  # evicted blocks out, tier hits in: before the forward
        return schedule

    def _step_overlapped(self, finished_only: bool) -> list[RequestOutput]:
        """Schedule and launch step N+1 while N runs, then finish N (see the module docstring)."""
        schedule = self._schedule()
        prev = self._inflight
        if prev is not None:
            self._launch_pending(prev)  # N's sampling goes before N+1's forward
        if schedule.is_empty:
            return self._drain(finished_only)
        prev_sample = prev.sample if prev else None
        if self._grammar_request_ids and any(c.seq.grammar is not None for c in schedule.chunks):
            forward = self.runner.launch_forward(schedule, prev_sample)
            outputs = self._resolve(prev, finished_only) if prev else []  # matchers advance
            pending = self.runner.start_sample(forward, self._matchers)
            self._inflight = self._update_with_placeholders(schedule, None, pending)
            return outputs
        sample = self.runner.launch(schedule, prev_sample)
        outputs = self._resolve(prev, finished_only) if prev else []
        self._inflight = self._update_with_placeholders(schedule, sample)
        return outputs

    def _update_with_placeholders(self, schedule: ScheduleOutput, sample: InFlightSample | None,
                                  pending: PendingSample | None = None) -> _InFlight:
        placeholders = {c.seq.seq_id: [PLACEHOLDER_TOKEN_ID] for c in schedule.chunks if c.samples}
        updated = self.scheduler.update(schedule, RunnerOutput(placeholders))
        return _InFlight(sample, [(seq, seq.num_tokens - 1) for seq in updated], pending)

    def _launch_pending(self, inflight: _InFlight) -> None:
        if inflight.pending is not None:
            inflight.sample = self.runner.finish_sample(inflight.pending)
            inflight.pending = None

    def _drain(self, finished_only: bool) -> list[RequestOutput]:
        inflight, self._inflight = self._inflight, None
        if inflight is None:
            return []
        self._launch_pending(inflight)
        return self._resolve(inflight, finished_only)

    def _resolve(self, inflight: _InFlight, finished_only: bool) -> list[RequestOutput]:
        """Read a launched step's ids back (the one sync), put them in place of the placeholders,
        apply stop rules and detokenize."""
        if not inflight.placeholders:
            return []
        token_ids = inflight.sample.read()
        rows = inflight.sample.seq_rows
        for seq, position in inflight.placeholders:
            self.scheduler.resolve_token(seq, position, token_ids[rows[seq.seq_id]])
        return self._emit([(seq, None) for seq, _ in inflight.placeholders], finished_only)

    def _emit(self, tokens: list[tuple[Sequence, list[TokenLogprob] | None]],
              finished_only: bool, num_before: dict[int, int] | None = None,
              ) -> list[RequestOutput]:
        """Detokenize and stop-check each sequence's new token (or tokens: `num_before` holds
        the token counts of sequences that speculated); outputs of the changed requests."""
        changed: dict[str, RequestState] = {}
        for seq, logprobs in tokens:
            req = self._requests.get(seq.request_id)
            if req is None:
                continue  # aborted while its step ran
            num_new = 1
            if num_before:
                num_new = seq.num_tokens - num_before.get(seq.seq_id, seq.num_tokens - 1)
            self._on_token(req, seq, logprobs, num_new)
            changed[req.request_id] = req
        if self.emit_deltas:  # the server: what changed, not the cumulative outputs
            now = time.monotonic()
            deltas = (self._finish_output(req, now) for req in changed.values())
            return [d for d in deltas if d is not None]
        return [self._finish_output(req) for req in changed.values()
                if not finished_only or req.finished]

    def _on_token(self, req: RequestState, seq: Sequence,
                  logprobs: list[TokenLogprob] | None, num_new: int = 1) -> None:
        self._num_generation_tokens += num_new
        if req.add_token(seq, logprobs, self.tokenizer, num_new) and not seq.is_finished:
            self.scheduler.finish(seq, FinishReason.STOP)  # a stop string
        if seq.grammar is not None and not seq.is_finished and self._matchers.advance(seq):
            self.scheduler.finish(seq, FinishReason.STOP)  # the grammar is complete

    def _finish_output(self, req: RequestState, now: float | None = None):
        """The request's RequestOutput, or with `now` (emit_deltas) its RequestDelta or None,
        or an `ids_only` request's TokenRow."""
        finished = req.finished
        if finished:
            req.finished_time = time.monotonic()
            self._requests.pop(req.request_id, None)
            self._sync_request_ids.discard(req.request_id)
            self._grammar_request_ids.discard(req.request_id)
            self._num_finished += 1
            self._drop_matchers([seq.seq_id for seq in req.seqs.values()])
        if now is None:
            return req.output(finished)
        return req.token_row() if req.ids_only else req.delta(finished, now)

    def _drop_matchers(self, seq_ids: list[int]) -> None:
        if self._matchers is not None and len(self._matchers) and seq_ids:
            self._matchers.drop(seq_ids)

    # -- state for the UI and metrics --------------------------------------------------------

    def snapshot(self) -> EngineSnapshot:
        """Engine state for the UI and /metrics, callable from any thread.

        A busy engine refreshes a cached copy after each step (at most every 0.2 s and whenever it
        goes idle), so readers get it without waiting behind a forward pass; an idle engine is
        read directly."""
        cached = self._snapshot
        if cached is not None and time.monotonic() - cached.taken_at <= _SNAPSHOT_REFRESH_S:
            return cached
        if not self._lock.acquire(timeout=_SNAPSHOT_REFRESH_S):
            return cached if cached is not None else self._wait_snapshot()
        try:
            self._snapshot = self._build_snapshot()
            return self._snapshot
        finally:
            self._lock.release()

    def _wait_snapshot(self) -> EngineSnapshot:
        with self._lock:
            self._snapshot = self._build_snapshot()
            return self._snapshot

    def _build_snapshot(self) -> EngineSnapshot:
        return EngineSnapshot(
            scheduler=self.scheduler.snapshot(),
            num_prompt_tokens_total=self._num_prompt_tokens,
            num_generation_tokens_total=self._num_generation_tokens,
            num_requests_finished=self._num_finished,
            model_name=self.model_name,
            device=self.device,
            dtype=self.precision,
            max_model_len=self.model_info.max_model_len,
            taken_at=time.monotonic(),
            spec_decode=self._speculator.stats() if self._speculator else None,
        )

    def shutdown(self) -> None:
        with self._lock:
            for request_id in list(self._requests):
                self.scheduler.abort_request(request_id)
            self._requests.clear()
            self._sync_request_ids.clear()
            self._grammar_request_ids.clear()
            self._inflight = None
            if self._matchers is not None:
                self._matchers.clear()
            if self.prefix_store is not None:
                self.prefix_store.close()  # queued disk writes finish
            if self._trace is not None:
                self._trace.write(self.config.max_num_seqs)
        self.runner.shutdown()

    def check_health(self) -> None:
        """Raise if the engine can no longer step (a tensor-parallel worker died); the async
        layer calls it while idle, so a dead worker ends the service without a request."""
        self.runner.check_health()
