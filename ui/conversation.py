"""A chat conversation as the chat tab keeps it: turns, each reply's statistics, and the two views
of it: what the Chatbot shows (replies with their statistics line) and what the model is sent (plain
role/content messages, with the system prompt first). Pure: no gradio, no engine.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

STOPPED = "stopped"  # finish reason of a reply cut short with the Stop button
ABORTED = "abort"  # the server aborted the request (appliance.deltas.ABORT), e.g. on shutdown


@dataclass(frozen=True)
class ReplyStats:
    num_prompt_tokens: int
    num_cached_tokens: int
    num_generated_tokens: int
    ttft_s: float | None  # None: no token came
    decode_s: float | None  # from the first token to the last; None with fewer than two tokens
    finish_reason: str | None  # "stop", "length", STOPPED, or None while streaming

    @property
    def tokens_per_s(self) -> float | None:
        if not self.decode_s or self.num_generated_tokens < 2:
            return None
        return (self.num_generated_tokens - 1) / self.decode_s


@dataclass(frozen=True)
class Turn:
    role: str  # "user" or "assistant"
    content: str
    stats: ReplyStats | None = None
    error: bool = False  # an error shown in the chat; never sent back to the model


def format_stats(stats: ReplyStats) -> str:
    ttft = "n/a" if stats.ttft_s is None else f"{stats.ttft_s:.2f} s"
    rate = stats.tokens_per_s
    parts = [
        f"TTFT {ttft}",
        "n/a tok/s" if rate is None else f"{rate:.1f} tok/s",
        f"{stats.num_prompt_tokens} prompt tokens ({stats.num_cached_tokens} cached)",
        f"{stats.num_generated_tokens} generated",
    ]
    if stats.finish_reason == STOPPED:
        parts.append("stopped")
    elif stats.finish_reason == "length":
        parts.append("hit max tokens")
    elif stats.finish_reason == ABORTED:
        parts.append("aborted by the server")
    return " · ".join(parts)


def display_messages(turns: list[Turn]) -> list[dict[str, str]]:
    """The Chatbot's value: each reply followed by its statistics line."""
    messages = []
    for turn in turns:
        content = turn.content
        if turn.error:
            content = f"⚠️ {content}"
        elif turn.stats is not None and turn.stats.finish_reason is not None:
            content = f"{content}\n\n*{format_stats(turn.stats)}*"
        messages.append({"role": turn.role, "content": content})
    return messages


def model_messages(system_prompt: str, turns: list[Turn]) -> list[dict[str, str]]:
    """What the chat template gets: the system prompt (if any) and the turns, errors left out.

    A user message whose reply failed is left out too: the conversation stays alternating."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt.strip() else []
    for i, turn in enumerate(turns):
        failed = turn.role == "user" and i + 1 < len(turns) and turns[i + 1].error
        if not (turn.error or failed):
            messages.append({"role": turn.role, "content": turn.content})
    return messages


def mark_stopped(turns: list[Turn]) -> list[Turn]:
    """After Stop: the last reply, if still streaming, ends as stopped."""
    if not turns or turns[-1].role != "assistant" or turns[-1].error:
        return turns
    last = turns[-1]
    stats = last.stats or ReplyStats(0, 0, 0, None, None, None)
    if stats.finish_reason is not None:
        return turns
    return [*turns[:-1], replace(last, stats=replace(stats, finish_reason=STOPPED))]
