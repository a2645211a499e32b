"""The native CPU kernels (kernels/cpu_native.c through kernels/cpu_native.py) and the native
decode step (engine/models/native_decode.py): each kernel against a torch reference on fresh random
inputs (the AVX2 build and the portable C fallback), a row's numbers independent of the rows beside
it, and the default model's greedy answers as the torch path gives them."""

from __future__ import annotations

import subprocess

import pytest
import torch
from helpers import random_q4_blocks

from hearth import LLM, SamplingParams
from hearth.engine.quantization import cpu_int8, gguf_blocks
from hearth.kernels import cpu_native

pytestmark = pytest.mark.skipif(cpu_native.compiler() is None,
                                reason="no C compiler: the engine keeps torch's kernels")


@pytest.fixture(scope="module")
def lib():
    library = cpu_native.load()
    assert library is not None, "a C compiler is here, so the native kernels must build"
    return library


@pytest.fixture(scope="module")
def portable(tmp_path_factory):
    """The same source built without AVX2 / FMA: the C fallback other CPUs run."""
    import ctypes
    import platform

    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("the AVX2 build is the x86 one; this machine builds the fallback already")

    out = tmp_path_factory.mktemp("portable") / "cpu_native_portable.so"
    cc = cpu_native.compiler()
    flags = [f for f in cpu_native._FLAGS if f != "-march=native"]
    subprocess.run([cc, *flags, "-mno-avx2", "-mno-fma", "-o", str(out), str(cpu_native.SOURCE),
                    "-lm"], check=True, capture_output=True)
    library = ctypes.CDLL(str(out))
    cpu_native._declare(library)
    assert library.hearth_native_avx2() == 0
    return library


