"""TextStreams: the API process's detokenizers for the engine process's plain requests.

The engine process reports a plain request (engine/request_state.py `reports_token_ids`: one
sample, no logprobs) as a TokenRow a step: its new token ids and how it ended, no text. Here, on
the API process's receiver thread, each row becomes the RequestDelta the engine would have made:
the same IncrementalDetokenizer, the same stop strings and hold-back, as vLLM V1's front end
detokenizes. A Python object per request per step then costs the API process's GIL, not the engine
process's, whose host thread bounds the served rate on a GPU (docs/benchmarks.md, W7).

    engine process:  (request id, [ids], finish reason, stop token, cached)   one row a step
    API process:     TextStreams.deltas(rows) ──► RequestDelta(text, ids, reasons) per row
                                              └─► ids of requests a stop string ended: the caller
                                                  aborts them in the engine

A stop string ends the request here, so the engine runs it a step or two longer until the abort
arrives; those rows find no stream and are dropped. What the client sees is what the engine's own
deltas give (tests/test_engine_deltas.py compares them step for step).
"""

from __future__ import annotations

from hearth.engine.detokenizer import IncrementalDetokenizer
from hearth.engine.outputs import RequestDelta, SampleDelta
from hearth.engine.request_state import TokenRow
from hearth.engine.sampling_params import SamplingParams


class _TextStream:
    __slots__ = ("detok", "prompt_token_ids", "text_len")

    def __init__(self, detok: IncrementalDetokenizer | None, prompt_token_ids: list[int]) -> None:
        self.detok = detok  # None: the request asked for no text (detokenize=False)
        self.prompt_token_ids = prompt_token_ids
        self.text_len = 0  # characters of the visible text already handed out


class TextStreams:
    """One detokenizer per plain request in flight. `start` and `forget` may run on any thread
    (the command sender); `deltas` on one (the receiver)."""

    def __init__(self, tokenizer) -> None:
        self._tokenizer = tokenizer
        self._streams: dict[str, _TextStream] = {}

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._streams

    def __len__(self) -> int:
        return len(self._streams)

    def start(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Before the request is sent to the engine."""
        detok = (IncrementalDetokenizer(self._tokenizer, prompt_token_ids, params)
                 if params.detokenize else None)
        self._streams[request_id] = _TextStream(detok, prompt_token_ids)

    def forget(self, request_id: str) -> _TextStream | None:
        """The request ended elsewhere (aborted, refused); its stream, if it had one."""
        return self._streams.pop(request_id, None)

    def deltas(self, rows: list[TokenRow], now: float) -> tuple[list[RequestDelta], list[str]]:
        """The step's rows as deltas, and the ids of the requests a stop string ended (still
        running in the engine: the caller aborts them there)."""
        streams = self._streams
        deltas, stopped = [], []
        for request_id, ids, reason, stop_reason, num_cached in rows:
            stream = streams.get(request_id)
            if stream is None:
                continue  # ended here by a stop string, or the client left
            detok, stop = stream.detok, False
            if detok is not None:
                if len(ids) == 1:
                    stop = detok.add_token(ids[0])
                else:  # accepted speculative tokens; the engine's deltas keep them all too
                    stop = any(detok.add_token(t) for t in ids)
                if detok.stop_reason is not None:
                    stop_reason = detok.stop_reason
            if stop and reason is None:
                reason = "stop"
                stopped.append(request_id)
            finished = reason is not None
            text = ""
            if detok is not None:
                visible = detok.visible_text(finished)
                text = visible[stream.text_len :]
                stream.text_len = len(visible)
            if finished:
                del streams[request_id]
            elif not text and not ids:
                continue
            sample = SampleDelta(0, text, ids, None, reason, stop_reason if finished else None)
            deltas.append(RequestDelta(request_id, [sample], stream.prompt_token_ids, finished,
                                       num_cached, now))
        return deltas, stopped
