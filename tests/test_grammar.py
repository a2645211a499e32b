"""Grammar-constrained decoding in the engine (engine/structured_output.py, engine/grammar.py,
engine/logits_processors.py): specs and their limits, compilation and its cache, the batch bitmask
against a reference, matchers rebuilt exactly, and constrained generation on a tiny random model
with every sampling option, n > 1, logprobs, logit_bias and forced preemption."""

from __future__ import annotations

import json
import re
import time

import jsonschema
import numpy as np
import pytest
import torch
from helpers import DEFAULT_GGUF, default_model_dir, save_tiny_model

from hearth import LLM, SamplingParams
from hearth.engine.grammar import GrammarCompiler, GrammarMatchers
from hearth.engine.logits_processors import (
    apply_logit_bias,
    apply_token_bitmask,
    apply_token_bitmask_ref,
)
from hearth.engine.structured_output import (
    MAX_SCHEMA_DEPTH,
    MAX_SPEC_CHARS,
    StructuredOutput,
    StructuredOutputError,
)

PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 12},
                   "age": {"type": "integer", "minimum": 0, "maximum": 150},
                   "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}},
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}


# ---- specs and limits (no model) -----------------------------------------------------------

def test_spec_needs_exactly_one_constraint():
    with pytest.raises(StructuredOutputError, match="exactly one"):
        StructuredOutput()
    with pytest.raises(StructuredOutputError, match="exactly one"):
        StructuredOutput(regex="a", choice=("b",))
    assert StructuredOutput(choice=["x", "y"]).choice == ("x", "y")


@pytest.mark.parametrize("spec, words", [
    (dict(json=[1, 2]), "must be an object"),
    (dict(json={"p": {"type": "string", "pattern": "x" * MAX_SPEC_CHARS}}), "characters"),
    (dict(regex=""), "non-empty"),
    (dict(choice=()), "non-empty list"),
    (dict(choice=("a",) * 1001), "limit is 1000"),
    (dict(grammar="x" * (MAX_SPEC_CHARS + 1)), "characters"),
])
def test_spec_limits(spec, words):
    with pytest.raises(StructuredOutputError, match=words):
        StructuredOutput(source="response_format", **spec)


def test_deep_schema_is_refused_without_recursion():
    schema: dict = {"type": "object"}
    inner = schema
    for _ in range(10_000):  # deeper than Python's recursion limit
        inner["properties"] = {"x": {"type": "object"}}
        inner = inner["properties"]["x"]
    with pytest.raises(StructuredOutputError, match=f"limit is {MAX_SCHEMA_DEPTH}") as info:
        StructuredOutput(json=schema, source="response_format")
    assert info.value.field == "response_format"


def test_key_ignores_source_and_orders_schema_keys():
    a = StructuredOutput(json={"type": "object", "properties": {}}, source="tools")
    b = StructuredOutput(json={"properties": {}, "type": "object"})
    assert a.key == b.key and a.key != StructuredOutput(json_object=True).key


# ---- the bitmask -----------------------------------------------------------------------------

