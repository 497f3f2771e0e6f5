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
        (a, e1), (b, e2) = s.feed(text[:cut]), s.feed(text[cut:])
        rest, e3, made = s.finish()
        assert (a + b + rest).strip() == (content or "") and [c.name for c in made] == ["get_weather"], cut
        assert _calls_of(e1 + e2 + e3) == [("get_weather", {"city": "Paris"})], cut


def _calls_of(events: list[tuple]) -> list[tuple[str, dict]]:
    """What a client rebuilds from streamed call events: per index, the name and the joined arguments."""
    names, args = {}, {}
    for kind, n, x in events:
        if kind == "call":
            assert n not in names and n == len(names)  # announced once, in order, before its arguments
            names[n], args[n] = x.name, ""
        else:
            args[n] += x
    return [(names[n], json.loads(args[n])) for n in sorted(names)]


@pytest.mark.parametrize("fmt", list(TEXTS))
def test_arguments_stream_in_pieces_as_they_are_written(fmt):
    """Fed a character at a time, a call is announced once its name is complete and its arguments
    go out in many pieces, each as soon as it is written; two calls keep their indices."""
    two = {"hermes": TEXTS["hermes"] + "\n" + TEXTS["hermes"].replace("Let me look.\n", "").replace("Paris", "Oslo"),
           "generic": TEXTS["generic"] + TEXTS["generic"].replace("Let me look.", "").replace("Paris", "Oslo"),
           "mistral": TEXTS["mistral"].replace("}}]", '}}, ' + json.dumps(CALL).replace("Paris", "Oslo") + "]"),
           "llama3": TEXTS["llama3"] + "; " + TEXTS["llama3"].replace("Paris", "Oslo")}[fmt]
    s = StreamedCalls(fmt, TOOLS, forced_call=False)
    events, content = [], ""
    for i, ch in enumerate(two):
        text, got = s.feed(ch)
        content += text
        events += got
        for kind, _, piece in got:  # each piece is what was just written, sent at once
            assert kind == "call" or two[: i + 1].endswith(piece)
    rest, more, made = s.finish()
    assert _calls_of(events + more) == [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Oslo"})]
    assert sum(k == "arguments" for k, _, _ in events) >= 10 and [c.name for c in made] == ["get_weather"] * 2
    assert (content + rest).strip() == ("" if fmt == "llama3" else "Let me look.")
    one = StreamedCalls(fmt, TOOLS, forced_call=False, parallel=False)
    for ch in two:
        one.feed(ch)
    assert [c.arguments for c in one.finish()[2]] == ['{"city": "Paris"}']


def test_a_call_cut_off_is_not_complete():
    s = StreamedCalls("hermes", TOOLS, forced_call=True)
    _, events = s.feed('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par')
    assert [k for k, _, _ in events] == ["call", "arguments"] and events[1][2] == '{"city": "Par'
    assert s.finish() == ("", [], [])


def test_text_that_is_no_call_stays_text():
    for fmt, text in (("hermes", "<tool_call>{not json}</tool_call>"), ("generic", "<tool_call>{\"name\": \"other\"}"
                                                                                   "</tool_call>"),
                      ("mistral", "[TOOL_CALLS] nothing"), ("llama3", "{\"a\": 1} is a dict")):
        assert parse(text, fmt, TOOLS) == (text, [])
        s = StreamedCalls(fmt, TOOLS, forced_call=False)
        out, events = s.feed(text)
        rest, more, made = s.finish()
        assert out + rest == text and made == [] and events + more == []


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


@pytest.fixture(scope="module")
def admits(real_model):
    """admits(grammar, text): whether llguidance, on SmolLM2's vocabulary, takes `text` whole as `grammar`."""
    import llguidance

    tok = Tokenizer(real_model)
    grammars = Grammars(tok, 49152, tok.eos_ids)

    def check(lark: str, text: str) -> bool:
        m = llguidance.LLMatcher(grammars._tok(), grammars.lark(lark), log_level=0)
        return m.consume_tokens(tok.encode(text, add_special_tokens=False)) and m.is_accepting()

    return check


@pytest.mark.parametrize("fmt", list(TEXTS))
def test_each_layouts_grammar_admits_a_call_and_refuses_a_bad_one(admits, fmt):
    grammar = call_grammar(TOOLS, fmt, parallel=True)
    good = TEXTS[fmt].replace("Let me look.", "").lstrip("\n")
    assert admits(grammar, good) and not admits(grammar, good.replace('"Paris"', "42"))
    assert not admits(grammar, "It is sunny.")


@pytest.mark.parametrize("fmt", list(TEXTS))
def test_under_auto_text_is_free_and_a_started_call_must_be_valid(admits, fmt):
    """The lazy grammar of tool_choice auto: any text, a call after text, never a broken call."""
    lazy = call_grammar(TOOLS, fmt, parallel=False, lazy=True)
    assert admits(lazy, "It is sunny in Paris today, 21 C {or so} [really].")
    assert admits(lazy, TEXTS[fmt])
    assert not admits(lazy, TEXTS[fmt].replace('"Paris"', "42"))  # arguments off the schema
    assert not admits(lazy, TEXTS[fmt].replace("get_weather", "get_time"))  # a function not given
    if fmt != "llama3":
        two = (TEXTS[fmt].replace("}}]", f"}}}}, {json.dumps(CALL)}]") if fmt == "mistral" else
               TEXTS[fmt] + "\n" + TEXTS[fmt].replace("Let me look.", "").lstrip("\n"))
        assert not admits(lazy, two)  # a second call, not parallel
        assert admits(call_grammar(TOOLS, fmt, parallel=True, lazy=True), two)


def test_a_value_read_as_it_grows_ends_where_it_ends():
    """partial_json.Scan, fed the text a character more at a time (a streamed call's arguments are
    read once, not once per piece), finds each value's end exactly: escapes, quotes and brackets
    inside strings included."""
    from engine.app.server import partial_json as PJ

    value = json.dumps({"a": 'say "hi" \\ {not [a] bracket}', "b": [1, {"c": "]"}], "d": "\\u00e9"})
    for text in (value, json.dumps("a \"quoted\" \\ string"), json.dumps([[], {}, "x"])):
        scan, whole = PJ.Scan(0), text + ', "next": 1}'
        ends = [scan.advance(whole[:i]) for i in range(1, len(whole) + 1)]
        assert ends[: len(text) - 1] == [None] * (len(text) - 1) and set(ends[len(text) - 1 :]) == {len(text)}
