"""ModelRunner: owns the model, the KV-cache tensors and the sampler; turns a ScheduleOutput into
flat input tensors, runs the forward pass, and samples the positions that need a token.

    chunks  [seq A: 5 prompt tokens] [seq B: 1 decode token] [seq C: 3 tokens of a chunked prefill]
    rows     a0 a1 a2 a3 a4           b7                       c16 c17 c18
    samples              ^a4          ^b7                      (C's prompt is not done: no sample)

Logits are computed only for the sampled rows. Inputs are built with numpy into host buffers
(pinned on CUDA) and copied without blocking; a decode-only batch on CUDA replays a captured graph
(engine/cuda_graphs.py), anything else runs eagerly. Before sampling, logit_bias and grammar
bitmasks change the logits (engine/logits_processors.py); the bitmask is filled on the host while
the forward pass runs on the device.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np
import torch

from hearth.engine.attention import AttentionMetadata, TorchAttention
from hearth.engine.cuda_graphs import DecodeGraphs
from hearth.engine.grammar import GrammarMatchers
from hearth.engine.host_inputs import HostBuffers, StepBatch
from hearth.engine.kv_cache import allocate_kv_cache
from hearth.engine.layers.rope_scaling import longrope_row_offset
from hearth.engine.logits_processors import BitmaskBuffers, apply_logit_bias, apply_token_bitmask
from hearth.engine.model_config import ModelConfig
from hearth.engine.outputs import RunnerOutput, ScheduledChunk, ScheduleOutput
from hearth.engine.sampler import Sampler, SamplingRow
from hearth.engine.speculative.verify import verify_chunks, verify_greedy

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[dtype]


def make_attention_backend(device: torch.device):
    """Triton kernels on CUDA, the torch reference elsewhere."""
    if device.type == "cuda":
        try:
            from hearth.engine.triton_attention import TritonAttention
        except ImportError:
            return TorchAttention()
        return TritonAttention()
    return TorchAttention()


@dataclass(frozen=True)
class InFlightSample:
    """A launched step's sampled ids, still on the device (async scheduling)."""

    token_ids: torch.Tensor | None  # (num_sampled,) int64 on the device; None: nothing sampled
    seq_rows: dict[int, int]  # seq_id -> row of token_ids
    host_ids: torch.Tensor | None = None  # pinned copy, valid once `ready` has completed
    ready: torch.cuda.Event | None = None

    def read(self) -> list[int]:
        """The sampled ids on the host. The copy was enqueued right after sampling: reading it
        must not wait for the next step, which the engine has launched on the same stream."""
        if self.ready is not None:
            self.ready.synchronize()
        return self.host_ids.tolist()


@dataclass(frozen=True)
class LaunchedForward:
    """A forward pass enqueued by `launch_forward`: the sampled chunks' logits, on the device."""

    logits: torch.Tensor | None  # (num_sampled, vocab); None: nothing to sample
    sampled: list[ScheduledChunk]


@dataclass(frozen=True)
class PendingSample:
    """A launched forward whose sampling waits for grammar bitmasks filling on a worker thread."""

    forward: LaunchedForward
    fill: Future | None  # done: the host bitmask holds every sampled row's allowed tokens
    rows: list[SamplingRow]  # taken at the start: the placeholder update moves seeds and histories


@dataclass(frozen=True)
class RunnerLimits:
    """Batch limits the runner sizes its buffers (and CUDA graphs) for."""

    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int = 2048
    enforce_eager: bool = False
    # Speculative decoding: K + 1 rows per sequence for verification graphs, captured for batches
    # up to verify_max_seqs (the speculator's switch-off); 0: none
    verify_tokens: int = 0
    verify_max_seqs: int = 0


