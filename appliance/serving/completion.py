"""POST /v1/completions (and its alias /v1/fim/completions): prompts (text or token ids, one or
many) → choices, streamed or whole. With `suffix`, each text prompt is the code before the cursor
and the prompt becomes the model's fill-in-the-middle layout (serving/fim.py);
response_format / structured_outputs constrain the text as on the chat endpoint.

Choice `index` is prompt_position * n + sample_index, as OpenAI numbers them.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from hearth.appliance.protocol import CompletionRequest, bad_request
from hearth.appliance.serving.core import (
    DONE,
    ChunkWriter,
    EventStream,
    Prompt,
    Result,
    Serving,
    api_error,
    merge,
    sse,
    usage,
)
from hearth.appliance.serving.fim import fim_prompts, no_fim_message
from hearth.appliance.serving.structured import structured_output
from hearth.engine.outputs import TokenLogprob
from hearth.engine.prepare import PreparedRequest


class CompletionServing:
    def __init__(self, serving: Serving) -> None:
        self._serving = serving

    def prepare(self, request: CompletionRequest) -> tuple[list[Prompt], list[PreparedRequest]]:
        """Validate everything that can be checked before the engine sees the request."""
        serving = self._serving
        serving.reject_unsupported(
            request,
            [
                ("best_of", request.best_of not in (None, 1, request.n), "best_of other than n"),
                (
                    "echo",
                    request.echo and request.logprobs is not None,
                    "echo with logprobs (prompt logprobs)",
                ),
            ],
        )
        _check_text_lengths(serving, request)
        params = serving.sampling_params(request, request.max_tokens, request.logprobs,
                                         structured_output(request))
        fim = serving.model.fim if request.suffix is not None else None
        if request.suffix and fim is None:
            raise bad_request(no_fim_message(serving.model.name), param="suffix")
        if fim is not None:
            prompts = fim_prompts(serving.tokenizer, fim, request)
            params = replace(params, stop_token_ids=[*params.stop_token_ids, *fim.stop_token_ids])
        else:
            prompts = self._prompts(request.prompt)
        prepared = []
        for i, prompt in enumerate(prompts):
            where = "prompt" if len(prompts) == 1 else f"prompt[{i}]"
            prepared.append(serving.prepare(prompt, params, where))
            if prompt.text is None and request.echo:
                prompt.text = serving.tokenizer.decode(prompt.token_ids, skip_special_tokens=False)
        return prompts, prepared

    def _prompts(self, prompt: str | list[Any]) -> list[Prompt]:
        encode = self._serving.tokenizer.encode
        if isinstance(prompt, str):
            return [Prompt(prompt, encode(prompt))]
        if not prompt:
            raise bad_request("prompt is empty", param="prompt")
        if isinstance(prompt[0], int):
            return [Prompt(None, list(prompt))]
        if isinstance(prompt[0], str):
            return [Prompt(p, encode(p)) for p in prompt]
        return [Prompt(None, list(p)) for p in prompt]

    async def create(self, request: CompletionRequest,
                     checked: tuple[list[Prompt], list[PreparedRequest]] | None = None
                     ) -> dict[str, Any]:
        """`checked`: what `prepare(request)` returned, when the caller ran it off the loop."""
        model = self._serving.resolve_model(request.model)
        prompts, prepared = checked or self.prepare(request)
        request_id = f"cmpl-{uuid.uuid4().hex}"
        streams = self._serving.submit(request_id, prepared, request.priority)
        results = await self._serving.collect(streams)
        choices = []
        for position, (prompt, result) in enumerate(zip(prompts, results, strict=True)):
            for sample in result.samples:
                prefix = prompt.text if request.echo and prompt.text else ""
                choices.append(
                    {
                        "index": position * request.n + sample.index,
                        "text": prefix + sample.text,
                        "logprobs": self._logprobs(sample.logprobs, len(prefix)),
                        "finish_reason": sample.finish_reason,
                        "stop_reason": sample.stop_reason,
                    }
                )
        num_generated = sum(len(s.token_ids) for r in results for s in r.samples)
        return {
            "id": request_id,
            "object": "text_completion",
            "created": int(time.time()),
            "model": model,
            "choices": choices,
            "usage": usage(results, num_generated),
        }

    def stream(self, request: CompletionRequest,
               checked: tuple[list[Prompt], list[PreparedRequest]] | None = None) -> EventStream:
        """Validate and submit now, so that errors are HTTP errors; then the events stream."""
        model = self._serving.resolve_model(request.model)
        prompts, prepared = checked or self.prepare(request)
        request_id = f"cmpl-{uuid.uuid4().hex}"
        streams = self._serving.submit(request_id, prepared, request.priority)
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        events = self._events(
            request_id, model, request.echo, prompts, request.n, streams, include_usage
        )
        return EventStream(events, streams)

    async def _events(
        self,
        request_id: str,
        model: str,
        echo: bool,
        prompts: list[Prompt],
        n: int,
        streams: list[Any],
        include_usage: bool,
    ) -> AsyncIterator[str]:
        chunk = ChunkWriter(request_id, "text_completion", model, include_usage)
        offsets: dict[int, int] = {}  # choice index → characters sent (logprobs text_offset)
        results = [Result([], 0, []) for _ in prompts]
        num_generated = 0

        try:
            async for position, delta in merge(streams):
                results[position] = Result(delta.prompt_token_ids, delta.num_cached_tokens, [])
                choices = []  # (index, text, offset for logprobs, the change)
                for change in delta.samples:
                    index = position * n + change.index
                    text = change.text
                    if index not in offsets and echo:
                        text = (prompts[position].text or "") + text
                    offset = offsets.get(index, 0)
                    offsets[index] = offset + len(text)
                    num_generated += len(change.token_ids)
                    choices.append((index, text, offset, change))
                if len(choices) == 1 and choices[0][3].logprobs is None:
                    index, text, _, change = choices[0]  # the common chunk: formatted directly
                    yield chunk.text_choice(index, text, change.finish_reason, change.stop_reason)
                elif choices:
                    yield chunk([{"index": index, "text": text,
                                  "logprobs": self._logprobs(change.logprobs, offset),
                                  "finish_reason": change.finish_reason,
                                  "stop_reason": change.stop_reason}
                                 for index, text, offset, change in choices])
            if include_usage:
                yield chunk([], usage(results, num_generated))
        except Exception as error:  # noqa: BLE001 - one request fails; the stream ends cleanly
            yield sse(api_error(error).body())
        yield DONE

    def _logprobs(self, logprobs: list[TokenLogprob] | None, offset: int) -> Any:
        if logprobs is None:
            return None
        tokenizer = self._serving.tokenizer

        def text(token_id: int) -> str:
            return tokenizer.decode([token_id], skip_special_tokens=False)

        tokens, offsets = [], []
        for entry in logprobs:
            tokens.append(text(entry.token_id))
            offsets.append(offset)
            offset += len(tokens[-1])
        return {
            "tokens": tokens,
            "token_logprobs": [e.logprob for e in logprobs],
            "top_logprobs": [
                {text(t): lp for t, lp in zip(e.top_token_ids, e.top_logprobs, strict=True)}
                for e in logprobs
            ],
            "text_offset": offsets,
        }


def _check_text_lengths(serving: Serving, request: CompletionRequest) -> None:
    """Text prompts (and a FIM suffix) too long for the context: 400 before tokenizing."""
    texts = [request.prompt] if isinstance(request.prompt, str) else request.prompt
    for i, text in enumerate(texts):
        if isinstance(text, str):
            serving.check_chars(text, "prompt" if len(texts) == 1 else f"prompt[{i}]")
    if request.suffix:
        serving.check_chars(request.suffix, "suffix")
