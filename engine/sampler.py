"""Sampler: logits of the sampled rows -> token ids (and logprobs), batched on the model's device.

Order, as in vLLM: penalties -> (logprobs from the penalised logits) -> greedy rows take argmax;
random rows: temperature -> top-k -> top-p -> min-p -> draw.

Drawing uses the exponential race (argmax of p / E with E ~ Exp(1)), equivalent to sampling from p.
A seeded row draws its E from a generator seeded by (seed, sample index, output position), so its
tokens depend on nothing else in the batch: the same across runs, batch positions and preemptions.

Nothing here waits for the GPU until the ids are read back: per-row parameters travel from pinned
memory without blocking, a batch with one temperature divides by one cached device scalar, and
`sample_on_device` leaves the ids on the device (async scheduling reads them a step later).

The fused kernel (kernels/sampling.py, CUDA only): a row with no top-k / top-p / min-p, no
penalties and no logprobs ("plain") is drawn by one pass over its logits instead of ~8 torch
passes. Which path a row takes depends on its own params and the device alone, never on the rest
of the batch: plain rows always take the kernel on CUDA, other rows always the torch path (a batch
of both runs both and keeps each row's own result). So a seeded request is reproducible across
runs, batch positions and batch mates on CUDA; its draws differ from the CPU path's for the same
seed (the kernel keys Philox by the same (seed, sample index, output position) triple, but it is
another random stream). Unseeded plain rows take keys from a per-call counter under the engine
seed. Greedy rows give torch.argmax's token either way. The CPU path is unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hearth.engine.outputs import TokenLogprob
from hearth.engine.sampling_params import SamplingParams

_MASK63 = 2**63 - 1

_NEG_INF = float("-inf")


@dataclass
class SamplingRow:
    """One row to sample: its params, token history (for penalties) and seed coordinates."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    sample_index: int = 0


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[TokenLogprob | None]