@pytest.mark.parametrize("rows, vocab, width", [(1, 32, 32), (5, 100, 100), (7, 333, 352)])
def test_bitmask_matches_reference(rows, vocab, width):
    gen = torch.Generator().manual_seed(rows * vocab)
    logits = torch.randn(rows, width, generator=gen)
    words = -(-vocab // 32)
    bitmask = torch.randint(-(2**31), 2**31 - 1, (rows, words), dtype=torch.int32, generator=gen)
    bitmask[0, -1] = -(2**31)  # only bit 31 of the last word: the sign bit
    want = apply_token_bitmask_ref(logits, bitmask)
    got = logits.clone()
    apply_token_bitmask(got, bitmask)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_logit_bias_adds_per_row():
    logits = torch.randn(3, 10, generator=torch.Generator().manual_seed(0))
    params = [SamplingParams(logit_bias={1: 5.0, 9: -100}), SamplingParams(),
              SamplingParams(logit_bias={0: 0.5})]
    got = logits.clone()
    apply_logit_bias(got, params)
    want = logits.clone()
    want[0, 1] += 5.0
    want[0, 9] -= 100
    want[2, 0] += 0.5
    torch.testing.assert_close(got, want)


def test_logit_bias_checks():
    with pytest.raises(ValueError, match=r"logit_bias values must be in \[-100, 100\]"):
        SamplingParams(logit_bias={1: 101})
    with pytest.raises(ValueError, match="logit_bias token id"):
        SamplingParams(logit_bias={-1: 1.0})


# ---- compiling, on the default model's vocabulary ------------------------------------------

@pytest.fixture(scope="module")
def compiler():
    from hearth.engine.loader.gguf_loader import load_gguf

    tokenizer = load_gguf(default_model_dir() / DEFAULT_GGUF).tokenizer
    return GrammarCompiler(tokenizer.to_json, 49152, tokenizer.eos_token_ids)


def test_compile_is_cached_by_spec(compiler):
    first = compiler.compile(StructuredOutput(json=PERSON))
    count = compiler.num_compiled
    again = compiler.compile(StructuredOutput(json=json.loads(json.dumps(PERSON)), source="x"))
    assert again is first and compiler.num_compiled == count
    assert compiler.compile(StructuredOutput(json_object=True)) is not first


@pytest.mark.parametrize("spec, words", [
    (dict(json={"type": "frobnicate"}), "invalid JSON schema"),
    (dict(json={"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}), "invalid JSON"),
    (dict(regex="(unclosed"), "invalid regex"),
    (dict(grammar="start: undefined_rule"), "invalid grammar"),
    (dict(grammar="root ::= (("), "invalid grammar"),
])
def test_bad_specs_are_errors_naming_the_field(compiler, spec, words):
    with pytest.raises(StructuredOutputError, match=words) as info:
        compiler.compile(StructuredOutput(source="response_format", **spec))
    assert info.value.field == "response_format"


def test_crafted_specs_compile_or_fail_fast(compiler):
    nasty = [
        StructuredOutput(regex="(a|b|ab){1,200}(c{1,50}){1,50}"),
        StructuredOutput(json={"type": "string", "pattern": "^(x+x+)+y{1,1000}$"}),
        StructuredOutput(json={"$defs": {"n": {"type": "array", "items": {"$ref": "#/$defs/n"}}},
                               "$ref": "#/$defs/n"}),
        StructuredOutput(json={"anyOf": [{"type": "object", "properties": {
            f"p{i}": {"type": "string"} for i in range(j)}} for j in range(60)]}),
    ]
    for spec in nasty:
        started = time.perf_counter()
        try:
            matcher = compiler.compile(spec).matcher()
            matcher.compute_bitmask()
        except StructuredOutputError:
            pass
        assert time.perf_counter() - started < 5.0, spec


def test_gbnf_grammars_are_accepted(compiler):
    compiled = compiler.compile(StructuredOutput(grammar='root ::= "yes" | "no"'))
    matcher = compiled.matcher()
    assert matcher.consume_tokens(compiler.lltokenizer.tokenize_str("yes"))
    assert matcher.is_stopped()


# ---- matchers: rebuilt exactly -----------------------------------------------------------------

class _Seq:
    def __init__(self, seq_id, grammar, output_token_ids):
        self.seq_id, self.grammar, self.output_token_ids = seq_id, grammar, output_token_ids
        self.is_finished = False


def test_dropped_matcher_is_rebuilt_to_the_same_state(compiler):
    grammar = compiler.compile(StructuredOutput(json=PERSON))
    text = '{"name": "Ann", "age": 4'
    tokens = compiler.lltokenizer.tokenize_str(text)
    matchers = GrammarMatchers(eos_token_ids=[2])
    seq = _Seq(0, grammar, [])
    words = -(-49152 // 32)
    matchers.fill([seq], np.zeros((1, words), dtype=np.int32))  # the first step's mask
    for token in tokens:  # fed one token at a time, as decoding does
        seq.output_token_ids.append(token)
        assert not matchers.advance(seq)
    kept = np.zeros((2, words), dtype=np.int32)
    matchers.fill([seq, _Seq(1, None, [5])], kept)
    assert matchers.num_rebuilds == 0 and (kept[1] == -1).all()
    matchers.drop([0])  # as after a preemption
    rebuilt = np.zeros((1, words), dtype=np.int32)
    matchers.fill([seq], rebuilt)
    assert matchers.num_rebuilds == 1
    assert (rebuilt[0] == kept[0]).all() and 0 < np.unpackbits(rebuilt.view(np.uint8)).sum() < 49152
    seq.output_token_ids += compiler.lltokenizer.tokenize_str(', "tags": []}')
    assert matchers.advance(seq)  # the object is complete: nothing but EOS may follow


# ---- generation on a tiny random model ---------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = save_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", "llama")
    return LLM(str(path), device="cpu", dtype="float32", progress=False)


SAMPLING = {
    "greedy": dict(temperature=0),
    "temperature": dict(temperature=1.3),
    "top_p_top_k_min_p": dict(temperature=1.0, top_p=0.8, top_k=20, min_p=0.05),
    "seed_n3_logprobs": dict(temperature=1.0, seed=7, n=3, logprobs=3),
    "penalties": dict(temperature=0.7, repetition_penalty=1.3, frequency_penalty=0.5),
}


def _valid(spec: StructuredOutput, text: str) -> bool:
    if spec.regex is not None:
        return re.fullmatch(spec.regex, text) is not None
    if spec.choice is not None:
        return text in spec.choice
    value = json.loads(text)
    if spec.json is not None:
        jsonschema.validate(value, spec.json)
    return isinstance(value, dict)


@pytest.mark.parametrize("options", SAMPLING.values(), ids=SAMPLING.keys())
def test_constrained_outputs_validate_with_every_sampling_option(tiny, options):
    specs = [StructuredOutput(json=PERSON), StructuredOutput(regex=r"[0-9]{2,4}-[a-c]{3}"),
             StructuredOutput(choice=("red", "green", "blue")), StructuredOutput(json_object=True)]
    params = [SamplingParams(max_tokens=200, structured_output=s, **options) for s in specs]
    outs = tiny.generate([[5, 6, 7, 8]] * len(specs), params, use_tqdm=False)
    for spec, out in zip(specs, outs):
        for sample in out.outputs:
            if sample.finish_reason == "length":
                continue  # ran out of max_tokens: the only excuse
            assert sample.finish_reason == "stop"
            assert _valid(spec, sample.text), (spec.kind, sample.text)
            if sample.logprobs is not None:
                assert all(np.isfinite(e.top_logprobs).all() for e in sample.logprobs)
    bounded = outs[:3]  # every string these three match fits in max_tokens
    assert all(s.finish_reason == "stop" for o in bounded for s in o.outputs)


def test_seeded_constrained_sampling_is_reproducible(tiny):
    params = SamplingParams(temperature=1.0, seed=3, max_tokens=80,
                            structured_output=StructuredOutput(json=PERSON))
    first = tiny.generate([[9, 10, 11]], params, use_tqdm=False)[0].outputs[0].token_ids
    again = tiny.generate([[9, 10, 11], [12, 13]], [params, SamplingParams(max_tokens=5)],
                          use_tqdm=False)[0].outputs[0].token_ids
    assert first == again


def test_preempted_constrained_requests_rebuild_their_matchers(tmp_path):
    path = save_tiny_model(tmp_path / "llama", "llama", seed=1)
    prompts = [torch.randint(3, 500, (40,), generator=torch.Generator().manual_seed(i)).tolist()
               for i in range(6)]
    spec = StructuredOutput(json={"type": "array", "items": {"type": "string"}})
    params = SamplingParams(temperature=0, max_tokens=40, structured_output=spec)
    roomy = LLM(str(path), device="cpu", progress=False).generate(prompts, params, use_tqdm=False)
    tight = LLM(str(path), device="cpu", progress=False, num_kv_blocks=12, block_size=16)
    outs = tight.generate(prompts, params, use_tqdm=False)
    assert tight.engine.scheduler.num_preemptions > 0
    assert tight.engine._matchers.num_rebuilds > 0
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in roomy]
    assert len(tight.engine._matchers) == 0  # every matcher dropped with its request


def test_unconstrained_requests_get_the_same_tokens_beside_constrained_ones(tiny):
    free = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    prompts = [[20, 21, 22, 23], [30, 31], [40, 41, 42]]
    alone = [tiny.generate([p], free, use_tqdm=False)[0].outputs[0].token_ids for p in prompts]
    json_params = SamplingParams(temperature=0, max_tokens=24,
                                 structured_output=StructuredOutput(json=PERSON))
    mixed = tiny.generate(prompts + [[50, 51], [52]], [free] * 3 + [json_params] * 2,
                          use_tqdm=False)
    assert [o.outputs[0].token_ids for o in mixed[:3]] == alone


def test_logit_bias_forces_and_bans_tokens(tiny):
    prompt = [[5, 6, 7]]
    forced = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logit_bias={100: 100})
    assert tiny.generate(prompt, forced, use_tqdm=False)[0].outputs[0].token_ids == [100] * 6
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    first = tiny.generate(prompt, greedy, use_tqdm=False)[0].outputs[0].token_ids[0]
    banned = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True,
                            logit_bias={first: -100})
    assert tiny.generate(prompt, banned, use_tqdm=False)[0].outputs[0].token_ids[0] != first


def test_structured_output_can_be_switched_off(tmp_path):
    path = save_tiny_model(tmp_path / "llama", "llama")
    llm = LLM(str(path), device="cpu", progress=False, structured_output=False)
    with pytest.raises(ValueError, match="no structured output"):
        llm.generate([[1, 2]], SamplingParams(structured_output=StructuredOutput(regex="a+")),
                     use_tqdm=False)


@pytest.mark.parametrize("tight", [False, True], ids=["roomy", "preempting"])
def test_overlapped_steps_give_the_synchronous_tokens(tmp_path, tight):
    """Async scheduling splits a constrained step around the read-back (launch_forward, resolve,
    launch_sample): the same tokens as synchronous steps, with and without preemption."""
    path = save_tiny_model(tmp_path / "llama", "llama", seed=2)
    prompts = [torch.randint(3, 500, (30,), generator=torch.Generator().manual_seed(i)).tolist()
               for i in range(6)]
    specs = [StructuredOutput(json=PERSON), StructuredOutput(regex=r"[a-f]{3,30}"),
             StructuredOutput(json={"type": "array", "items": {"type": "string"}}), None]
    params = [SamplingParams(temperature=0, max_tokens=40, structured_output=specs[i % 4],
                             ignore_eos=specs[i % 4] is None) for i in range(6)]
    params[5] = SamplingParams(temperature=0.9, seed=4, max_tokens=40,
                               structured_output=StructuredOutput(json=PERSON))
    blocks = dict(num_kv_blocks=12, block_size=16) if tight else {}
    runs = []
    for overlap in (False, True):
        llm = LLM(str(path), device="cpu", progress=False, async_scheduling=overlap, **blocks)
        runs.append([o.outputs[0].token_ids
                     for o in llm.generate(prompts, params, use_tqdm=False)])
        assert len(llm.engine._matchers) == 0
        if tight:
            assert llm.engine.scheduler.num_preemptions > 0
    assert runs[0] == runs[1]
