"""llguidance against xgrammar on the host: what decided engine/grammar.py's library.

For the embedded model's tokenizer (SmolLM2, 49,152 ids), each library:

    tokenizer  build its tokenizer view once (per model, at start-up)
    compile    64 JSON schemas, each new to it (bench/structured.py's), and one large schema
               (an enum of 2,000 strings beside 40 nested objects): the serving layer compiles
               on the request's thread; the cache is by schema, so a new schema pays this
    mask       per token, a matcher walks a valid answer of each schema: fill the next-token
               bitmask, then accept the token; the mean over all tokens (the engine's host
               work per constrained sequence and step)

xgrammar is not a Hearth dependency; install it beside the venv to run this:

    .venv/bin/uv pip install --target /tmp/xg --no-deps "xgrammar>=0.2,<0.3" apache-tvm-ffi
    PYTHONPATH=/tmp/xg .venv/bin/python bench/grammar_libs.py [--json out.json]

Timings on a shared CPU are noisy: compare the two libraries within one run.
"""

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from structured import schema  # noqa: E402

SEPARATORS = (", ", ": ")  # engine/grammar.py's JSON style
_VALUES = {"string": "a", "integer": 7, "number": 2.5, "boolean": True}


def instance(s: dict):
    """A valid value of one of bench/structured.py's schemas (or the large one)."""
    if "enum" in s:
        return s["enum"][0]
    kind = s["type"]
    if kind == "object":
        return {k: instance(v) for k, v in s["properties"].items()}
    if kind == "array":
        return [instance(s["items"])]
    return _VALUES[kind]


def large_schema() -> dict:
    nested: dict = {"type": "string"}
    for depth in range(40):
        nested = {"type": "object", "properties": {f"d{depth}": nested},
                  "required": [f"d{depth}"], "additionalProperties": False}
    return {"type": "object", "additionalProperties": False, "required": ["pick", "deep"],
            "properties": {"pick": {"enum": [f"option-{i}" for i in range(2000)]},
                           "deep": nested}}


def load_tokenizer():
    """(tokenizer.json text, tokenizers.Tokenizer, eos id) of the embedded model."""
    from tokenizers import Tokenizer

    from hearth.engine.catalog import resolve_model
    from hearth.engine.loader.gguf_loader import load_gguf

    hearth_tok = load_gguf(resolve_model(None).path).tokenizer
    text = hearth_tok.to_json()
    return text, Tokenizer.from_str(text), hearth_tok.eos_token_ids[0]


class Llguidance:
    name = "llguidance"

    def __init__(self, tok_json: str, vocab: int, eos: int) -> None:
        import llguidance

        self.ll = llguidance
        self.tokenizer = llguidance.LLTokenizer(tok_json, n_vocab=vocab, eos_token=[eos])
        self.words = -(-vocab // 32)

    def compile(self, s: dict):
        text = self.ll.LLMatcher.grammar_from_json_schema(
            s, defaults={"whitespace_flexible": False, "item_separator": SEPARATORS[0],
                         "key_separator": SEPARATORS[1]})
        matcher = self.ll.LLMatcher(self.tokenizer, text, log_level=0)
        assert not matcher.is_error(), matcher.get_error()
        return matcher

    def walk(self, compiled, tokens: list[int]) -> None:
        import numpy as np
        from llguidance.numpy import fill_next_token_bitmask

        matcher, mask = compiled.deep_copy(), np.zeros((1, self.words), dtype=np.int32)
        for token in tokens:
            fill_next_token_bitmask(matcher, mask, 0)
            assert matcher.consume_token(token), matcher.get_error()


class Xgrammar:
    name = "xgrammar"

    def __init__(self, tok_json: str, vocab: int, eos: int) -> None:
        import tokenizers
        import xgrammar
        from transformers import PreTrainedTokenizerFast

        self.xg = xgrammar
        hf = PreTrainedTokenizerFast(tokenizer_object=tokenizers.Tokenizer.from_str(tok_json))
        info = xgrammar.TokenizerInfo.from_huggingface(hf, vocab_size=vocab, stop_token_ids=[eos])
        self.compiler = xgrammar.GrammarCompiler(info, cache_enabled=False)
        self.vocab = vocab

    def compile(self, s: dict):
        return self.compiler.compile_json_schema(json.dumps(s), any_whitespace=False,
                                                 separators=SEPARATORS)

    def walk(self, compiled, tokens: list[int]) -> None:
        matcher = self.xg.GrammarMatcher(compiled)
        mask = self.xg.allocate_token_bitmask(1, self.vocab)
        for token in tokens:
            matcher.fill_next_token_bitmask(mask)
            assert matcher.accept_token(token)


def measure(lib_class, tok_json: str, tok, vocab: int, eos: int, schemas: list) -> dict:
    t0 = time.perf_counter()
    lib = lib_class(tok_json, vocab, eos)
    out = {"tokenizer_s": time.perf_counter() - t0}
    _progress(lib.name, out)
    t0 = time.perf_counter()
    compiled = [lib.compile(s) for s in schemas]
    out["compile_64_ms_each"] = 1e3 * (time.perf_counter() - t0) / len(schemas)
    _progress(lib.name, out)
    t0 = time.perf_counter()
    lib.compile(large_schema())
    out["compile_large_ms"] = 1e3 * (time.perf_counter() - t0)
    _progress(lib.name, out)
    answers = [tok.encode(json.dumps(instance(s), separators=(",", ": ")).replace(",", ", "),
                          add_special_tokens=False).ids for s in schemas]
    t0 = time.perf_counter()
    for grammar, tokens in zip(compiled, answers):
        lib.walk(grammar, tokens)
    out["mask_us_per_token"] = 1e6 * (time.perf_counter() - t0) / sum(map(len, answers))
    out["tokens"] = sum(map(len, answers))
    return out


def _progress(name: str, row: dict) -> None:
    print(f"{name:11s} " + "  ".join(f"{k} {v:.3g}" for k, v in row.items()), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the results here too")
    args = parser.parse_args()
    tok_json, tok, eos = load_tokenizer()
    vocab = tok.get_vocab_size()
    schemas = [schema(i) for i in range(64)]
    results = {lib.name: measure(lib, tok_json, tok, vocab, eos, schemas)
               for lib in (Llguidance, Xgrammar)}
    for name, row in results.items():
        _progress(name, row)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
