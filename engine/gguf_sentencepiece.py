"""SentencePiece vocabularies of GGUF files (`tokenizer.ggml.model = llama`): Llama 2, Mistral 7B,
Gemma and Phi-3 files carry them. Rebuilt with the `tokenizers` library from the file's tokens,
scores and token types, the way transformers' GGUF loader builds them (integrations/gguf):

    BPE over the vocabulary as spelled ("▁the", "<0x0A>"), byte fallback on
    merges: every split (a, b) of a token into two vocabulary entries, best merged-token score
            first (llama.cpp's SPM tokenizer merges the highest-scoring pair first: the same)
    spaces: "▁" in the pieces; a "▁" prepended to the text (Llama; Phi-3 by a normalizer), or
            none (Gemma, whose files order tokens by merge rank rather than by score)
    CONTROL tokens become special added tokens, USER_DEFINED ones plain added tokens.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as Backend

_UNKNOWN, _CONTROL, _USER_DEFINED = 2, 3, 4  # llama.cpp token types (tokenizer.ggml.token_type)
_SPACE = "\u2581"
_GEMMA = ("gemma", "gemma2", "gemma3")


def sentencepiece_backend(metadata: Mapping[str, Any]) -> Backend:
    """The `tokenizers` backend of a `llama`-type GGUF vocabulary."""
    arch = metadata.get("general.architecture")
    tokens = list(metadata["tokenizer.ggml.tokens"])
    scores = list(metadata.get("tokenizer.ggml.scores") or [0.0] * len(tokens))
    if arch in _GEMMA:  # runs of spaces are stored as spaces; the merges rank by file order
        tokens = [_SPACE * len(t) if " " in t and not t.strip() else t for t in tokens]
        scores = [-float(i) for i in range(len(tokens))]
    vocab = {token: index for index, token in enumerate(tokens)}
    unk_id = metadata.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[unk_id] if arch in _GEMMA and unk_id is not None else None
    backend = Backend(models.BPE(vocab=vocab, merges=_merges(vocab, tokens, scores),
                                 fuse_unk=True, byte_fallback=True, unk_token=unk))
    strip = [decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if arch in _GEMMA:
        backend.normalizer = normalizers.Replace(" ", _SPACE)
        backend.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    elif arch == "phi3":  # the prefix from a normalizer: "  hi" -> "▁▁▁hi"
        backend.normalizer = normalizers.Sequence([normalizers.Prepend(_SPACE),
                                                   normalizers.Replace(" ", _SPACE)])
        strip.append(decoders.Strip(" ", 1, 0))
    else:
        prefix = metadata.get("tokenizer.ggml.add_space_prefix", True)
        backend.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement=_SPACE, prepend_scheme="first" if prefix else "never", split=False)
        if prefix:
            strip.append(decoders.Strip(" ", 1, 0))
    backend.decoder = decoders.Sequence(strip)
    _add_special_tokens(backend, tokens, list(metadata.get("tokenizer.ggml.token_type") or []),
                        unk_id)
    return backend


def _merges(vocab: dict[str, int], tokens: Sequence[str],
            scores: Sequence[float]) -> list[tuple[str, str]]:
    """transformers' generate_merges: splits of each token into two vocabulary entries, ordered
    by (merged score, left length, right length), best first."""
    merges = []
    for token, score in dict(zip(tokens, scores, strict=False)).items():
        local = [(token[:i], token[i:], score) for i in range(1, len(token))
                 if token[:i] in vocab and token[i:] in vocab]
        local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        merges.extend(local)
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


def _add_special_tokens(backend: Backend, tokens: list[str], types: list[int],
                        unk_id: int | None) -> None:
    special = [t for t, kind in zip(tokens, types, strict=False) if kind == _CONTROL]
    if unk_id is not None and tokens[unk_id] not in special:
        special.insert(0, tokens[unk_id])  # transformers adds its unk_token as special too
    user = [t for t, kind in zip(tokens, types, strict=False) if kind == _USER_DEFINED]
    if special:
        backend.add_special_tokens([AddedToken(t, normalized=False, special=True)
                                    for t in special])
    if user:
        backend.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])
