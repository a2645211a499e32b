"""Tool-call and reasoning parsers on recorded model outputs, whole and streamed in every split:
the same calls, the same content, and no markup in content (appliance/serving/tool_parsers.py,
json_stream.py, reasoning.py, chat_output.py)."""

from __future__ import annotations

import json
import random

import pytest

from hearth.appliance.serving.chat_output import ChoiceOutput, OutputPlan
from hearth.appliance.serving.reasoning import ThinkParser, template_kwargs
from hearth.appliance.serving.tool_parsers import detect
from hearth.appliance.settings import REASONING_PARSERS, TOOL_CALL_PARSERS

WEATHER = ("get_weather", {"city": "Paris", "unit": "celsius"})
TIME = ("get_time", {"zone": "Europe/Paris", "nested": {"a": [1, "}{"]}})

# (parser, the model's text, want content, want calls [(name, arguments)], special-token texts)
RECORDED = [
    ("hermes", 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": '
               '{"city": "Paris", "unit": "celsius"}}\n</tool_call>', "Let me check.", [WEATHER]),
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": '
               '"celsius"}}\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": '
               '{"zone": "Europe/Paris", "nested": {"a": [1, "}{"]}}}\n</tool_call>', None,
     [WEATHER, TIME]),
    ("hermes", "The capital of France is Paris.", "The capital of France is Paris.", []),
    ("hermes", "Use <b>bold</b> and a < sign.", "Use <b>bold</b> and a < sign.", []),
    ("hermes", "<tool_call>\nnot json at all\n</tool_call>",
     "<tool_call>\nnot json at all\n</tool_call>", []),
    ("hermes", '<tool_call>\n{"arguments": {"city": "Paris", "unit": "celsius"}, '
               '"name": "get_weather"}\n</tool_call>', None, [WEATHER]),
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\", '
               '\\"unit\\": \\"celsius\\"}"}\n</tool_call>', None, [WEATHER]),
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": '
               '"celsius"}}', None, [WEATHER]),  # EOS before the closing tag (Qwen2.5 does this)
    ("llama3_json", '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}',
     None, [WEATHER]),
    ("llama3_json", '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris", '
                    '"unit": "celsius"}}; {"name": "get_time", "parameters": {"zone": '
                    '"Europe/Paris", "nested": {"a": [1, "}{"]}}}<|eom_id|>', None,
     [WEATHER, TIME]),
    ("llama3_json", "Paris is the capital of France.<|eot_id|>",
     "Paris is the capital of France.", []),
    ("llama3_json", '{"answer": 42}', '{"answer": 42}', []),
    ("mistral", '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris", "unit": '
                '"celsius"}}, {"name": "get_time", "arguments": {"zone": "Europe/Paris", '
                '"nested": {"a": [1, "}{"]}}}]</s>', None, [WEATHER, TIME]),
    ("mistral", 'Checking.[TOOL_CALLS]get_weather[ARGS]{"city": "Paris", "unit": "celsius"}'
                '[TOOL_CALLS]get_time[ARGS]{"zone": "Europe/Paris", "nested": {"a": [1, "}{"]}}'
                '</s>', "Checking.", [WEATHER, TIME]),
    ("mistral", "Bonjour! [Paris] is lovely.</s>", "Bonjour! [Paris] is lovely.", []),
    ("required", '[{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}, '
                 '{"name": "get_time", "parameters": {"zone": "Europe/Paris", "nested": '
                 '{"a": [1, "}{"]}}}]', None, [WEATHER, TIME]),
]
EOS_TEXTS = ("<|eot_id|>", "<|eom_id|>", "</s>")


def _plan(parser: str) -> OutputPlan:
    return OutputPlan(tool_parser=parser, drop=EOS_TEXTS)


def _calls(message_calls):
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in message_calls]


@pytest.mark.parametrize("parser, text, content, calls", RECORDED,
                         ids=[f"{r[0]}-{i}" for i, r in enumerate(RECORDED)])
def test_whole_answers(parser, text, content, calls):
    output = _plan(parser).choice()
    message = output.message(text)
    assert message["content"] == content
    assert _calls(message["tool_calls"]) == calls
    assert all(c["id"].startswith("call_") and c["type"] == "function"
               for c in message["tool_calls"])
    assert output.finish_reason("stop") == ("tool_calls" if calls else "stop")
    assert output.finish_reason("length") == "length"


@pytest.mark.parametrize("parser, text, content, calls", RECORDED,
                         ids=[f"{r[0]}-{i}" for i, r in enumerate(RECORDED)])
@pytest.mark.parametrize("split", ["chars", "random"])
def test_streamed_answers_match_and_leak_no_markup(parser, text, content, calls, split):
    rng = random.Random(len(text))
    pieces, i = [], 0
    while i < len(text):
        step = 1 if split == "chars" else rng.randint(1, 9)
        pieces.append(text[i:i + step])
        i += step
    output = _plan(parser).choice()
    deltas = [output.feed(piece) for piece in pieces] + [output.finish()]
    streamed = "".join(d.content for d in deltas)
    assert streamed == (content or "")
    if calls:
        for marker in ("<tool_call>", "[TOOL_CALLS]", "<|python_tag|>", '"name"'):
            assert marker not in streamed
    by_index: dict[int, dict] = {}
    for delta in (d for part in deltas for d in part.tool_calls):
        if "id" in delta:  # a call's first delta: id, type, name, before any argument text
            assert delta["index"] not in by_index and delta["function"]["arguments"] == ""
            by_index[delta["index"]] = {"name": delta["function"]["name"], "arguments": ""}
        else:
            by_index[delta["index"]]["arguments"] += delta["function"]["arguments"]
    got = [(c["name"], json.loads(c["arguments"])) for _, c in sorted(by_index.items())]
    assert got == calls


