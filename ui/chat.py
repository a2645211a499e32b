"""The chat tab: streaming multi-turn chat with the served model, through the AsyncEngine.

    message ─► model_messages (system prompt + turns) ─► ChatCompletionRequest ─► the serving
            layer's chat submit (the same entry as /v1/chat/completions; max_tokens fitted to the
            room the context leaves) ◄─ one Chatbot update per delta ◄─ RequestStream
    Stop / Clear cancel the streaming event: its task is cancelled, `finally` closes the stream,
    and closing an unfinished stream aborts the request (the engine frees its blocks).

"JSON output" sends response_format json_object, or json_schema with the schema box's schema:
the engine's grammar then keeps the reply valid JSON (the monitor marks such requests).

Every error a request can meet (context too long, server busy, model loading, a bad schema) ends
up as a message in the chat, worded as the API words it; never a stack trace.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import gradio as gr

from hearth.appliance.serving import (
    ABORT,
    AppContext,
    CallRecord,
    ChatCompletionRequest,
    ChatMessage,
    RequestStream,
    api_error,
    bad_request,
)
from hearth.ui.conversation import ReplyStats, Turn, display_messages, mark_stopped, model_messages

logger = logging.getLogger("hearth.ui")

MAX_TOKENS_LIMIT = 4096  # the slider's end; the context length also caps each reply


@dataclass(frozen=True)
class ChatOptions:
    system_prompt: str
    temperature: float
    top_p: float
    max_tokens: int
    json_output: bool = False
    json_schema: str = ""  # with json_output: the schema replies must match ("": any object)


Update = tuple[list[Turn], list[dict[str, str]]]


async def reply(
    context: AppContext, turns: list[Turn], options: ChatOptions, username: str | None = None
) -> AsyncIterator[Update]:
    """Stream the answer to `turns` (the last one is the user's) as (turns, display) updates.
    `username`: the session's login; with keys, the chat is that key's call (its endpoints,
    quotas, fair share, counters and audit line: Auth.open_ui_call)."""
    auth = context.auth
    try:
        call, entry = auth.open_ui_call(username, context.telemetry.model_name or None)
    except Exception as error:  # noqa: BLE001 - shown in the chat, the server goes on
        yield _with_error(turns, error)
        return
    status = 200
    try:
        stream = _submit(context, turns, options, call)
    except Exception as error:  # noqa: BLE001 - shown in the chat, the server goes on
        auth.end(call, entry, api_error(error).status, "UI")
        yield _with_error(turns, error)
        return
    text, stats = "", None
    try:
        async for delta in stream:
            sample = delta.samples[0] if delta.samples else None
            text += sample.text if sample else ""
            finish = None
            if delta.finished:  # no finish reason: the server aborted it (shutting down)
                finish = (sample.finish_reason if sample else None) or ABORT
            stats = _stats(stream, delta.prompt_token_ids, delta.num_cached_tokens, finish)
            updated = [*turns, Turn("assistant", text, stats)]
            yield updated, display_messages(updated)
    except Exception as error:  # noqa: BLE001
        status = api_error(error).status
        partial = [*turns, Turn("assistant", text, stats)] if text else turns
        yield _with_error(partial, error)
    finally:
        stream.close()  # aborts the request if Stop or Clear cancelled this task mid-stream
        auth.end(call, entry, status, "UI")


def _submit(context: AppContext, turns: list[Turn], options: ChatOptions,
            call: CallRecord) -> RequestStream:
    request = ChatCompletionRequest(
        messages=[ChatMessage(**m) for m in model_messages(options.system_prompt, turns)],
        max_tokens=int(options.max_tokens),
        temperature=float(options.temperature),
        top_p=float(options.top_p),
        response_format=response_format(options),
    )
    _, stream = context.chat.submit(request, fit_max_tokens=True, origin="ui", call=call)
    return stream


def response_format(options: ChatOptions) -> dict[str, Any] | None:
    """The JSON toggle and schema box as the API's response_format."""
    if not options.json_output:
        return None
    if not options.json_schema.strip():
        return {"type": "json_object"}
    try:
        schema = json.loads(options.json_schema)
    except json.JSONDecodeError as error:
        raise bad_request(f"the JSON schema is not valid JSON: {error}") from None
    return {"type": "json_schema", "json_schema": {"name": "ui", "schema": schema}}


def _stats(
    stream: RequestStream, prompt_ids: list[int], num_cached: int, finish: str | None
) -> ReplyStats:
    first, last = stream.first_token_time, stream.last_token_time
    return ReplyStats(
        num_prompt_tokens=len(prompt_ids),
        num_cached_tokens=num_cached,
        num_generated_tokens=stream.num_generation_tokens,
        ttft_s=None if first is None else first - stream.arrival_time,
        decode_s=None if first is None or last is None else last - first,
        finish_reason=finish,
    )


def _with_error(turns: list[Turn], error: BaseException) -> Update:
    api = api_error(error)
    if api.status >= 500:
        logger.error("chat request failed: %r", error)
    message = api.message
    if "context length" in message:
        message += ". Press Clear to start a new conversation, or lower max tokens."
    updated = [*turns, Turn("assistant", message, error=True)]
    return updated, display_messages(updated)


def build_chat_tab(context: AppContext) -> None:
    """The chat tab's components and events; call inside a `gr.Tab`."""
    turns = gr.State([])
    with gr.Row():
        with gr.Column(scale=4):
            chatbot = gr.Chatbot(elem_id="chatbot", height=480, show_label=False, buttons=["copy"])
            with gr.Row():
                message = gr.Textbox(
                    elem_id="chat-input",
                    placeholder="Message the model (Enter to send)",
                    show_label=False,
                    scale=6,
                )
                send = gr.Button("Send", variant="primary", elem_id="chat-send", scale=1)
                stop = gr.Button("Stop", variant="stop", elem_id="chat-stop", scale=1)
                clear = gr.Button("Clear", elem_id="chat-clear", scale=1)
        with gr.Column(scale=1, min_width=220):
            system = gr.Textbox(label="System prompt", lines=4, placeholder="(the model's default)")
            temperature = gr.Slider(
                0.0, 2.0, value=0.7, step=0.05, label="Temperature", elem_id="temperature"
            )
            top_p = gr.Slider(0.05, 1.0, value=0.95, step=0.05, label="Top p")
            max_tokens = gr.Slider(
                1, MAX_TOKENS_LIMIT, value=256, step=1, label="Max tokens", elem_id="max-tokens"
            )
            json_output = gr.Checkbox(label="JSON output", elem_id="json-output")
            json_schema = gr.Textbox(label="JSON schema (optional)", lines=3, max_lines=12,
                                     placeholder='{"type": "object", "properties": {...}}',
                                     elem_id="json-schema")

    async def respond(text, history, system_prompt, temp, p, limit, as_json, schema,  # noqa: ANN001
                      request: gr.Request):
        if not text.strip():
            yield gr.skip(), gr.skip(), gr.skip()
            return
        history = [*history, Turn("user", text)]
        yield "", display_messages(history), history
        options = ChatOptions(system_prompt, temp, p, limit, bool(as_json), schema or "")
        async for updated, shown in reply(context, history, options, request.username):
            yield gr.skip(), shown, updated

    inputs = [message, turns, system, temperature, top_p, max_tokens, json_output, json_schema]
    outputs = [message, chatbot, turns]
    # concurrency_limit=None: the engine batches concurrent chats; admission limits live there.
    events = [
        trigger(respond, inputs, outputs, concurrency_limit=None, show_progress="minimal")
        for trigger in (message.submit, send.click)
    ]

    def stopped(history: list[Turn]) -> tuple[list[dict[str, str]], list[Turn]]:
        history = mark_stopped(history)
        return display_messages(history), history

    # A stream update already on its way may land after the first marking (seen on a loaded
    # 2-core machine); marking again once the cancel went through covers it (idempotent).
    stop.click(stopped, [turns], [chatbot, turns], cancels=events, queue=False).then(
        stopped, [turns], [chatbot, turns], queue=False)
    clear.click(lambda: ([], [], ""), None, [chatbot, turns, message], cancels=events, queue=False)
    chatbot.clear(lambda: ([], ""), None, [turns, message], cancels=events, queue=False)  # its bin
