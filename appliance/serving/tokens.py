"""Chat messages → prompt through the model's chat template (tool calls and tool results
included), and the /tokenize and /detokenize routes (which accept the same messages, so that a
client can count a chat's tokens)."""

from __future__ import annotations

import json
from typing import Any

from hearth.appliance.protocol import ChatMessage, DetokenizeRequest, TokenizeRequest, bad_request
from hearth.appliance.serving.core import Prompt, Serving


def messages_for_template(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Chat messages as templates want them (transformers' convention): role and plain-text
    content; an assistant turn's `tool_calls` with their arguments as objects; a tool result's
    `tool_call_id` and the name of the function it answers."""
    converted: list[dict[str, Any]] = []
    names: dict[str, str] = {}  # tool call id -> function name
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if message.role == "function" or message.function_call:
            raise bad_request(f"{where}: function messages are deprecated; send tool calls and "
                              "role \"tool\" messages", param="messages")
        entry: dict[str, Any] = {"role": "system" if message.role == "developer" else message.role}
        if message.content is None and not message.tool_calls:
            raise bad_request(f"{where}.content is required", param="messages")
        entry["content"] = "" if message.content is None else _text_of(message.content, where)
        if message.tool_calls:
            entry["tool_calls"] = [_call(call) for call in message.tool_calls]
            names.update((call.id, call.function.name) for call in message.tool_calls)
        if message.role == "tool":
            if message.tool_call_id is not None:
                entry["tool_call_id"] = message.tool_call_id
            name = message.name or names.get(message.tool_call_id or "")
            if name:
                entry["name"] = name
        elif message.name:
            entry["name"] = message.name
        converted.append(entry)
    return converted


def _call(call: Any) -> dict[str, Any]:
    """Arguments as an object where they parse (templates write them with `tojson`)."""
    try:
        arguments = json.loads(call.function.arguments)
    except json.JSONDecodeError:
        arguments = call.function.arguments
    return {"id": call.id, "type": "function",
            "function": {"name": call.function.name, "arguments": arguments}}


def _text_of(content: str | list[Any], where: str) -> str:
    if isinstance(content, str):
        return content
    texts = []
    for part in content:
        if part.type != "text" or part.text is None:
            raise bad_request(
                f"{where}.content: part type {part.type!r} is not supported; send text parts",
                param="messages",
            )
        texts.append(part.text)
    return "\n".join(texts)


def chat_prompt(tokenizer: Any, messages: list[ChatMessage] | list[dict[str, Any]],
                add_generation_prompt: bool, *, limit_to: Serving | None = None,
                **template_kwargs: Any) -> Prompt:
    """The prompt of a chat. `messages` may be converted already (messages_for_template);
    `template_kwargs` reach the template as variables (`tools`, `enable_thinking`, ...).
    `limit_to`: refuse a rendered prompt too long for its context before tokenizing it."""
    if messages and not isinstance(messages[0], dict):
        messages = messages_for_template(messages)
    try:
        text = tokenizer.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, **template_kwargs
        )
    except (ValueError, TypeError) as error:
        raise bad_request(f"the chat template failed: {error}", param="messages") from None
    if limit_to is not None:
        limit_to.check_chars(text, "messages")
    return Prompt(text, tokenizer.encode(text, add_special_tokens=False))


def tokenize(serving: Serving, request: TokenizeRequest) -> dict[str, Any]:
    serving.resolve_model(request.model)
    tokenizer = serving.tokenizer
    if (request.prompt is None) == (request.messages is None):
        raise bad_request("send exactly one of prompt or messages", param="prompt")
    if request.messages is not None:
        ids = chat_prompt(tokenizer, request.messages, request.add_generation_prompt,
                          limit_to=serving).token_ids
    else:
        serving.check_chars(request.prompt, "prompt")
        add_special = True if request.add_special_tokens is None else request.add_special_tokens
        ids = tokenizer.encode(request.prompt, add_special_tokens=add_special)
    return {"tokens": ids, "count": len(ids), "max_model_len": serving.model.max_model_len}


def detokenize(serving: Serving, request: DetokenizeRequest) -> dict[str, Any]:
    serving.resolve_model(request.model)
    vocab_size = serving.tokenizer.vocab_size
    bad = [t for t in request.tokens if not 0 <= t < vocab_size]
    if bad:
        raise bad_request(
            f"token id {bad[0]} is out of the vocabulary [0, {vocab_size})", param="tokens"
        )
    return {"prompt": serving.tokenizer.decode(request.tokens, skip_special_tokens=False)}