def _with(library, fn, *args):
    """Run a cpu_native wrapper against another build of the library."""
    saved = cpu_native._state.get("lib")
    cpu_native._state["lib"] = library
    try:
        return fn(*args)
    finally:
        cpu_native._state["lib"] = saved


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1"])
@pytest.mark.parametrize("n,k", [(64, 32), (192, 96), (320, 576), (576, 1536)])
def test_q4_dequantize_is_the_block_reference(lib, qtype, n, k):
    raw = random_q4_blocks(qtype, n, k, torch.Generator().manual_seed(n + k))
    rows = cpu_native.q4_repack(raw, qtype, k)
    assert rows.shape == (n, k // 32 * cpu_native.ROW_BLOCK_BYTES)
    assert torch.equal(cpu_native.q4_dequantize(rows, k), gguf_blocks.dequantize(raw, qtype, k))


@pytest.mark.parametrize("build", ["native", "portable"])
def test_q4_0_rows_keep_extreme_scales_exactly(lib, portable, build):
    """Native rows hold Q4_0's m = -8 d as a float16: exact for subnormal and large d alike."""
    library = lib if build == "native" else portable
    d = torch.tensor([6e-8, 3e-6, 6.1e-5, 0.5, 1000.0, 8188.0]).half()  # subnormal .. largest
    raw = random_q4_blocks("Q4_0", len(d), 32, torch.Generator().manual_seed(1))
    raw[:, 0:2] = d.view(len(d), 1).view(torch.uint8)
    rows = _with(library, cpu_native.q4_repack, raw, "Q4_0", 32)
    assert torch.equal(_with(library, cpu_native.q4_dequantize, rows, 32),
                       gguf_blocks.dequantize(raw, "Q4_0", 32))


@pytest.mark.parametrize("build", ["native", "portable"])
def test_float16_kv_writes_round_as_torch_does(lib, portable, build):
    """The native step's K/V writes into a float16 cache: round to nearest even, as torch's
    .half() rounds the torch path's writes (subnormals, ties, overflow, inf and nan included)."""
    library = lib if build == "native" else portable
    gen = torch.Generator().manual_seed(3)
    edge = torch.tensor([0.0, -0.0, 1.0, 65504.0, 65519.0, 65520.0, -70000.0, 6e-8, 2.98e-8,
                         2.9802322387695312e-08, 5.960464477539063e-08, 1e-9, 6.1e-5,
                         1.0 + 2.0 ** -11, 1.0 + 3 * 2.0 ** -11, float("inf"), -float("inf"),
                         float("nan")])
    x = torch.cat([edge, torch.randn(999, generator=gen) * 10.0 ** torch.randint(
        -8, 5, (999,), generator=gen)])
    out = torch.empty(len(x), dtype=torch.int16)
    library.hearth_f32_to_f16(x.data_ptr(), len(x), out.data_ptr())
    want = x.half()
    got = out.view(torch.float16)
    same = (got.view(torch.int16) == want.view(torch.int16)) | (got.isnan() & want.isnan())
    assert bool(same.all()), x[~same]


def test_the_native_model_keeps_a_float16_kv_cache(native_llm):
    caches = native_llm.engine.runner.kv_caches
    assert {c.key.dtype for c in caches} == {torch.float16}
    _answers(native_llm, CHATS[:1], max_tokens=2)  # the first step binds the caches
    assert native_llm.engine.runner.model.native_decoder.dims.kv_half == 1


def test_q4_0_scale_beyond_float16_is_a_clear_error(lib):
    raw = random_q4_blocks("Q4_0", 2, 64, torch.Generator().manual_seed(2))
    raw[1, 0:2] = torch.tensor([9000.0]).half().view(torch.uint8)  # -8 d = -72000
    with pytest.raises(ValueError, match="1 Q4_0 blocks have a scale above 8188.*"
                                         "HEARTH_NATIVE_CPU=0"):
        cpu_native.q4_repack(raw, "Q4_0", 64)


@pytest.mark.parametrize("build", ["native", "portable"])
@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1"])
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 9])
def test_q4_matmul_matches_the_dequantized_product(lib, portable, build, qtype, m):
    gen = torch.Generator().manual_seed(m * 31 + len(qtype))
    n, k = 96, 576
    raw = random_q4_blocks(qtype, n, k, gen)
    x = torch.randn(m, k, generator=gen)
    ref = x.double() @ gguf_blocks.dequantize(raw, qtype, k).double().t()
    kernel = lib if build == "native" else portable
    rows = _with(kernel, cpu_native.q4_repack, raw, qtype, k)
    y = _with(kernel, cpu_native.q4_matmul, x, rows, n)
    # the inputs are rounded to int16 per block of 32: a relative error of about 1e-5
    assert ((y.double() - ref).abs().max() / ref.abs().max()).item() < 1e-4


def test_a_rows_result_does_not_depend_on_the_other_rows(lib):
    """Batch invariance: a sequence's greedy answer must not change with other users' traffic."""
    gen = torch.Generator().manual_seed(5)
    rows = cpu_native.q4_repack(random_q4_blocks("Q4_1", 128, 576, gen), "Q4_1", 576)
    x = torch.randn(9, 576, generator=gen)
    together = cpu_native.q4_matmul(x, rows, 128)
    for i in range(9):
        alone = cpu_native.q4_matmul(x[i : i + 1], rows, 128)
        assert torch.equal(alone, together[i : i + 1])


@pytest.mark.parametrize("build", ["native", "portable"])
@pytest.mark.parametrize("m", [1, 3])
def test_int8_rows_kernel_and_refined_logits(lib, portable, build, m):
    gen = torch.Generator().manual_seed(m)
    weight = torch.randn(4096, 576, generator=gen) * 0.05
    rows = cpu_int8.quantize_rows(weight, dtype=torch.float32)
    x = torch.randn(m, 576, generator=gen)
    exact = x.double() @ cpu_int8.dequantize_exact(rows).double().t()
    kernel = lib if build == "native" else portable
    approx = _with(kernel, cpu_native.i8_matmul, x, rows.weight, rows.scales)
    # x rounded to int8 per block of 32: about 1% of the logits' spread
    assert ((approx.double() - exact).abs().max() / exact.abs().max()).item() < 0.02
    logits = _with(kernel, cpu_native.i8_logits, x, rows.weight, rows.exact_scales,
                   cpu_int8.REFINED)
    top = exact.topk(cpu_int8.REFINED, dim=1).indices
    assert torch.allclose(logits.gather(1, top).double(), exact.gather(1, top), rtol=1e-5,
                          atol=1e-5)  # the top logits in float32
    assert torch.equal(logits.argmax(1), exact.argmax(1))
    rest = torch.ones_like(logits, dtype=torch.bool).scatter_(1, top, False)
    assert torch.equal(logits[rest], approx[rest])  # the others: the kernel's


