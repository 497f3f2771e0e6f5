"""Tool calls out of text, in each layout a chat template teaches (Hermes/Qwen tags, Mistral's
[TOOL_CALLS], Llama 3 JSON, hetpipe's generic tags), whole and split across stream chunks at every
point; each layout's call grammar admits a valid call and refuses an invalid one (llguidance on
SmolLM2's vocabulary); the layout is read from real templates' text."""

from __future__ import annotations

import json

import pytest

from engine.app.server.schemas import ChatRequest
from engine.app.server.tools import StreamedCalls, call_grammar, parse, render, template_format
from engine.serving.structured import Grammars
from engine.serving.text import Tokenizer

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"], "additionalProperties": False}}}
TOOLS = ChatRequest.model_validate({"messages": [{"role": "user", "content": "x"}], "tools": [WEATHER]}).tools

CALL = {"name": "get_weather", "arguments": {"city": "Paris"}}
TEXTS = {
    "hermes": f'Let me look.\n<tool_call>\n{json.dumps(CALL)}\n</tool_call>',
    "generic": f'Let me look.<tool_call>{json.dumps(CALL)}</tool_call>',
    "mistral": f'Let me look.[TOOL_CALLS][{json.dumps(CALL)}]',
    "llama3": json.dumps({"name": "get_weather", "parameters": {"city": "Paris"}}),
}


@pytest.mark.parametrize("fmt", list(TEXTS))
def test_each_layout_parses_whole_and_split_at_every_point(fmt):
    text = TEXTS[fmt]
    content, calls = parse(text, fmt, TOOLS)
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Paris"})]
    assert content == (None if fmt == "llama3" else "Let me look.")
    for cut in range(len(text) + 1):
        s = StreamedCalls(fmt, TOOLS, forced_call=False)
        streamed = s.feed(text[:cut]) + s.feed(text[cut:])
        rest, made = s.finish()
        assert (streamed + rest).strip() == (content or "") and [c.name for c in made] == ["get_weather"], cut


def test_text_that_is_no_call_stays_text():
    for fmt, text in (("hermes", "<tool_call>{not json}</tool_call>"), ("generic", "<tool_call>{\"name\": \"other\"}"
                                                                                   "</tool_call>"),
                      ("mistral", "[TOOL_CALLS] nothing"), ("llama3", "{\"a\": 1} is a dict")):
        assert parse(text, fmt, TOOLS) == (text, [])
        s = StreamedCalls(fmt, TOOLS, forced_call=False)
        out = s.feed(text)
        rest, made = s.finish()
        assert out + rest == text and made == []


def test_templates_name_their_layout(real_model):
    qwen = "{%- if tools %}<tools>{{ tool | tojson }}</tools> ... <tool_call>\\n{{ tool_call | tojson }}"
    mistral = "{%- if tools %}[AVAILABLE_TOOLS]{{ tools }}[/AVAILABLE_TOOLS]{%- endif %}[TOOL_CALLS]"
    llama = '{%- if tools %}Respond in the format {"name": function name, "parameters": ...}<|python_tag|>'
    assert [template_format(t) for t in (qwen, mistral, llama, None)] == ["hermes", "mistral", "llama3", "generic"]
    assert template_format(Tokenizer(real_model).chat_template) == "generic"  # SmolLM2's knows no tools


def test_a_generic_template_is_taught_the_tools_in_a_system_message():
    req = ChatRequest.model_validate({"messages": [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "3 C"}], "tools": [WEATHER]})
    messages, tools = render(req, "generic")
    assert tools is None and messages[0]["role"] == "system" and '"get_weather"' in messages[0]["content"]
    assert messages[2]["content"] == '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>'
    assert messages[3] == {"role": "user", "content": "<tool_response>3 C</tool_response>"}
    messages, tools = render(req, "hermes")  # a template that knows tools gets them, and the calls as objects
    assert tools == [WEATHER] and messages[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Oslo"}
    assert messages[2]["tool_call_id"] == "c1"


@pytest.mark.parametrize("fmt", list(TEXTS))
def test_each_layouts_grammar_admits_a_call_and_refuses_a_bad_one(real_model, fmt):
    import llguidance

    tok = Tokenizer(real_model)
    grammars = Grammars(tok, 49152, tok.eos_ids)
    grammar = grammars.lark(call_grammar(TOOLS, fmt, parallel=True))
    good = TEXTS[fmt].replace("Let me look.", "").lstrip("\n")
    bad = good.replace('"Paris"', "42")

    def admits(text: str) -> bool:
        m = llguidance.LLMatcher(grammars._tok(), grammar, log_level=0)
        return m.consume_tokens(tok.encode(text, add_special_tokens=False)) and m.is_accepting()

    assert admits(good) and not admits(bad)
