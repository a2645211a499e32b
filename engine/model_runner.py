"""ModelRunner: owns the model, the KV-cache tensors and the sampler; turns a ScheduleOutput into
flat input tensors, runs the forward pass, and samples the positions that need a token.

    chunks  [seq A: 5 prompt tokens] [seq B: 1 decode token] [seq C: 3 tokens of a chunked prefill]
    rows     a0 a1 a2 a3 a4           b7                       c16 c17 c18
    samples              ^a4          ^b7                      (C's prompt is not done: no sample)

Logits are computed only for the sampled rows.
"""

from __future__ import annotations

import torch

from engine.attention import AttentionMetadata, TorchAttention
from engine.model_config import ModelConfig
from engine.outputs import RunnerOutput, ScheduledChunk, ScheduleOutput
from engine.sampler import Sampler, SamplingRow

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[dtype]


def make_attention_backend(device: torch.device):
    """Triton kernels on CUDA, the torch reference elsewhere."""
    if device.type == "cuda":
        try:
            from engine.triton_attention import TritonAttention
        except ImportError:
            return TorchAttention()
        return TritonAttention()
    return TorchAttention()


class ModelRunner:
    def __init__(
        self, model: torch.nn.Module, config: ModelConfig, block_size: int, num_blocks: int,
        seed: int = 0,
    ) -> None:
        self.model = model
        self.config = config
        self.block_size = block_size
        self.num_blocks = num_blocks
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.kv_caches = self._allocate_kv_cache(num_blocks)
        self.backend = make_attention_backend(self.device)
        self.sampler = Sampler(config.vocab_size, seed)

    def _allocate_kv_cache(self, num_blocks: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        shape = (num_blocks, self.block_size, self.config.num_kv_heads, self.config.head_dim)
        return [
            (torch.zeros(shape, dtype=self.dtype, device=self.device),
             torch.zeros(shape, dtype=self.dtype, device=self.device))
            for _ in range(self.config.num_layers)
        ]

    @torch.inference_mode()
    def execute(self, schedule: ScheduleOutput) -> RunnerOutput:
        self._copy_blocks(schedule)
        if schedule.is_empty:
            return RunnerOutput()
        input_ids, positions, meta = self._prepare_inputs(schedule.chunks)
        hidden = self.model(input_ids, positions, self.kv_caches, meta, self.backend)
        sampled = [c for c in schedule.chunks if c.samples]
        if not sampled:
            return RunnerOutput()
        last_rows = _last_rows(meta, schedule.chunks)
        logits = self.model.compute_logits(hidden[last_rows])  # (num_sampled_chunks, vocab)
        return self._sample(logits, sampled)

    def _copy_blocks(self, schedule: ScheduleOutput) -> None:
        if not schedule.block_copies:
            return
        src = torch.tensor([c.src for c in schedule.block_copies], device=self.device)
        dst = torch.tensor([c.dst for c in schedule.block_copies], device=self.device)
        for k_cache, v_cache in self.kv_caches:
            k_cache[dst] = k_cache[src]
            v_cache[dst] = v_cache[src]

    def _prepare_inputs(self, chunks: list[ScheduledChunk]):
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_lens, seq_lens = [], []
        bs = self.block_size
        for chunk in chunks:
            input_ids += chunk.token_ids
            table = chunk.seq.block_ids
            for pos in range(chunk.start_pos, chunk.end_pos):
                slots.append(table[pos // bs] * bs + pos % bs)
            positions += range(chunk.start_pos, chunk.end_pos)
            query_lens.append(chunk.num_new_tokens)
            seq_lens.append(chunk.end_pos)
        max_blocks = max((s + bs - 1) // bs for s in seq_lens)
        tables = [c.seq.block_ids[:max_blocks] + [0] * (max_blocks - len(c.seq.block_ids[:max_blocks]))
                  for c in chunks]
        dev = self.device
        starts = [0]
        for q in query_lens:
            starts.append(starts[-1] + q)
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            query_start_loc=torch.tensor(starts, dtype=torch.int32, device=dev),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
            block_tables=torch.tensor(tables, dtype=torch.int32, device=dev),
            query_lens_cpu=query_lens,
            seq_lens_cpu=seq_lens,
            max_query_len=max(query_lens),
            max_seq_len=max(seq_lens),
        )
        ids = torch.tensor(input_ids, dtype=torch.int64, device=dev)
        pos = torch.tensor(positions, dtype=torch.int64, device=dev)
        return ids, pos, meta

    def _sample(self, logits: torch.Tensor, chunks: list[ScheduledChunk]) -> RunnerOutput:
        rows: list[SamplingRow] = []
        owners: list[int] = []
        row_index: list[int] = []
        for i, chunk in enumerate(chunks):
            seq = chunk.seq
            for k in range(seq.num_samples_to_draw):
                index = seq.sample_index if seq.forked else k
                rows.append(SamplingRow(seq.sampling_params, seq.prompt_token_ids,
                                        seq.output_token_ids, index))
                owners.append(seq.seq_id)
                row_index.append(i)
        if len(rows) != len(chunks):
            logits = logits[torch.tensor(row_index, device=logits.device)]
        result = self.sampler.sample(logits, rows)
        out = RunnerOutput()
        for seq_id, token_id, logprob in zip(owners, result.token_ids, result.logprobs):
            out.sampled_token_ids.setdefault(seq_id, []).append(token_id)
            if logprob is not None:
                out.logprobs.setdefault(seq_id, []).append(logprob)
        return out


def _last_rows(meta: AttentionMetadata, chunks: list[ScheduledChunk]) -> torch.Tensor:
    rows = [end - 1 for end, c in zip(_cumsum(meta.query_lens_cpu), chunks) if c.samples]
    return torch.tensor(rows, dtype=torch.int64, device=meta.slot_mapping.device)


def _cumsum(values: list[int]) -> list[int]:
    out, total = [], 0
    for v in values:
        total += v
        out.append(total)
    return out