def test_the_callers_denormal_mode_is_left_alone(lib):
    """The decode flushes denormals inside its threads only (MXCSR restored)."""
    llm = LLM(device="cpu", dtype="float32", gguf_keep_quantized=True, progress=False)
    assert llm.engine.precision == "float32+kept-blocks+native"
    llm.generate("Hello", SamplingParams(max_tokens=2), use_tqdm=False)
    tiny = torch.tensor([1e-39]) * torch.tensor([1.0])
    assert tiny.item() != 0.0


@pytest.fixture(scope="module")
def native_llm(lib):
    llm = LLM(device="cpu", dtype="float32", gguf_keep_quantized=True, progress=False,
              enable_prefix_caching=False)
    assert llm.engine.precision == "float32+kept-blocks+native"
    assert llm.engine.runner.model.native_decoder is not None
    return llm


CHATS = ["What is the capital of France?", "Write a haiku about the sea.",
         "List three prime numbers.", "Explain gravity in one sentence."]


def _answers(llm, prompts, max_tokens=32, **params):
    sp = SamplingParams(temperature=0, max_tokens=max_tokens, **params)
    return [o.outputs[0].text for o in llm.chat([[{"role": "user", "content": p}]
                                                  for p in prompts], sp, use_tqdm=False)]


def test_default_model_greedy_answers_match_the_torch_path(native_llm):
    """The torch reference with the same kept blocks (each step dequantizes them): the native
    decode gives the same greedy tokens."""
    reference = LLM(device="cpu", dtype="float32", gguf_keep_quantized=True, cpu_native=False,
                    progress=False, enable_prefix_caching=False)
    assert reference.engine.precision == "float32+kept-blocks"
    want = [_answers(reference, [p])[0] for p in CHATS[:2]]
    assert [_answers(native_llm, [p])[0] for p in CHATS[:2]] == want
    assert want[0].startswith("The capital of France is Paris")


def test_decode_hidden_states_match_the_torch_forward(native_llm):
    """One decode step's final hidden state through the native call and through the torch
    layers (the same kept blocks, the same KV cache), on the default model."""
    engine = native_llm.engine
    model = engine.runner.model
    captured = {}
    forward = type(model).forward

    def both(self, input_ids, positions, kv_caches, meta, backend):
        decoder = self.native_decoder
        if decoder is None or not decoder.applies(meta) or meta.max_query_len != 1:
            return forward(self, input_ids, positions, kv_caches, meta, backend)
        self.native_decoder = None
        try:  # the torch path writes the same K/V into the same slots first
            captured["torch"] = forward(self, input_ids, positions, kv_caches, meta, backend)
        finally:
            self.native_decoder = decoder
        captured["native"] = decoder(input_ids, positions, kv_caches, meta)
        return captured["native"]

    model.forward = both.__get__(model)
    try:
        _answers(native_llm, CHATS[2:3], max_tokens=4)
    finally:
        del model.forward
    diff = (captured["native"] - captured["torch"]).abs().max().item()
    assert diff < 1e-3 * captured["torch"].abs().max().item(), diff


def test_a_batch_gives_each_sequence_its_answer_alone(native_llm):
    alone = [_answers(native_llm, [p])[0] for p in CHATS]
    assert _answers(native_llm, CHATS) == alone


