"""Tokenizer: text ↔ token ids and chat templates, for HF directories and GGUF files alike.

A thin wrapper over a `tokenizers.Tokenizer` (the Rust library transformers itself uses), plus
what a model's tokenizer files say around it: BOS/EOS ids, whether BOS is prepended, and the
jinja chat template, rendered the way transformers renders it (sandboxed, trim_blocks/lstrip_blocks,
`raise_exception`, `strftime_now`, a non-escaping `tojson`).

A GGUF file carries no tokenizer.json: `from_gguf_metadata` rebuilds the byte-level BPE from the
vocabulary, merges and token types that llama.cpp's converter stored, with the pre-tokenizer regex
that `tokenizer.ggml.pre` names, or a SentencePiece vocabulary (engine/gguf_sentencepiece.py).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as _Backend

# llama.cpp token types (tokenizer.ggml.token_type)
_CONTROL, _USER_DEFINED = 3, 4

_GPT2_BYTE_LEVEL = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# tokenizer.ggml.pre → (split regex or None for GPT-2's own, split digits one by one first).
# These follow llama.cpp's llama-vocab.cpp groups.
_PRE_TOKENIZERS: dict[str, tuple[str | None, bool]] = {
    "default": (None, False),
    "gpt-2": (None, False),
    "gpt2": (None, False),
    "mpt": (None, False),
    "olmo": (None, False),
    "smollm": (None, True),
    "starcoder": (None, True),
    "refact": (None, True),
    "codeshell": (None, True),
    "command-r": (None, True),
    "llama-bpe": (_LLAMA3_SPLIT, False),
    "llama3": (_LLAMA3_SPLIT, False),
    "llama-v3": (_LLAMA3_SPLIT, False),
    "smaug-bpe": (_LLAMA3_SPLIT, False),
    "dbrx": (_LLAMA3_SPLIT, False),
    "qwen2": (_QWEN2_SPLIT, False),
    "deepseek-r1-qwen": (_QWEN2_SPLIT, False),
}


# `tokenizers`' encode() holds the GIL for all its work (a 650k-character text: 3.8 s in which the
# event loop got 3 turns), its encode_batch() releases it (916 turns): long texts take the batch
# path, so that tokenizing on a worker thread never stalls the server (appliance/tokenize_pool.py).
_GIL_FREE_CHARS = 4096


class Tokenizer:
    """Encode, decode and render chat templates for one model."""

    def __init__(
        self,
        backend: _Backend,
        bos_token_id: int | None,
        eos_token_ids: Sequence[int],
        chat_template: str | None = None,
        add_bos_token: bool = False,
    ) -> None:
        self._backend = backend
        self.bos_token_id = bos_token_id
        self.eos_token_ids = tuple(dict.fromkeys(eos_token_ids))
        self.chat_template = chat_template
        # Prepend BOS ourselves only when the backend's post-processor does not already do it.
        self._prepend_bos = (
            add_bos_token and bos_token_id is not None and not self._backend_adds_bos()
        )

    # ----- constructors -----

    @classmethod
    def from_hf_dir(cls, model_dir: str | Path) -> Tokenizer:
        """From tokenizer.json, tokenizer_config.json, chat_template.jinja and generation_config."""
        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise ValueError(
                f"{model_dir} has no tokenizer.json; Hearth needs the fast-tokenizer file "
                "(AutoTokenizer.from_pretrained(src).save_pretrained(dir) writes it)"
            )
        try:
            backend = _Backend.from_file(str(path))
        except Exception as e:
            raise ValueError(f"cannot read {path}: {e}") from e
        config = _read_json(model_dir / "tokenizer_config.json")
        bos_id = _token_id(backend, config.get("bos_token"))
        eos_ids = [_token_id(backend, config.get("eos_token"))]
        eos_ids += _as_id_list(_read_json(model_dir / "generation_config.json").get("eos_token_id"))
        template = _chat_template_from(config.get("chat_template"))
        jinja_file = model_dir / "chat_template.jinja"
        if jinja_file.is_file():
            template = jinja_file.read_text(encoding="utf-8")
        return cls(
            backend,
            bos_token_id=bos_id,
            eos_token_ids=[i for i in eos_ids if i is not None],
            chat_template=template,
            add_bos_token=bool(config.get("add_bos_token", False)),
        )

    @classmethod
    def from_gguf_metadata(cls, metadata: Mapping[str, Any] | Any) -> Tokenizer:
        """A byte-level BPE ('gpt2': SmolLM, Llama 3, Qwen) or SentencePiece ('llama': Llama 2,
        Mistral 7B, Gemma, Phi-3) vocabulary from GGUF `tokenizer.*` metadata (a dict of values,
        or a GGUFReader)."""
        if hasattr(metadata, "fields"):  # a gguf.GGUFReader
            metadata = {k: f.contents() for k, f in metadata.fields.items()}
        kind = metadata.get("tokenizer.ggml.model")
        if kind == "llama":
            from hearth.engine.gguf_sentencepiece import sentencepiece_backend

            backend = sentencepiece_backend(metadata)
        elif kind == "gpt2":
            tokens = list(metadata["tokenizer.ggml.tokens"])
            backend = _byte_level_bpe(tokens, metadata.get("tokenizer.ggml.merges") or [],
                                      metadata.get("tokenizer.ggml.pre"))
            _add_gguf_special_tokens(backend, tokens,
                                     list(metadata.get("tokenizer.ggml.token_type") or []))
        else:
            raise ValueError(
                f"GGUF tokenizer type {kind!r} is not supported; Hearth reads byte-level BPE "
                "('gpt2': SmolLM, Llama 3, Qwen) and SentencePiece ('llama': Llama 2, Mistral, "
                "Gemma, Phi-3) vocabularies"
            )
        eos_ids = [metadata.get(f"tokenizer.ggml.{key}_token_id") for key in ("eos", "eot", "eom")]
        return cls(
            backend,
            bos_token_id=metadata.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=[int(i) for i in eos_ids if i is not None],
            chat_template=metadata.get("tokenizer.chat_template"),
            # llama.cpp (and transformers) add BOS to a SentencePiece vocabulary by default
            add_bos_token=bool(metadata.get("tokenizer.ggml.add_bos_token", kind == "llama")),
        )

    # ----- encode / decode -----

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if len(text) > _GIL_FREE_CHARS:  # encode_batch releases the GIL while it works
            ids = self._backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
        else:
            ids = self._backend.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self._prepend_bos:
            ids.insert(0, self.bos_token_id)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def decode_stream(self, context_ids: Sequence[int],
                      skip_special_tokens: bool = True) -> Callable[[int], str | None] | None:
        """`step(token_id)`: the new text each output token adds after `context_ids` (None while
        a character is incomplete, or for an id the vocabulary lacks): tokenizers' DecodeStream,
        the same window algorithm as engine/detokenizer.py's in one native call per token (3x
        cheaper). None where this tokenizers cannot prime a stream with context (before 0.22), or
        where the context ends mid-character (the stream then emits the broken character again)."""
        context_ids = list(context_ids)
        if "\ufffd" in self._backend.decode(context_ids, skip_special_tokens=skip_special_tokens):
            return None  # a context ending mid-character: the stream would repeat its bytes
        try:
            stream = decoders.DecodeStream(ids=context_ids,
                                           skip_special_tokens=skip_special_tokens)
        except (AttributeError, TypeError):  # no DecodeStream (< 0.21), or no `ids` (< 0.22)
            return None
        return functools.partial(stream.step, self._backend)

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str | None]:
        return [self._backend.id_to_token(i) for i in ids]

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def to_json(self) -> str:
        """The tokenizer as HF tokenizer.json text (engine/grammar.py builds its own from it)."""
        return self._backend.to_str()

    @cached_property
    def max_token_chars(self) -> int:
        """The most characters of text one token stands for: its longest piece. A byte-level
        piece has one character per byte, a SentencePiece piece one per character, a byte-fallback
        piece (<0xE2>) more characters than its one byte (engine/prepare.py's length bound)."""
        return max(len(piece) for piece in self._backend.get_vocab(with_added_tokens=True))

    @property
    def vocab_size(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def all_special_ids(self) -> list[int]:
        special = {i for i, tok in self._backend.get_added_tokens_decoder().items() if tok.special}
        special.update(i for i in (self.bos_token_id, *self.eos_token_ids) if i is not None)
        return sorted(special)

    @property
    def bos_token(self) -> str | None:
        return None if self.bos_token_id is None else self._backend.id_to_token(self.bos_token_id)

    @property
    def eos_token(self) -> str | None:
        return self._backend.id_to_token(self.eos_token_ids[0]) if self.eos_token_ids else None

    # ----- chat -----

    def with_chat_template(self, chat_template: str) -> Tokenizer:
        """A copy using another template (a catalogue override)."""
        return Tokenizer(
            self._backend, self.bos_token_id, self.eos_token_ids, chat_template, self._prepend_bos
        )

    def apply_chat_template(
        self, messages: list[dict], add_generation_prompt: bool = True, **kwargs: Any
    ) -> str:
        """The prompt for `messages`, as transformers' apply_chat_template(tokenize=False) gives."""
        if not self.chat_template:
            raise ValueError(
                "this model has no chat template; send a plain completion request instead, or set "
                "chat_template for it in models.toml"
            )
        try:
            return _compile(self.chat_template).render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
                **kwargs,
            )
        except jinja2.TemplateError as e:
            raise ValueError(f"chat template error: {e}") from e

    def _backend_adds_bos(self) -> bool:
        ids = self._backend.encode("a", add_special_tokens=True).ids
        return bool(ids) and ids[0] == self.bos_token_id


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.TemplateError as e:
        raise ValueError(f"chat template does not compile: {e}") from e


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: Any = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own tojson escapes HTML characters; templates expect plain JSON.
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _byte_level_bpe(tokens: list[str], merges: Sequence[str], pre: str | None) -> _Backend:
    alphabet = _bytes_to_unicode()
    spelled = set(alphabet.values())
    # Tokens are stored in the byte alphabet already; respell any that are not (raw UTF-8).
    vocab = {
        (t if set(t) <= spelled else "".join(alphabet[b] for b in t.encode("utf-8"))): i
        for i, t in enumerate(tokens)
    }
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    backend = _Backend(
        models.BPE(
            vocab=vocab, merges=pairs, ignore_merges=pre in ("llama-bpe", "llama3", "llama-v3")
        )
    )
    backend.pre_tokenizer = _pre_tokenizer(pre or "default")
    backend.decoder = decoders.ByteLevel()
    return backend


def _pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    if pre not in _PRE_TOKENIZERS:
        raise ValueError(
            f"GGUF pre-tokenizer {pre!r} is not supported; "
            f"known: {', '.join(sorted(_PRE_TOKENIZERS))}"
        )
    split, digits = _PRE_TOKENIZERS[pre]
    if split is not None:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    if digits:
        return pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), _GPT2_BYTE_LEVEL]
        )
    return _GPT2_BYTE_LEVEL


def _add_gguf_special_tokens(backend: _Backend, tokens: list[str], types: list[int]) -> None:
    """Control tokens become special (kept whole, skipped on decode); user-defined stay whole."""
    control = [
        AddedToken(t, normalized=False, special=True)
        for t, kind in zip(tokens, types, strict=False)
        if kind == _CONTROL
    ]
    user = [
        AddedToken(t, normalized=False, special=False)
        for t, kind in zip(tokens, types, strict=False)
        if kind == _USER_DEFINED
    ]
    if control:
        backend.add_special_tokens(control)
    if user:
        backend.add_tokens(user)


@lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte → printable character table."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from e


def _token_id(backend: _Backend, token: Any) -> int | None:
    if isinstance(token, dict):  # {"content": "<s>", ...}
        token = token.get("content")
    return backend.token_to_id(token) if isinstance(token, str) else None


def _as_id_list(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


def _chat_template_from(value: Any) -> str | None:
    if isinstance(value, list):  # [{"name": "default", "template": "..."}, ...]
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        return named.get("default")
    return value if isinstance(value, str) else None
