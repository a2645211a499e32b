"""Chat messages → prompt through the model's chat template, and the /tokenize and /detokenize
routes (which accept the same messages, so that a client can count a chat's tokens)."""

from __future__ import annotations

from typing import Any

from hearth.appliance.protocol import ChatMessage, DetokenizeRequest, TokenizeRequest, bad_request
from hearth.appliance.serving.core import Prompt, Serving


def messages_for_template(messages: list[ChatMessage]) -> list[dict[str, str]]:
    """Chat messages as the template wants them: role and plain-text content."""
    converted = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if message.role in ("tool", "function") or message.tool_calls or message.function_call:
            raise bad_request(
                f"{where}: tool and function messages are not supported", param="messages"
            )
        if message.content is None:
            raise bad_request(f"{where}.content is required", param="messages")
        converted.append(
            {
                "role": "system" if message.role == "developer" else message.role,
                "content": _text_of(message.content, where),
            }
        )
    return converted


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


def chat_prompt(tokenizer: Any, messages: list[ChatMessage], add_generation_prompt: bool) -> Prompt:
    try:
        text = tokenizer.apply_chat_template(
            messages_for_template(messages), add_generation_prompt=add_generation_prompt
        )
    except ValueError as error:
        raise bad_request(f"the chat template failed: {error}", param="messages") from None
    return Prompt(text, tokenizer.encode(text, add_special_tokens=False))


def tokenize(serving: Serving, request: TokenizeRequest) -> dict[str, Any]:
    serving.resolve_model(request.model)
    tokenizer = serving.tokenizer
    if (request.prompt is None) == (request.messages is None):
        raise bad_request("send exactly one of prompt or messages", param="prompt")
    if request.messages is not None:
        ids = chat_prompt(tokenizer, request.messages, request.add_generation_prompt).token_ids
    else:
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