def test_arguments_stream_before_the_call_ends():
    output = _plan("hermes").choice()
    first = output.feed('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa')
    assert first.tool_calls[0]["function"]["name"] == "get_weather"
    assert first.tool_calls[1]["function"]["arguments"] == '{"city": "Pa'


def test_parallel_tool_calls_false_keeps_the_first_call():
    plan = OutputPlan(tool_parser="required", parallel_tool_calls=False)
    message = plan.choice().message(RECORDED[-1][1])
    assert _calls(message["tool_calls"]) == [WEATHER]


def test_named_call_is_the_arguments():
    plan = OutputPlan(tool_parser="named", tool_name="get_weather")
    message = plan.choice().message('{"city": "Paris", "unit": "celsius"}')
    assert _calls(message["tool_calls"]) == [WEATHER] and message["content"] is None


# ---- reasoning ---------------------------------------------------------------------------------

THINKING = [
    # (prompt opened <think>, the answer, want reasoning, want content)
    (False, "<think>\nThe user asks about France.\n</think>\n\nParis.",
     "\nThe user asks about France.\n", "Paris."),
    (False, "Paris.", "", "Paris."),  # Qwen3 with enable_thinking false: no block at all
    (True, "Hmm, France.\n</think>\n\nParis.", "Hmm, France.\n", "Paris."),  # DeepSeek-R1
    (False, "<think>still thinking when max_tokens ran out", "still thinking when max_tokens "
     "ran out", ""),
    (False, "<thinking is not the tag", "", "<thinking is not the tag"),
]


@pytest.mark.parametrize("inside, text, reasoning, content", THINKING)
def test_think_blocks_split_whole_and_streamed(inside, text, reasoning, content):
    whole = OutputPlan(reasoning=True, starts_in_reasoning=inside).choice().message(text)
    assert (whole["reasoning_content"] or "", whole["content"]) == (reasoning, content)
    parser = ThinkParser(inside)
    parts = [parser.feed(ch) for ch in text] + [parser.finish()]
    assert "".join(p.reasoning for p in parts) == reasoning
    assert "".join(p.content for p in parts) == content


def test_thinking_then_tool_call():
    plan = OutputPlan(tool_parser="hermes", reasoning=True)
    message = plan.choice().message(
        '<think>\nI need the weather tool.\n</think>\n\n<tool_call>\n{"name": "get_weather", '
        '"arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>')
    assert message["reasoning_content"] == "\nI need the weather tool.\n"
    assert message["content"] is None and _calls(message["tool_calls"]) == [WEATHER]


QWEN3_LIKE = ("{%- if enable_thinking is defined and enable_thinking is false %}<think>\n\n"
              "</think>\n\n{%- endif %}{{ messages }}")
GPT_OSS_LIKE = "Reasoning: {{ reasoning_effort }} {{ messages }}"


def test_template_kwargs_map_reasoning_effort():
    assert template_kwargs(None, "none", QWEN3_LIKE, False) == {"enable_thinking": False}
    assert template_kwargs(None, "high", QWEN3_LIKE, False) == {"enable_thinking": True}
    assert template_kwargs({"enable_thinking": True}, "none", QWEN3_LIKE, False) == {
        "enable_thinking": True}  # the explicit kwarg wins
    assert template_kwargs(None, None, QWEN3_LIKE, True) == {"enable_thinking": False}
    assert template_kwargs(None, "low", GPT_OSS_LIKE, False) == {"reasoning_effort": "low"}
    assert template_kwargs({"x": 1}, "low", "{{ messages }}", False) == {"x": 1}


def test_family_detection_from_templates():
    assert detect("{{ '<tool_call>' }}{% for tool in tools %}") == "hermes"
    assert detect("{{- '<|python_tag|>' }}{% if tools %}") == "llama3_json"
    assert detect("[AVAILABLE_TOOLS]{{ tools }}[TOOL_CALLS]") == "mistral"
    assert detect(None) == "hermes"


def test_settings_choices_match_the_parsers():
    from hearth.appliance.serving import reasoning, tool_parsers

    assert set(TOOL_CALL_PARSERS) == {"auto", "none", *tool_parsers.PARSERS,
                                      *tool_parsers.ALIASES}
    assert set(REASONING_PARSERS) == {"auto", "none", *reasoning.PARSERS, *reasoning.ALIASES}


def test_choice_output_without_parsers_passes_text_through():
    output: ChoiceOutput = OutputPlan().choice()
    assert output.message("<tool_call>x</tool_call>") == {
        "role": "assistant", "content": "<tool_call>x</tool_call>", "tool_calls": []}