class Sampler:
    def __init__(self, vocab_size: int, seed: int = 0, use_kernel: bool | None = None) -> None:
        """use_kernel: None = the fused kernel for plain rows on CUDA; True also elsewhere (tests,
        in Triton's interpreter); False = never (the benchmark's baseline)."""
        self.vocab_size = vocab_size
        self.generator: torch.Generator | None = None
        self.use_kernel = use_kernel
        self._seed = seed
        self._kernel_calls = 0
        self._scalars: dict[tuple[float, str], torch.Tensor] = {}

    def sample(self, logits: torch.Tensor, rows: list[SamplingRow]) -> SamplerOutput:
        """logits: (num_rows, vocab). Reads the ids back (one sync)."""
        logits = logits[:, : self.vocab_size].float()
        if any(r.params.has_penalties for r in rows):
            logits = apply_penalties(logits, rows)
        logprobs = None
        if any(r.params.logprobs is not None for r in rows):
            logprobs = torch.log_softmax(logits, dim=-1)
        token_ids = self._choose(logits, rows)
        token_list = token_ids.tolist()
        return SamplerOutput(token_list, _gather_logprobs(logprobs, token_ids, token_list, rows))

    def sample_on_device(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """The same draw as `sample`, for rows without penalties or logprobs -> (num_rows,) int64
        ids left on the device: nothing here waits for the GPU."""
        return self._choose(logits[:, : self.vocab_size], rows)

    def probs(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """(num_rows, vocab) float32: the distribution each row draws from (temperature, top-k,
        top-p, min-p applied; no penalties). Speculative verification reads it."""
        return self._filtered_probs(logits[:, : self.vocab_size].float(), rows)

    def rng(self, device: torch.device) -> torch.Generator:
        """The engine-seeded generator unseeded draws use on `device`."""
        if self.generator is None:
            self.generator = torch.Generator(device=device).manual_seed(self._seed)
        return self.generator

    def _kernel_on(self, logits: torch.Tensor) -> bool:
        return self.use_kernel if self.use_kernel is not None else logits.is_cuda

    def _choose(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        plain = [_is_plain(r.params) for r in rows] if self._kernel_on(logits) else []
        if plain and all(plain):
            return self._race(logits, rows)  # reads the model's dtype: no float32 copy
        token_ids = self._choose_torch(logits.float(), rows)
        if not any(plain):
            return token_ids
        is_plain = _to_device(plain, torch.bool, logits.device)
        return torch.where(is_plain, self._race(logits, rows), token_ids)

    def _race(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """The fused kernel's draw for every row (greedy rows: argmax)."""
        from hearth.kernels.sampling import exponential_race

        self._kernel_calls += 1
        call_key = _mix64(_mix64(self._seed) ^ self._kernel_calls)
        keys = [_row_seed(r) if r.params.seed is not None else (call_key + i) & _MASK63
                for i, r in enumerate(rows)]
        temps = [0.0 if r.params.greedy else r.params.temperature for r in rows]
        device = logits.device
        return exponential_race(logits, _to_device(temps, torch.float32, device),
                                _to_device(keys, torch.int64, device))

    def _choose_torch(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        greedy_rows = [r.params.greedy for r in rows]
        if all(greedy_rows):
            return logits.argmax(dim=-1)
        probs = self._filtered_probs(logits, rows)  # (num_rows, vocab)
        noise = self._exponential_noise(probs, rows)
        drawn = (probs / noise).argmax(dim=-1)
        if not any(greedy_rows):
            return drawn
        is_greedy = _to_device(greedy_rows, torch.bool, logits.device)
        return torch.where(is_greedy, logits.argmax(dim=-1), drawn)

    def _filtered_probs(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        device = logits.device
        temps = [r.params.temperature or 1.0 for r in rows]
        if all(t == temps[0] for t in temps):
            logits = logits / self._scalar(temps[0], device)  # (1, 1): a true division, as below
        else:
            logits = logits / _to_device(temps, torch.float32, device)[:, None]
        if any(r.params.top_k > 0 for r in rows):
            logits = _top_k(logits, [r.params.top_k for r in rows])
        if any(r.params.top_p < 1.0 for r in rows):
            logits = _top_p(logits, _to_device([r.params.top_p for r in rows], torch.float32,
                                               device))
        probs = torch.softmax(logits, dim=-1)
        if any(r.params.min_p > 0 for r in rows):
            min_p = _to_device([r.params.min_p for r in rows], torch.float32, device)
            threshold = probs.max(dim=-1, keepdim=True).values * min_p[:, None]
            probs = torch.where(probs < threshold, 0.0, probs)
        return probs

    def _scalar(self, value: float, device: torch.device) -> torch.Tensor:
        """A cached (1, 1) float32 device tensor: a CPU scalar would make CUDA multiply by the
        reciprocal, which rounds differently from the per-row division."""
        key = (value, str(device))
        if key not in self._scalars:
            self._scalars[key] = torch.tensor([[value]], dtype=torch.float32, device=device)
        return self._scalars[key]

    def _exponential_noise(self, probs: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        noise = torch.empty_like(probs).exponential_(generator=self.rng(probs.device))
        for i, row in enumerate(rows):
            if row.params.seed is not None and not row.params.greedy:
                gen = torch.Generator(device=probs.device).manual_seed(_row_seed(row))
                noise[i].exponential_(generator=gen)
        return noise


def _is_plain(p: SamplingParams) -> bool:
    """A row the fused kernel draws: temperature (or greedy) only."""
    return (p.top_k <= 0 and p.top_p >= 1.0 and p.min_p <= 0 and not p.has_penalties
            and p.logprobs is None)


def _mix64(x: int) -> int:
    """splitmix64's finaliser, kept in 63 bits: well-spread keys from small counters."""
    z = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) & _MASK63


def _row_seed(row: SamplingRow) -> int:
    key = (row.params.seed, row.sample_index, len(row.output_token_ids))
    # A stable mix (Python's hash of ints is stable; keep it in 63 bits for manual_seed).
    return (key[0] * 1_000_003 + key[1] * 7919 + key[2]) % (2**63 - 1)


def _to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host list on `device` without blocking: staged in pinned memory on CUDA (the
    caching host allocator keeps the staging block until the copy has run)."""
    host = torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)


def _top_k(logits: torch.Tensor, ks: list[int]) -> torch.Tensor:
    vocab = logits.shape[-1]
    k = _to_device([k if 0 < k < vocab else vocab for k in ks], torch.int64, logits.device)
    sorted_logits = logits.sort(dim=-1, descending=True).values
    kth = sorted_logits.gather(-1, (k - 1)[:, None])  # (num_rows, 1)
    return logits.masked_fill(logits < kth, _NEG_INF)


def _top_p(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # probability of the tokens ranked above
    drop_sorted = mass_before >= top_p[:, None]  # keep the smallest prefix reaching top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, _NEG_INF)


def apply_penalties(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Repetition penalty over prompt + output (HF/vLLM rule), presence/frequency over output."""
    logits = logits.clone()
    vocab = logits.shape[-1]
    for i, row in enumerate(rows):
        p = row.params
        if not p.has_penalties:
            continue
        out_ids = _to_device(row.output_token_ids, torch.int64, logits.device)
        counts = torch.bincount(out_ids, minlength=vocab)[:vocab].to(logits.dtype)
        if p.repetition_penalty != 1.0:
            seen = counts > 0
            seen[_to_device(row.prompt_token_ids, torch.int64, logits.device)] = True
            penalised = torch.where(
                logits[i] > 0, logits[i] / p.repetition_penalty, logits[i] * p.repetition_penalty
            )
            logits[i] = torch.where(seen, penalised, logits[i])
        logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0)
    return logits


def _gather_logprobs(
    logprobs: torch.Tensor | None, token_tensor: torch.Tensor, token_ids: list[int],
    rows: list[SamplingRow],
) -> list[TokenLogprob | None]:
    if logprobs is None:
        return [None] * len(rows)
    max_top = max(r.params.logprobs or 0 for r in rows)
    top_vals, top_ids = logprobs.topk(max(max_top, 1), dim=-1)
    chosen = logprobs.gather(-1, token_tensor[:, None])
    chosen_list, top_vals_l, top_ids_l = chosen[:, 0].tolist(), top_vals.tolist(), top_ids.tolist()
    result: list[TokenLogprob | None] = []
    for i, row in enumerate(rows):
        n = row.params.logprobs
        if n is None:
            result.append(None)
            continue
        top = [(t, v) for t, v in zip(top_ids_l[i][:n], top_vals_l[i][:n]) if v != _NEG_INF]
        # (a grammar's masked tokens have no probability: they are not alternatives)
        result.append(TokenLogprob(token_ids[i], chosen_list[i], tuple(t for t, _ in top),
                                   tuple(v for _, v in top)))
    return result
