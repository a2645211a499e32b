"""Grammar-constrained decoding with llguidance: compile a StructuredOutput once, match per seq.

    StructuredOutput ── GrammarCompiler.compile ──► CompiledGrammar        any thread; LRU cache
                        (the serving layer, through engine/prepare.py)     keyed by the spec
    CompiledGrammar ── GrammarMatchers ──► one matcher per sequence        the engine thread
                        advance(seq): feed the tokens it has not seen yet
                        fill(seqs, bitmask): every row's allowed tokens, in parallel (LLExecutor)

A sequence's matcher is always "a fresh matcher fed the sequence's output tokens": when it is
missing (a forked sample, a sequence preempted and recomputed) it is rebuilt from those tokens,
so preemption, recompute and n > 1 need nothing else. Bit j of word w of a bitmask row allows
token 32 * w + j (llguidance's layout, which engine/logits_processors.py applies on the device).

llguidance was picked over xgrammar by measurement (bench/grammar_libs.py, docs/
structured_output.md): a new schema compiles about 3x faster (it is compiled while its request
waits), its parser limits bound a crafted grammar's work, it reads GBNF and Lark, and the wheel has
no dependencies; xgrammar fills a mask faster per token, so the rows are filled in parallel while
the forward pass runs.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from hearth.engine.structured_output import StructuredOutput, StructuredOutputError

logger = logging.getLogger("hearth.engine")

# JSON as models write it: ", " and ": ", no free whitespace (a small model could loop on
# newlines forever otherwise).
_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_CACHE_SIZE = 256
_MAX_GRAMMAR_SIZE = 200_000  # llguidance's symbols in the compiled grammar (its default: 500k)


class CompiledGrammar:
    """A checked grammar; `matcher()` gives a fresh matcher for one sequence (a cheap copy)."""

    def __init__(self, spec: StructuredOutput, template: Any) -> None:
        self.spec = spec
        self._template = template  # an llguidance LLMatcher in its initial state

    def matcher(self) -> Any:
        return self._template.deep_copy()


class GrammarCompiler:
    """Compiles StructuredOutputs for one model's vocabulary; thread-safe, cached by spec.

    `tokenizer_json` gives the tokenizer as HF tokenizer.json text; the llguidance tokenizer is
    built from it on first use (about 0.2 s for a 50k vocabulary)."""

    def __init__(self, tokenizer_json: Callable[[], str], vocab_size: int,
                 eos_token_ids: Sequence[int], cache_size: int = _CACHE_SIZE) -> None:
        self.vocab_size = vocab_size
        self.eos_token_ids = list(eos_token_ids)
        self._tokenizer_json = tokenizer_json
        self._lltokenizer: Any = None
        self._cache: OrderedDict[str, CompiledGrammar] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self.num_compiled = 0

    def __getstate__(self) -> dict[str, Any]:
        """Pickled without its lock, cache and llguidance tokenizer (the engine process gets the
        compiler this way: appliance/engine_process.py); they are rebuilt on first use."""
        state = dict(self.__dict__)
        state.update(_lock=None, _lltokenizer=None, _cache=None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
        self._cache = OrderedDict()

    @property
    def lltokenizer(self) -> Any:
        with self._lock:
            if self._lltokenizer is None:
                import llguidance

                self._lltokenizer = llguidance.LLTokenizer(
                    self._tokenizer_json(), n_vocab=self.vocab_size,
                    eos_token=self.eos_token_ids or None)
            return self._lltokenizer

    def compile(self, spec: StructuredOutput) -> CompiledGrammar:
        """The grammar for `spec`; StructuredOutputError (a ValueError) naming the problem."""
        with self._lock:
            hit = self._cache.get(spec.key)
            if hit is not None:
                self._cache.move_to_end(spec.key)
                return hit
        compiled = CompiledGrammar(spec, self._build(spec))
        with self._lock:
            self._cache[spec.key] = compiled
            self.num_compiled += 1
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return compiled

    def _build(self, spec: StructuredOutput) -> Any:
        import llguidance

        grammar = _grammar_text(spec)
        limits = llguidance.LLParserLimits(max_grammar_size=_MAX_GRAMMAR_SIZE, verbose_errors=False)
        # The constructor compiles the grammar without the GIL; it never raises, errors are state.
        matcher = llguidance.LLMatcher(self.lltokenizer, grammar, log_level=0, limits=limits)
        if matcher.is_error():
            raise StructuredOutputError(
                f"{spec.source}: invalid {_NAMES[spec.kind]}: {_short(matcher.get_error())}",
                spec.source)
        return matcher


_NAMES = {"json": "JSON schema", "json_object": "JSON object", "regex": "regex",
          "choice": "choice", "grammar": "grammar"}


def _grammar_text(spec: StructuredOutput) -> str:
    """The llguidance grammar definition of a spec."""
    from llguidance import LLMatcher
    from llguidance.gbnf_to_lark import any_to_lark

    kind = spec.kind
    try:
        if kind == "json":
            return LLMatcher.grammar_from_json_schema(spec.json, defaults=_JSON_OPTIONS)
        if kind == "json_object":
            return LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=_JSON_OPTIONS)
        if kind == "regex":
            return LLMatcher.grammar_from_regex(spec.regex)
        if kind == "choice":
            return LLMatcher.grammar_from_lark(
                "start: " + " | ".join(json.dumps(c) for c in spec.choice))
        return LLMatcher.grammar_from_lark(any_to_lark(spec.grammar))
    except Exception as error:  # noqa: BLE001 - GBNF conversion raises anything on bad text
        raise StructuredOutputError(
            f"{spec.source}: invalid {_NAMES[kind]}: {_short(str(error))}", spec.source) from None


def _short(message: str, limit: int = 300) -> str:
    message = message.strip().splitlines()[0] if message.strip() else "unknown error"
    return message if len(message) <= limit else message[: limit - 3] + "..."


@dataclass
class _Tracked:
    matcher: Any
    num_consumed: int  # output tokens fed so far


class GrammarMatchers:
    """The engine thread's matchers, one per constrained sequence, keyed by seq_id.

    Sequences are duck-typed: `seq_id`, `grammar` (a CompiledGrammar), `token_ids`, `num_tokens`,
    `num_prompt_tokens` and `is_finished`."""

    def __init__(self, eos_token_ids: Sequence[int], num_threads: int | None = None) -> None:
        self.eos_token_ids = list(eos_token_ids)
        self._num_threads = num_threads
        self._executor: Any = None
        self._tracked: dict[int, _Tracked] = {}
        self._worker: ThreadPoolExecutor | None = None
        self.num_rebuilds = 0  # matchers rebuilt from a sequence's tokens (fork, preemption)

    def __len__(self) -> int:
        return len(self._tracked)

    def advance(self, seq: Any) -> bool:
        """Feed the sequence's new output tokens to its matcher; True when the grammar is done
        (nothing but EOS may follow) or the tokens broke it (logged: the mask should prevent it)."""
        matcher = self._sync(seq)
        if matcher.is_error():
            logger.warning("grammar matcher of sequence %d failed: %s", seq.seq_id,
                           _short(matcher.get_error()))
            return True
        return matcher.is_stopped()

    def drop(self, seq_ids: Sequence[int]) -> None:
        """Forget matchers of finished or preempted sequences (rebuilt if they run again)."""
        for seq_id in seq_ids:
            self._tracked.pop(seq_id, None)

    def clear(self) -> None:
        """Forget every matcher and stop the fill thread (after a fill still running)."""
        self._tracked.clear()
        worker, self._worker = self._worker, None
        if worker is not None:
            worker.shutdown(wait=True)

    def fill(self, seqs: Sequence[Any], bitmask: Any) -> None:
        """Row i of `bitmask` (a C-contiguous int32 numpy array, (rows, words)) gets seqs[i]'s
        allowed tokens; rows of sequences without a grammar allow every token."""
        self.fill_async(seqs, bitmask).result()

    def fill_async(self, seqs: Sequence[Any], bitmask: Any) -> Future:
        """`fill`, its mask computation left running on a worker thread (llguidance computes
        without the GIL); the matchers are brought up to date here, before it returns. Nothing
        may touch the matchers or `bitmask` until the future is done."""
        work = []
        for row, seq in enumerate(seqs):
            if seq.grammar is None or seq.is_finished:
                # (a finished one's token is discarded: async steps may run it once more)
                bitmask[row] = -1
                continue
            matcher = self._sync(seq)
            if matcher.is_error():
                self._allow_only_eos(bitmask[row])  # end it rather than sample from nothing
            else:
                work.append((matcher, row))
        if not work:
            done: Future = Future()
            done.set_result(None)
            return done
        if self._worker is None:
            self._worker = ThreadPoolExecutor(1, thread_name_prefix="hearth-grammar")
        row_bytes = bitmask.shape[1] * 4
        return self._worker.submit(self._get_executor().unsafe_compute_mask_ptr, work,
                                   bitmask.ctypes.data, row_bytes, bitmask.shape[0])

    def _sync(self, seq: Any) -> Any:
        tracked = self._tracked.get(seq.seq_id)
        if tracked is None:
            tracked = self._tracked[seq.seq_id] = _Tracked(seq.grammar.matcher(), 0)
            if seq.num_tokens > seq.num_prompt_tokens:
                self.num_rebuilds += 1
        new = seq.token_ids[seq.num_prompt_tokens + tracked.num_consumed:]
        if new:
            tracked.matcher.consume_tokens(new)
            tracked.num_consumed += len(new)
        return tracked.matcher

    def _allow_only_eos(self, row: Any) -> None:
        words = row.view(np.uint32)  # bit 31 is an ordinary bit here
        words[:] = 0
        for token_id in self.eos_token_ids:
            words[token_id // 32] |= np.uint32(1 << (token_id % 32))

    def _get_executor(self) -> Any:
        if self._executor is None:
            import llguidance

            self._executor = llguidance.LLExecutor(num_threads=self._num_threads)
        return self._executor