class ModelRunner:
    def __init__(
        self, model: torch.nn.Module, config: ModelConfig, block_size: int, num_blocks: int,
        seed: int = 0, limits: RunnerLimits | None = None,
        kv_cache_dtype: torch.dtype | None = None,  # None: the model dtype
    ) -> None:
        self.model = model
        self.config = config
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.limits = limits or RunnerLimits()
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.kv_cache_dtype = kv_cache_dtype or self.dtype
        self.kv_caches = allocate_kv_cache(config, num_blocks, block_size, self.kv_cache_dtype,
                                           self.device)
        self.backend = make_attention_backend(self.device)
        self.sampler = Sampler(config.vocab_size, seed)
        self.max_blocks = -(-self.limits.max_model_len // block_size)
        self._host = HostBuffers(self.limits.max_num_batched_tokens, self.limits.max_num_seqs,
                                 self.max_blocks, self.device.type == "cuda")
        # longrope: sequences past the switch read the long half of the rotary table
        self._host.rope_offset = longrope_row_offset(config.rope, config.max_position_embeddings)
        self._bitmask = BitmaskBuffers(config.vocab_size, self.device)
        self.graphs: DecodeGraphs | None = None
        self.verify_graphs: DecodeGraphs | None = None
        if self.device.type == "cuda" and not self.limits.enforce_eager:
            self.graphs = DecodeGraphs(model, self.kv_caches, self.backend,
                                       self.limits.max_num_seqs, self.max_blocks, block_size)
            self.graphs.capture()
            if self.limits.verify_tokens > 1 and self.limits.verify_max_seqs > 0:
                self._capture_verify_graphs()

    def _capture_verify_graphs(self) -> None:
        """Speculative steps replay these; should a model's K + 1-row forward not capture, the
        server still starts and verifies eagerly (slower, same tokens), and says so."""
        graphs = DecodeGraphs(self.model, self.kv_caches, self.backend,
                              self.limits.verify_max_seqs, self.max_blocks, self.block_size,
                              query_len=self.limits.verify_tokens)
        try:
            graphs.capture()
        except RuntimeError as e:
            logger.warning("verification CUDA graphs not captured (%s): speculative steps run "
                           "eagerly", e)
            torch.cuda.synchronize()
            return
        self.verify_graphs = graphs

    def check_health(self) -> None:
        """Raise if the runner can no longer step (a tensor-parallel worker died)."""

    def shutdown(self) -> None:
        """Release what the runner started (tensor-parallel workers); nothing here."""

    @torch.inference_mode()
    def execute(self, schedule: ScheduleOutput,
                grammars: GrammarMatchers | None = None) -> RunnerOutput:
        """One synchronous step. `grammars`: the matchers of constrained sequences (None: the
        engine has no structured output, and no step looks for grammars)."""
        logits, sampled = self._forward(schedule, None)
        if logits is None:
            return RunnerOutput()
        if any(c.spec_token_ids for c in sampled):
            return self._sample_speculated(logits, sampled, grammars)
        self._process_logits(logits, sampled, grammars)
        return self._sample(logits, sampled)

    def _sample_speculated(self, logits: torch.Tensor, chunks: list[ScheduledChunk],
                           grammars: GrammarMatchers | None) -> RunnerOutput:
        """logits hold K + 1 rows per speculating chunk, one per other chunk: the others sample
        as usual, the speculating ones are verified (engine/speculative/verify.py)."""
        counts = [c.num_sampled_rows for c in chunks]
        first_rows = np.cumsum([0, *counts[:-1]])
        plain = [i for i, c in enumerate(chunks) if not c.spec_token_ids]
        out = RunnerOutput()
        if plain:
            plain_chunks = [chunks[i] for i in plain]
            plain_logits = logits[torch.from_numpy(first_rows[plain]).to(self.device)]
            self._process_logits(plain_logits, plain_chunks, grammars)
            out = self._sample(plain_logits, plain_chunks)
        spec = [i for i, c in enumerate(chunks) if c.spec_token_ids]
        if all(chunks[i].seq.sampling_params.greedy for i in spec):
            # one read-back of every row's argmax; the acceptance is a comparison on the host
            argmax = logits[:, : self.sampler.vocab_size].argmax(dim=-1).tolist()
            for i in spec:
                chunk, first = chunks[i], int(first_rows[i])
                out.sampled_token_ids[chunk.seq.seq_id] = verify_greedy(
                    chunk.spec_token_ids, argmax[first : first + counts[i]])
            return out
        rows = np.concatenate([np.arange(first_rows[i], first_rows[i] + counts[i]) for i in spec])
        spec_chunks = [chunks[i] for i in spec]
        result = verify_chunks(self.sampler, logits[torch.from_numpy(rows).to(self.device)],
                               spec_chunks)
        for chunk, token_ids in zip(spec_chunks, result.token_ids, strict=True):
            out.sampled_token_ids[chunk.seq.seq_id] = token_ids
        return out

    @torch.inference_mode()
    def launch(self, schedule: ScheduleOutput, prev: InFlightSample | None) -> InFlightSample:
        """Async scheduling: enqueue the step and its sampling without waiting for the GPU.

        Input tokens that are still placeholders come from `prev` (the step before, on the same
        stream) by a gather on the device. Every sampled sequence draws one row (no n > 1 parent),
        without penalties or logprobs: the engine runs such requests synchronously."""
        return self.launch_sample(self.launch_forward(schedule, prev))

    @torch.inference_mode()
    def launch_forward(self, schedule: ScheduleOutput,
                       prev: InFlightSample | None) -> LaunchedForward:
        """The first half of `launch`: the forward pass, enqueued."""
        return LaunchedForward(*self._forward(schedule, prev))

    @torch.inference_mode()
    def launch_sample(self, forward: LaunchedForward) -> InFlightSample:
        """The second half: logit_bias, then the sampling, enqueued."""
        if forward.logits is None:
            return InFlightSample(None, {})
        self._process_logits(forward.logits, forward.sampled, None)
        return self._sample_on_device(forward.logits, forward.sampled)

    def start_sample(self, forward: LaunchedForward, grammars: GrammarMatchers) -> PendingSample:
        """The second half with grammars, begun: their bitmasks fill on a worker thread (the
        matchers have seen the step before's tokens); `finish_sample` launches the sampling."""
        seqs = [c.seq for c in forward.sampled]
        fill = grammars.fill_async(seqs, self._bitmask.host(len(seqs))) if seqs else None
        return PendingSample(forward, fill, _sampling_rows(forward.sampled))

    @torch.inference_mode()
    def finish_sample(self, pending: PendingSample) -> InFlightSample:
        logits, sampled = pending.forward.logits, pending.forward.sampled
        if logits is None:
            return InFlightSample(None, {})
        self._process_logits(logits, sampled, None)  # logit_bias
        if pending.fill is not None:
            pending.fill.result()
        apply_token_bitmask(logits, self._bitmask.to_device(len(sampled)))
        return self._sample_on_device(logits, sampled, pending.rows)

    def _sample_on_device(self, logits: torch.Tensor, sampled: list[ScheduledChunk],
                          rows: list[SamplingRow] | None = None) -> InFlightSample:
        rows = _sampling_rows(sampled) if rows is None else rows
        token_ids = self.sampler.sample_on_device(logits, rows)  # (num_sampled,) int64
        seq_rows = {c.seq.seq_id: i for i, c in enumerate(sampled)}
        if self.device.type != "cuda":
            return InFlightSample(token_ids, seq_rows, token_ids)
        host_ids = torch.empty(token_ids.shape, dtype=token_ids.dtype, pin_memory=True)
        host_ids.copy_(token_ids, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return InFlightSample(token_ids, seq_rows, host_ids, ready)

    def _forward(self, schedule: ScheduleOutput, prev: InFlightSample | None):
        """-> (logits of the sampled chunks (num_sampled, vocab) or None, the sampled chunks)."""
        self._copy_blocks(schedule)
        chunks = schedule.chunks
        if not chunks:
            return None, []
        batch = self._host.fill(chunks, self.block_size)
        sampled = [c for c in chunks if c.samples]
        if batch.decode_only and self.graphs and batch.num_seqs <= self.graphs.max_batch_size:
            self.graphs.load(batch.decode_inputs())
            self._host.record_copies()
            self._patch_placeholders(self.graphs.input_ids, batch, chunks, prev)
            logits = self.graphs.replay(batch.num_seqs)  # (num_seqs, vocab), every row
            if len(sampled) != len(chunks):
                logits = logits[torch.from_numpy(batch.sample_rows(chunks)).to(self.device)]
            return logits, sampled
        if self._fits_verify_graph(batch):
            graphs = self.verify_graphs
            graphs.load(batch.decode_inputs())
            self._host.record_copies()
            logits = graphs.replay(batch.num_seqs)  # the padded layout's rows
            if not sampled:  # prompt chunks that sample nothing: their K/V are written
                return None, []
            rows = batch.sample_rows(chunks, stride=graphs.query_len)
            return logits[torch.from_numpy(rows).to(self.device, non_blocking=True)], sampled
        input_ids, positions, meta = self._to_device(batch)
        self._host.record_copies()
        self._patch_placeholders(input_ids, batch, chunks, prev)
        hidden = self.model(input_ids, positions, self.kv_caches, meta, self.backend)
        if not sampled:
            return None, []
        if len(sampled) != len(chunks) or hidden.shape[0] != len(chunks):
            rows = torch.from_numpy(batch.sample_rows(chunks)).to(self.device, non_blocking=True)
            hidden = hidden[rows]
        return self.model.compute_logits(hidden), sampled  # (num_sampled_chunks, vocab)

    def _fits_verify_graph(self, batch: StepBatch) -> bool:
        """A step a verification graph can run: few enough sequences, at most K + 1 new tokens
        each, and every input token known on the host (speculating steps run synchronously)."""
        graphs = self.verify_graphs
        return (graphs is not None and batch.num_seqs <= graphs.max_batch_size
                and int(batch.query_lens.max()) <= graphs.query_len
                and batch.placeholder_rows.size == 0)

    def _process_logits(self, logits: torch.Tensor, chunks: list[ScheduledChunk],
                        grammars: GrammarMatchers | None) -> None:
        """In place, one row per sampled chunk: logit_bias, then the grammar bitmask (filled on
        the host now, while the device still runs the forward pass)."""
        seqs = [c.seq for c in chunks]
        if any(s.sampling_params.logit_bias for s in seqs):
            apply_logit_bias(logits, [s.sampling_params for s in seqs])
        if grammars is not None and any(s.grammar is not None for s in seqs):
            grammars.fill(seqs, self._bitmask.host(len(seqs)))
            apply_token_bitmask(logits, self._bitmask.to_device(len(seqs)))

    def _patch_placeholders(self, input_ids: torch.Tensor, batch: StepBatch,
                            chunks: list[ScheduledChunk], prev: InFlightSample | None) -> None:
        """input_ids[i] = prev's sampled id wherever the host had only a placeholder."""
        dst = batch.placeholder_rows
        if dst.size == 0:
            return
        if prev is None or prev.token_ids is None:
            raise RuntimeError("placeholder input tokens without the step that samples them")
        owner = np.repeat(np.arange(batch.num_seqs), batch.query_lens)[dst]
        index = np.empty((2, dst.size), dtype=np.int64)  # (dst row, src row in prev)
        index[0] = dst
        index[1] = [prev.seq_rows[chunks[i].seq.seq_id] for i in owner.tolist()]
        index_dev = torch.from_numpy(index)
        if self.device.type == "cuda":
            index_dev = index_dev.pin_memory().to(self.device, non_blocking=True)
        input_ids[index_dev[0]] = prev.token_ids[index_dev[1]]

    def _copy_blocks(self, schedule: ScheduleOutput) -> None:
        if not schedule.block_copies:
            return
        src = torch.tensor([c.src for c in schedule.block_copies], device=self.device)
        dst = torch.tensor([c.dst for c in schedule.block_copies], device=self.device)
        for layer in self.kv_caches:
            layer.copy_blocks(src, dst)

    def _to_device(self, batch: StepBatch):
        dev, n, t = self.device, batch.num_seqs, batch.num_tokens
        host = self._host
        meta = AttentionMetadata(
            slot_mapping=host.slot_mapping[:t].to(dev, non_blocking=True),
            query_start_loc=host.query_start_loc[: n + 1].to(dev, non_blocking=True),
            seq_lens=host.seq_lens[:n].to(dev, non_blocking=True),
            block_tables=host.block_tables[:n].to(dev, non_blocking=True),
            query_lens_cpu=batch.query_lens.tolist(),
            seq_lens_cpu=batch.seq_lens.tolist(),
            max_query_len=int(batch.query_lens.max()),
            max_seq_len=int(batch.seq_lens.max()),
        )
        ids = host.input_ids[:t].to(dev, non_blocking=True)
        pos = host.positions[:t].to(dev, non_blocking=True)
        return ids, pos, meta

    def _sample(self, logits: torch.Tensor, chunks: list[ScheduledChunk]) -> RunnerOutput:
        rows: list[SamplingRow] = []
        owners: list[int] = []
        row_index: list[int] = []
        for i, chunk in enumerate(chunks):
            seq = chunk.seq
            for k in range(seq.num_samples_to_draw):
                index = seq.sample_index if seq.forked else k
                rows.append(_sampling_row(seq, index))
                owners.append(seq.seq_id)
                row_index.append(i)
        if len(rows) != len(chunks):
            logits = logits[torch.tensor(row_index, device=logits.device)]
        result = self.sampler.sample(logits, rows)
        out = RunnerOutput()
        triples = zip(owners, result.token_ids, result.logprobs, strict=True)
        for seq_id, token_id, logprob in triples:
            out.sampled_token_ids.setdefault(seq_id, []).append(token_id)
            if logprob is not None:
                out.logprobs.setdefault(seq_id, []).append(logprob)
        return out


def _sampling_rows(sampled: list[ScheduledChunk]) -> list[SamplingRow]:
    return [_sampling_row(c.seq, c.seq.sample_index) for c in sampled]


def _sampling_row(seq, index: int) -> SamplingRow:
    """Token histories are copied (O(length)) only for rows whose penalties or seed need them."""
    p = seq.sampling_params
    if p.has_penalties or (p.seed is not None and not p.greedy):
        return SamplingRow(p, seq.prompt_token_ids, seq.output_token_ids, index)
    return SamplingRow(p, _NO_TOKENS, _NO_TOKENS, index)


_NO_TOKENS: list[int] = []
