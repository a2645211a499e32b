"""Incremental detokenization and stop strings, per sequence.

Byte-level BPE can split one character over several tokens, and a token's text can depend on the
token before it, so the new text is found by decoding a short window twice (as vLLM does):

    ids:     ... p3 p4 | o0 o1 o2
                 ^prefix_offset  ^read_offset
    new = decode(ids[prefix:]) minus decode(ids[prefix:read])   (held back while it ends in U+FFFD)

Where the tokenizer offers it (engine/tokenizer.py `decode_stream`: tokenizers' DecodeStream), the
same algorithm runs natively, one call per token; the Python form stays for other tokenizers and as
the reference the tests compare it with.

Stop strings may span tokens: the full text is searched around the newly added characters. While a
sequence runs, the visible text holds back the last (longest stop string - 1) characters, which
could still turn out to be the start of a stop string.
"""

from __future__ import annotations

from hearth.engine.sampling_params import SamplingParams

_INITIAL_WINDOW = 5  # prompt tokens that give the first output token its context


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self.tokenizer = tokenizer
        self.params = params
        self.ids: list[int] = list(prompt_token_ids[-_INITIAL_WINDOW:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.output_text = ""
        self.stop_reason: str | None = None
        self._holdback = max((len(s) for s in params.stop), default=1) - 1
        stream = getattr(tokenizer, "decode_stream", None)
        self._step = None if stream is None else stream(self.ids, params.skip_special_tokens)

    def add_token(self, token_id: int) -> bool:
        """Append one output token; True when a stop string ended the sequence."""
        self.ids.append(token_id)
        if self._step is not None:
            try:
                text = self._step(token_id)
            except Exception:  # noqa: BLE001 - tokenizers' "Invalid prefix encountered"
                # A token changed text already decoded (byte fallback, random ids): the stream
                # refuses; the Python window, whose offsets were kept in step, takes over.
                self._step = None
            else:
                if not text:
                    return False
                old_len = len(self.output_text)
                self.output_text += text
                self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
                return self._check_stop(old_len)
        skip = self.params.skip_special_tokens
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset : self.read_offset], skip)
        full = self.tokenizer.decode(self.ids[self.prefix_offset :], skip)
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return False
        old_len = len(self.output_text)
        self.output_text += full[len(prefix) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return self._check_stop(old_len)

    def _check_stop(self, old_len: int) -> bool:
        hits = []
        for stop in self.params.stop:
            index = self.output_text.find(stop, max(0, old_len - len(stop) + 1))
            if index >= 0:
                hits.append((index, stop))
        if not hits:
            return False
        index, stop = min(hits)  # the earliest stop string in the text wins
        end = index + len(stop) if self.params.include_stop_str_in_output else index
        self.output_text = self.output_text[:end]
        self.stop_reason = stop
        return True

    def visible_text(self, finished: bool) -> str:
        if finished or not self._holdback:
            return self.output_text
        return self.output_text[: max(0, len(self.output_text) - self._holdback)]