def test_ngram_speculation_keeps_greedy_answers(lib):
    """Verification rows run through the same native step as decode rows: identical tokens."""
    prompt = ("Repeat this list exactly: apples, pears, plums, cherries, grapes, lemons, limes, "
              "apples, pears, plums, cherries, grapes, lemons, limes.")
    plain = LLM(device="cpu", dtype="float32", gguf_keep_quantized=True, progress=False)
    spec = LLM(device="cpu", dtype="float32", gguf_keep_quantized=True, progress=False,
               speculative="ngram")
    want = _answers(plain, [prompt], max_tokens=40)
    assert _answers(spec, [prompt], max_tokens=40) == want
    assert spec.engine.snapshot().spec_decode is not None


def test_without_the_library_the_engine_keeps_torchs_kernels(monkeypatch):
    monkeypatch.setenv("HEARTH_NATIVE_CPU", "0")
    assert cpu_native._load() is None
    llm = LLM(device="cpu", dtype="float32", gguf_keep_quantized=True, cpu_native=False,
              cpu_bf16_gemv=True, progress=False)
    assert llm.engine.precision == "float32+kept-blocks+bf16-gemv"
    assert llm.engine.runner.model.native_decoder is None


@pytest.fixture
def prebuilt(tmp_path, monkeypatch):
    """A prebuilt AVX2 library as `hearth bundle` puts it in the wheel, at cpu_native.PREBUILT;
    the loaded library is forgotten before and after."""
    import platform

    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("the prebuilt kernels are x86-64 AVX2 code")
    path = cpu_native.build_prebuilt(tmp_path / "cpu_native_prebuilt.so")
    monkeypatch.setattr(cpu_native, "PREBUILT", path)
    monkeypatch.delitem(cpu_native._state, "lib", raising=False)
    return path


def test_without_a_compiler_the_prebuilt_build_runs(prebuilt, monkeypatch):
    if not cpu_native.prebuilt_fits():
        pytest.skip("this CPU lacks AVX2, FMA or F16C")
    monkeypatch.setattr(cpu_native, "compiler", lambda: None)
    library = cpu_native.load()
    assert library is not None and library._name == str(prebuilt)
    assert library.hearth_native_source() == cpu_native._source_sha256().encode()
    raw = random_q4_blocks("Q4_1", 64, 96, torch.Generator().manual_seed(4))
    rows = cpu_native.q4_repack(raw, "Q4_1", 96)
    x = torch.randn(3, 96, generator=torch.Generator().manual_seed(5))
    want = x @ gguf_blocks.dequantize(raw, "Q4_1", 96).T
    torch.testing.assert_close(cpu_native.q4_matmul(x, rows, 64), want, rtol=1e-3, atol=1e-3)


def test_a_prebuilt_build_of_another_source_is_not_loaded(prebuilt, monkeypatch):
    monkeypatch.setattr(cpu_native, "compiler", lambda: None)
    monkeypatch.setattr(cpu_native, "_source_sha256", lambda: "0" * 64)
    assert cpu_native.load() is None


def test_a_cpu_without_avx2_does_not_take_the_prebuilt_build(prebuilt, monkeypatch):
    monkeypatch.setattr(cpu_native, "compiler", lambda: None)
    monkeypatch.setattr(cpu_native, "_cpu_flags", lambda: b"flags\t\t: fpu sse sse2 avx")
    assert not cpu_native.prebuilt_fits()
    assert cpu_native.load() is None


def test_the_build_is_cached_by_source_and_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("HEARTH_NATIVE_CACHE", str(tmp_path))
    cc = cpu_native.compiler()
    first = cpu_native._build(cc)
    mtime = first.stat().st_mtime_ns
    assert cpu_native._build(cc) == first and first.stat().st_mtime_ns == mtime  # reused
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary left behind


def test_a_cache_folder_others_can_write_is_not_used(tmp_path, monkeypatch):
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    monkeypatch.setenv("HEARTH_NATIVE_CACHE", str(shared))
    with pytest.raises(OSError, match="no writable cache folder"):
        cpu_native._build(cpu_native.compiler())
