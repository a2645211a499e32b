"""Verification graphs (engine/cuda_graphs.py, query_len = K + 1): the padded layout a captured
speculative step replays, checked on CPU through the Triton kernels in the interpreter.

CUDA graphs need a GPU (tests/test_speculative_gpu.py replays them); here the same static
buffers are loaded and the same forward runs without a graph, so every part of the layout is
checked: sequences padded to K + 1 rows, seq_lens raised so the real rows keep their positions,
padding rows writing nothing (slot -1) and the sampled rows read from the padded layout.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import save_tiny_model

from hearth import LLM, SamplingParams
from hearth.engine.cuda_graphs import DecodeGraphs, DecodeInputs

K = 3


@pytest.fixture
def triton_backend(monkeypatch):
    from hearth.engine import model_builder, model_runner
    from hearth.engine.triton_attention import TritonAttention

    for module in (model_runner, model_builder):
        monkeypatch.setattr(module, "make_attention_backend", lambda device: TritonAttention())
    return TritonAttention


def _eager_verify_graphs(llm: LLM, max_seqs: int) -> tuple[DecodeGraphs, list[int]]:
    """Verification "graphs" on the CPU runner: loaded as on CUDA, run without capture; the
    returned list counts the steps they ran."""
    runner = llm.engine.runner
    graphs = DecodeGraphs(runner.model, runner.kv_caches, runner.backend, max_seqs,
                          runner.max_blocks, runner.block_size, query_len=K + 1)
    calls: list[int] = []

    def replay(num_seqs: int) -> torch.Tensor:
        calls.append(num_seqs)
        return graphs.forward_eagerly(num_seqs)[: num_seqs * graphs.query_len]

    graphs.replay = replay
    runner.verify_graphs = graphs
    return graphs, calls


@pytest.mark.parametrize("budget", [None, 11, 4])
def test_speculative_steps_through_the_padded_layout_match_plain_greedy(tmp_path,
                                                                        triton_backend, budget):
    """Three sequences verify proposals of different lengths (and some none) in one padded
    layout; greedy tokens equal the plain engine's, alone and batched, and no block leaks.
    budget 11: chunked prefill, so a prompt's last few tokens (a chunk that samples its last
    row) or a middle chunk (samples nothing) share a padded step with verifying rows; budget 4:
    steps of prompt chunks alone that sample nothing run through the layout too."""
    path = save_tiny_model(tmp_path / "llama", "llama")
    gen = torch.Generator().manual_seed(3)
    motif = torch.randint(3, 512, (6,), generator=gen).tolist()
    prompts = [motif * 4, torch.randint(3, 512, (9,), generator=gen).tolist(),
               motif * 2 + [7, 8]]
    params = SamplingParams(temperature=0, max_tokens=14, ignore_eos=True)
    kw = dict(device="cpu", dtype="float32", progress=False, block_size=8)
    if budget:
        kw["max_num_batched_tokens"] = budget
    plain = LLM(str(path), **kw)
    want = [o.outputs[0].token_ids for o in plain.generate(prompts, params, use_tqdm=False)]
    spec = LLM(str(path), **kw, speculative={"method": "ngram", "prompt_lookup_min": 1,
                                            "num_speculative_tokens": K})
    _, calls = _eager_verify_graphs(spec, max_seqs=4)
    got = [o.outputs[0].token_ids for o in spec.generate(prompts, params, use_tqdm=False)]
    assert got == want
    alone = [spec.generate([p], params, use_tqdm=False)[0].outputs[0].token_ids
             for p in prompts]
    assert alone == want
    snap = spec.engine.snapshot()
    assert snap.spec_decode.num_drafts > 0
    assert calls and 1 in calls and max(calls) == 3  # alone and batched, through the layout
    assert snap.blocks.num_free == snap.blocks.num_blocks


def test_padding_rows_write_nothing_and_real_rows_keep_their_positions(tmp_path,
                                                                       triton_backend):
    """Loaded directly: two sequences with 2 and 4 new tokens, padded to 4 rows each (and the
    batch to the captured size 4): the cache holds exactly the real rows' K/V, and the real rows'
    logits equal the flat eager forward's."""
    path = save_tiny_model(tmp_path / "qwen3", "qwen3")
    llm = LLM(str(path), device="cpu", dtype="float32", progress=False, block_size=8,
              num_kv_blocks=12)
    runner = llm.engine.runner
    graphs = DecodeGraphs(runner.model, runner.kv_caches, runner.backend, 3, runner.max_blocks,
                          runner.block_size, query_len=K + 1)
    assert graphs.sizes == [1, 2, 3]
    gen = torch.Generator().manual_seed(0)
    # sequence 0: 5 tokens cached, 2 new (positions 5, 6); sequence 1: 2 cached, 4 new (2..5)
    lens = np.array([2, 4])
    tables = torch.tensor([[3, 7, 0], [9, 1, 0]], dtype=torch.int32)
    ids = torch.randint(3, 512, (6,), generator=gen)
    positions = torch.tensor([5, 6, 2, 3, 4, 5])
    slots = torch.tensor([int(tables[s, p // 8]) * 8 + p % 8
                          for s, p in [(0, 5), (0, 6), (1, 2), (1, 3), (1, 4), (1, 5)]])
    seq_lens = torch.tensor([7, 6], dtype=torch.int32)
    for layer in runner.kv_caches:  # the cached context: random K/V
        for cache in layer:
            cache.copy_(torch.randn(cache.shape, generator=gen))
    before = [tuple(c.clone() for c in layer) for layer in runner.kv_caches]

    from hearth.engine.attention import AttentionMetadata

    meta = AttentionMetadata(slots, torch.tensor([0, 2, 6], dtype=torch.int32), seq_lens,
                             tables, lens.tolist(), seq_lens.tolist(), 4, 7)
    with torch.inference_mode():
        hidden = runner.model(ids, positions, runner.kv_caches, meta, runner.backend)
        want = runner.model.compute_logits(hidden)
    written = [tuple(c.clone() for c in layer) for layer in runner.kv_caches]
    for layer, saved in zip(runner.kv_caches, before, strict=True):  # back to the context only
        for cache, old in zip(layer, saved, strict=True):
            cache.copy_(old)

    inputs = DecodeInputs(2, ids, positions, slots, seq_lens, tables, lens)
    graphs.load(inputs)
    assert graphs.seq_lens[:2].tolist() == [7 + 2, 6]  # raised by each sequence's padding
    assert graphs.slot_mapping[:8].tolist()[2:4] == [-1, -1]
    with torch.inference_mode():
        got = graphs.forward_eagerly(2)
    assert got.shape[0] == 8  # 2 sequences x 4 rows
    assert torch.allclose(got[[0, 1, 4, 5, 6, 7]], want, atol=1e-4, rtol=1e-4)
    real = torch.zeros(12 * 8, dtype=torch.bool)
    real[slots] = True
    for layer, expected, old in zip(runner.kv_caches, written, before, strict=True):
        for cache, ref, untouched in zip(layer, expected, old, strict=True):
            flat, ref, untouched = (t.flatten(0, 1) for t in (cache, ref, untouched))
            assert torch.equal(flat[~real], untouched[~real])  # padding wrote nothing
            assert torch.allclose(flat[real], ref[real], atol=1e-5)  # the real rows' K/V


def test_a_sequence_with_more_new_tokens_than_the_graph_rows_is_refused(tmp_path,
                                                                        triton_backend):
    path = save_tiny_model(tmp_path / "llama", "llama")
    llm = LLM(str(path), device="cpu", dtype="float32", progress=False, block_size=8)
    runner = llm.engine.runner
    graphs = DecodeGraphs(runner.model, runner.kv_caches, runner.backend, 2, runner.max_blocks,
                          runner.block_size, query_len=K + 1)
    n = K + 2
    inputs = DecodeInputs(1, torch.zeros(n, dtype=torch.int64), torch.arange(n),
                          torch.arange(n), torch.tensor([n], dtype=torch.int32),
                          torch.zeros(1, runner.max_blocks, dtype=torch.int32), np.array([n]))
    with pytest.raises(ValueError, match="at most 4 new tokens"):
        graphs.load(inputs)
