"""Fill-in-the-middle: which FIM tokens a model has, and the prompt they make (no torch).

A code model trained for FIM has three sentinel tokens (Codestral two). The prompt is the text
before the cursor (prefix) and after it (suffix) around them; the model writes the middle:

    psm (every family)       [PRE] prefix… [SUF] suffix… [MID] → middle
    spm (StarCoder, CodeLlama were also trained on it)
                             [PRE] [SUF] suffix… [MID] prefix… → middle
    Codestral (suffix first, no middle token)
                             [SUFFIX] suffix… [PREFIX] prefix… → middle

Families are found from the tokenizer's vocabulary: each sentinel must be one token whose id the
model's embedding has. models.toml can name the family (`fim = "qwen"`), switch FIM off
(`fim = "none"`) or pick the order (`fim_order = "spm"`).

Keystrokes and the prefix cache: the cache reuses whole blocks from the start of the prompt.
Typing changes the end of the prefix. In psm the suffix comes after that point, so every
keystroke recomputes the suffix; in spm (and Codestral's layout) the suffix sits before the
prefix and stays cached, and only the prefix's last block and the new characters are computed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

ORDERS = ("psm", "spm")


class Vocabulary(Protocol):
    """What FIM needs of a tokenizer (engine/tokenizer.py's Tokenizer has it)."""

    def token_to_id(self, token: str) -> int | None: ...

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...


@dataclass(frozen=True)
class FimFamily:
    """A family's sentinel spellings (the first one found is used) and its other facts."""

    name: str
    prefix: tuple[str, ...]
    suffix: tuple[str, ...]
    middle: tuple[str, ...]  # empty: the family has no middle token (Codestral)
    orders: tuple[str, ...]  # the layouts its models were trained on; the first is the default
    stops: tuple[str, ...] = ()  # tokens that end a fill besides EOS, where the vocabulary has them


FAMILIES: tuple[FimFamily, ...] = (
    FimFamily("starcoder", ("<fim_prefix>", "<fim-prefix>"), ("<fim_suffix>", "<fim-suffix>"),
              ("<fim_middle>", "<fim-middle>"), ("psm", "spm"),
              ("<file_sep>", "<fim_pad>", "<|endoftext|>")),
    FimFamily("qwen", ("<|fim_prefix|>",), ("<|fim_suffix|>",), ("<|fim_middle|>",), ("psm",),
              ("<|fim_pad|>", "<|file_sep|>", "<|repo_name|>", "<|endoftext|>")),
    FimFamily("codellama", ("<PRE>", "▁<PRE>"), ("<SUF>", "▁<SUF>"), ("<MID>", "▁<MID>"),
              ("psm", "spm"), ("<EOT>", "▁<EOT>")),
    FimFamily("deepseek", ("<｜fim▁begin｜>",), ("<｜fim▁hole｜>",), ("<｜fim▁end｜>",), ("psm",),
              ("<|EOT|>",)),
    FimFamily("codestral", ("[PREFIX]",), ("[SUFFIX]",), (), ("spm",)),
)
FAMILY_NAMES = tuple(f.name for f in FAMILIES)


@dataclass(frozen=True)
class FimSpec:
    """A served model's FIM tokens, found once at load."""

    family: str
    order: str  # "psm" | "spm"
    prefix_id: int
    suffix_id: int
    middle_id: int | None  # None: no middle token (Codestral)
    stop_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None  # prepended when the tokenizer prepends BOS to prompts

    @property
    def num_special_tokens(self) -> int:
        """The tokens a FIM prompt adds to the prefix's and suffix's own (3 for most families)."""
        return 2 + (self.middle_id is not None) + (self.bos_token_id is not None)

    def prompt_ids(self, prefix_ids: list[int], suffix_ids: list[int]) -> list[int]:
        """The prompt for one fill, from the already tokenized prefix and suffix."""
        head = [] if self.bos_token_id is None else [self.bos_token_id]
        middle = [] if self.middle_id is None else [self.middle_id]
        if self.order == "psm":
            return [*head, self.prefix_id, *prefix_ids, self.suffix_id, *suffix_ids, *middle]
        if self.middle_id is None:  # Codestral: [SUFFIX] suffix [PREFIX] prefix
            return [*head, self.suffix_id, *suffix_ids, self.prefix_id, *prefix_ids]
        return [*head, self.prefix_id, self.suffix_id, *suffix_ids, *middle, *prefix_ids]


def check_fim_setting(family: str | None, order: str | None) -> None:
    """The catalogue's `fim` / `fim_order` values; ValueError saying what is accepted."""
    if family is not None and family not in (*FAMILY_NAMES, "none"):
        raise ValueError(
            f"fim must be one of {', '.join(FAMILY_NAMES)} or 'none', got {family!r}"
        )
    if order is not None and order not in ORDERS:
        raise ValueError(f"fim_order must be one of {', '.join(ORDERS)}, got {order!r}")


def detect_fim(
    vocab: Vocabulary,
    vocab_size: int,
    family: str | None = None,
    order: str | None = None,
    bos_token_id: int | None = None,
) -> FimSpec | None:
    """The model's FIM tokens: those of `family` (a catalogue override; "none": no FIM) or of the
    first family whose sentinels are all single tokens below `vocab_size`. None: no FIM.
    `bos_token_id`: the BOS the tokenizer prepends to prompts, if any. ValueError when the
    catalogue names a family whose tokens the model lacks, or an order the family never saw."""
    check_fim_setting(family, order)
    if family == "none":
        return None
    candidates = [f for f in FAMILIES if family in (None, f.name)]
    for candidate in candidates:
        spec = _spec(vocab, vocab_size, candidate, order, bos_token_id)
        if spec is not None:
            return spec
    if family is not None:
        raise ValueError(
            f"the catalogue sets fim = {family!r}, but the tokenizer lacks one of its tokens "
            f"{', '.join(candidates[0].prefix + candidates[0].suffix + candidates[0].middle)} "
            f"(or their ids are beyond the model's {vocab_size} embeddings)"
        )
    return None


def model_fim(
    tokenizer: object, vocab_size: int, family: str | None = None, order: str | None = None
) -> FimSpec | None:
    """A loaded model's FIM tokens (None for a stand-in tokenizer without a vocabulary), with the
    catalogue's `fim` / `fim_order`; the BOS the tokenizer prepends goes first."""
    if not callable(getattr(tokenizer, "token_to_id", None)):
        return None  # the dummy-weight stand-in: token-id prompts only
    return detect_fim(tokenizer, vocab_size, family, order, prepended_bos(tokenizer))


def prepended_bos(vocab: Vocabulary) -> int | None:
    """The BOS id the tokenizer puts before every prompt, or None (StarCoder and Qwen put none)."""
    with_special, plain = vocab.encode("a"), vocab.encode("a", add_special_tokens=False)
    return with_special[0] if len(with_special) == len(plain) + 1 else None


def _spec(vocab: Vocabulary, vocab_size: int, family: FimFamily, order: str | None,
          bos_token_id: int | None) -> FimSpec | None:
    prefix = _find(vocab, vocab_size, family.prefix)
    suffix = _find(vocab, vocab_size, family.suffix)
    middle = _find(vocab, vocab_size, family.middle) if family.middle else None
    if prefix is None or suffix is None or (family.middle and middle is None):
        return None
    order = order or family.orders[0]
    if order not in family.orders:
        raise ValueError(
            f"fim_order {order!r}: {family.name} models were trained on "
            f"{', '.join(family.orders)} only"
        )
    stops = tuple(i for name in family.stops
                  if (i := _find(vocab, vocab_size, (name,))) is not None)
    return FimSpec(family.name, order, prefix, suffix, middle, stops, bos_token_id)


def _find(vocab: Vocabulary, vocab_size: int, spellings: tuple[str, ...]) -> int | None:
    for token in spellings:
        token_id = vocab.token_to_id(token)
        if token_id is not None and 0 <= token_id < vocab_size:
            return token_id
    return None
