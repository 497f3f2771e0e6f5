"""`hetpipe serve` as a real process on loopback, driven by the official `openai` client (and plain
HTTP where the client hides the wire): streaming, usage, logprobs, n, seeds, structured output,
every error path, the API key, disconnects, metrics, a server over a stage daemon, and the page in
a headless chromium."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time

import httpx
import jsonschema
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from engine.api import Generator
from engine.app.procs import start_server, start_stage, stop_stages

KEY = "sk-test-hetpipe"
CHAT = [{"role": "user", "content": "Name three colours."}]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40},
                                                  "unit": {"enum": ["c", "f"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 20}},
                                       "required": ["zone"]}, "strict": True}}


@pytest.fixture(scope="module")
def server(real_model):
    proc, url = start_server(["--model", str(real_model), "--local", "torch", "--port", "0", "--api-key", KEY])
    yield url
    stop_stages([proc])


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=120)


def http(server, path, body=None, key=KEY, timeout=120.0):
    headers = {"authorization": f"Bearer {key}"} if key else {}
    if body is None:
        return httpx.get(server + path, headers=headers, timeout=timeout)
    return httpx.post(server + path, headers=headers, timeout=timeout,
                      **({"content": body} if isinstance(body, (str, bytes)) else {"json": body}))


def wait_live(server, want: int, timeout_s: float = 10.0) -> list[dict]:
    deadline = time.monotonic() + timeout_s
    while True:
        stages = http(server, "/health").json()["stages"]
        if all(s["live_sequences"] == want for s in stages) or time.monotonic() > deadline:
            return stages
        time.sleep(0.1)


def test_stream_equals_non_stream_with_usage(client):
    kw = dict(model="smollm2", messages=CHAT, max_tokens=24, temperature=0)
    client.chat.completions.create(**kw)  # its prompt cached now: both below find the same prefix
    full = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    with_choices = [c for c in chunks if c.choices]
    assert [c.choices[0].finish_reason for c in with_choices][-1] == full.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in with_choices[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage == full.usage
    assert all(c.usage is None for c in chunks[:-1])
    text = "".join(c.choices[0].delta.content or "" for c in with_choices)
    assert text == full.choices[0].message.content and text
    assert full.usage.completion_tokens <= 24 and full.usage.prompt_tokens > 5


def test_cached_prompt_tokens_are_reported_and_change_nothing(client):
    history = "Field notes from the survey of the northern lakes, written up each evening. " * 8
    kw = dict(model="smollm2", max_tokens=12, temperature=0,
              messages=[{"role": "system", "content": history}, {"role": "user", "content": "Which lake was deepest?"}])
    first = client.chat.completions.create(**kw)
    again = client.chat.completions.create(**kw)
    streamed = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert first.usage.prompt_tokens > 100 and first.usage.prompt_tokens_details.cached_tokens == 0
    # every full block of the prompt but the one holding its last token (which must be computed)
    want = (first.usage.prompt_tokens - 1) // 16 * 16
    assert again.usage.prompt_tokens_details.cached_tokens == want
    assert streamed[-1].usage.prompt_tokens_details.cached_tokens == want
    assert again.choices[0].message.content == first.choices[0].message.content
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == first.choices[0].message.content


def test_greedy_matches_the_python_api(client, real_model):
    from engine.api import Generator, local_pipeline

    with Generator(real_model, local_pipeline(real_model, "torch")) as gen:
        want = gen.generate(CHAT, max_tokens=16).text
    got = client.chat.completions.create(model="smollm2", messages=CHAT, max_tokens=16, temperature=0)
    assert got.choices[0].message.content == want


def test_n_seed_and_logprobs(client):
    kw = dict(model="smollm2", messages=CHAT, max_tokens=8, temperature=1.0, n=2, seed=7, logprobs=True,
              top_logprobs=3)
    a, b = client.chat.completions.create(**kw), client.chat.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]  # seeded: repeats
    assert a.usage.completion_tokens == sum(len(c.logprobs.content) for c in a.choices)
    for c in a.choices:
        assert "".join(t.token for t in c.logprobs.content) == c.message.content
        for t in c.logprobs.content:
            tops = [x.logprob for x in t.top_logprobs]
            assert len(tops) == 3 and tops == sorted(tops, reverse=True) and t.logprob <= tops[0] + 1e-9
            assert t.logprob <= 0


SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 16},
                                      "age": {"type": "integer", "minimum": 0, "maximum": 120}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"colour": {"enum": ["red", "green", "blue"]},
                                      "count": {"type": "integer", "minimum": 1, "maximum": 9}},
     "required": ["colour", "count"], "additionalProperties": False},
    {"type": "object", "properties": {"fruits": {"type": "array", "items": {"type": "string", "maxLength": 12},
                                                 "minItems": 1, "maxItems": 3}},
     "required": ["fruits"], "additionalProperties": False},
]


@pytest.mark.parametrize("schema", SCHEMAS, ids=["person", "enum", "array"])
def test_json_schema_output_validates_and_repeats(client, schema):
    kw = dict(model="smollm2", max_tokens=120, temperature=0,
              messages=[{"role": "user", "content": "Answer in JSON: describe something."}],
              response_format={"type": "json_schema", "json_schema": {"name": "thing", "schema": schema}})
    first = client.chat.completions.create(**kw)
    assert first.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(first.choices[0].message.content), schema)
    assert client.chat.completions.create(**kw).choices[0].message.content == first.choices[0].message.content


def test_json_object_and_streamed_schema(client):
    out = client.chat.completions.create(
        model="smollm2", max_tokens=150, temperature=0, response_format={"type": "json_object"},
        messages=[{"role": "user", "content": 'Reply with a JSON object with the key "answer" holding the capital '
                                              'of France.'}])
    assert isinstance(json.loads(out.choices[0].message.content), dict)
    chunks = client.chat.completions.create(
        model="smollm2", max_tokens=120, temperature=0, stream=True, messages=CHAT,
        response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": SCHEMAS[1]}})
    jsonschema.validate(json.loads("".join(c.choices[0].delta.content or "" for c in chunks if c.choices)),
                        SCHEMAS[1])


def test_completions_prompt_forms_and_echo(client, real_model):
    ids = client.completions.create(model="smollm2", prompt="The sky is", max_tokens=4, temperature=0, logprobs=0)
    by_text = ids.choices[0].text
    assert len(ids.choices[0].logprobs.tokens) == 4 and "".join(ids.choices[0].logprobs.tokens) == by_text
    two = client.completions.create(model="smollm2", prompt=["The sky is", "Bread rises because"], max_tokens=4,
                                    temperature=0)
    assert [c.index for c in two.choices] == [0, 1] and two.choices[0].text == by_text
    echo = client.completions.create(model="smollm2", prompt="The sky is", max_tokens=4, temperature=0, echo=True)
    assert echo.choices[0].text == "The sky is" + by_text
    from engine.serving.text import Tokenizer

    toks = Tokenizer(real_model).encode("The sky is")
    as_ids = client.completions.create(model="smollm2", prompt=toks, max_tokens=4, temperature=0)
    assert as_ids.choices[0].text == by_text
    streamed = client.completions.create(model="smollm2", prompt="The sky is", max_tokens=4, temperature=0,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == by_text


def test_sampling_fields_are_honoured(client, real_model):
    base = dict(model="smollm2", messages=CHAT, max_tokens=12, temperature=0)
    plain = client.chat.completions.create(**base).choices[0].message.content
    first = client.chat.completions.create(**base, logprobs=True).choices[0].logprobs.content[0].token
    from engine.serving.text import Tokenizer

    tok = Tokenizer(real_model)
    banned = tok.encode(first, add_special_tokens=False)[0]
    biased = client.chat.completions.create(**base, logit_bias={str(banned): -100}).choices[0].message.content
    assert not biased.startswith(first) and biased != plain
    loop = dict(model="smollm2", prompt="1, 1, 1, 1, 1, 1, 1, 1,", max_tokens=8, temperature=0)
    repeats = client.completions.create(**loop).choices[0].text
    assert repeats.count("1") >= 3  # greedy goes on repeating; OpenAI's penalties (output only) break it
    penalised = client.completions.create(**loop, frequency_penalty=2.0, presence_penalty=1.0).choices[0].text
    assert penalised.count("1") < repeats.count("1")
    stopped = client.chat.completions.create(**{**base, "stop": [plain[3:6]]}).choices[0]
    assert stopped.finish_reason == "stop" and stopped.message.content == plain[: plain.index(plain[3:6])]


def error_of(r: httpx.Response) -> dict:
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert "Traceback" not in body["error"]["message"]
    return body["error"]


def test_error_statuses_and_shapes(server, client):
    chat = {"model": "smollm2", "messages": CHAT, "max_tokens": 4}
    cases = [
        ({**chat, "temperature": 5}, 400, "temperature"),
        ({**chat, "tools": [{"type": "function", "function": {"name": "f", "bogus": 1}}]}, 400,
         "tools.0.function.bogus"),
        ({**chat, "tool_choice": "required"}, 400, "tool_choice"),
        ({**chat, "tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, 400,
         "tool_choice"),
        ({**chat, "messages": [*CHAT, {"role": "tool", "content": "18 C"}]}, 400, "messages.1.tool_call_id"),
        ({**chat, "messages": [*CHAT, {"role": "assistant", "content": None}]}, 400, "messages.1.content"),
        ({**chat, "messages": [*CHAT, {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{not json"}}]}]}, 400,
         "messages.1.tool_calls.0.function.arguments"),
        ({**chat, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
         400, None),
        ({**chat, "top_logprobs": 30, "logprobs": True}, 400, "top_logprobs"),
        ({**chat, "max_tokens": 9000}, 400, "messages"),
        ({**chat, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
         400, None),
        ({**chat, "logit_bias": {"99999999": 1}}, 400, None),
        ({**chat, "model": "gpt-4"}, 404, "model"),
        ({**chat, "stream": "yes"}, 400, "stream"),  # booleans are strict: no guessing
        ({**chat, "stream": True, "stream_options": {"include_usage": 1}}, 400, "stream_options.include_usage"),
        ({**chat, "stream": True, "stream_options": {"continuous_usage_stats": True}}, 400,
         "stream_options.continuous_usage_stats"),
        ({**chat, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "strict": "true"}}}, 400,
         "response_format.json_schema.strict"),
        ({**chat, "messages": [{"role": "user", "content": "hi", "name": 5}]}, 400, "messages.0.name"),
    ]
    for body, status, param in cases:
        r = http(server, "/v1/chat/completions", body)
        assert r.status_code == status, (body, r.text)
        e = error_of(r)
        if param:
            assert e["param"] == param, (body, e)
    assert "8192" in error_of(http(server, "/v1/chat/completions", {**chat, "max_tokens": 9000}))["message"]
    assert http(server, "/v1/chat/completions", "{not json").status_code == 400
    assert http(server, "/v1/completions", {"model": "smollm2", "prompt": "x", "suffix": "y"}).status_code == 400
    assert error_of(http(server, "/v1/completions", {"prompt": "x", "echo": "false"}))["param"] == "echo"
    assert http(server, "/v1/chat/completions", {"messages": CHAT, "max_tokens": 2}).status_code == 200  # no model
    assert error_of(http(server, "/nope"))["code"] == "not_found"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="other", messages=CHAT)
    assert http(server, "/health").status_code == 200  # none of that took it down


def test_tokenize_and_detokenize_as_vllm_and_transformers_do(server, real_model):
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(real_model)
    text = "Tokenize this, please: 3.14 and ünïcode."
    r = http(server, "/tokenize", {"model": "smollm2", "prompt": text}).json()
    assert r["tokens"] == ref(text)["input_ids"] and r["count"] == len(r["tokens"]) and r["max_model_len"] == 8192
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi", "name": "ada"}]
    r = http(server, "/tokenize", {"messages": messages}).json()
    assert r["tokens"] == ref.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                  return_dict=True)["input_ids"]
    assert http(server, "/detokenize", {"tokens": ref(text)["input_ids"]}).json() == {"prompt": text}
    for path, body, param in (("/tokenize", {"prompt": "x", "messages": messages}, "prompt"),
                              ("/tokenize", {}, "prompt"),
                              ("/detokenize", {"tokens": [10**6]}, "tokens"),
                              ("/detokenize", {"tokens": [-1]}, "tokens.0"),
                              ("/tokenize", {"prompt": "x", "add_special_tokens": "no"}, "add_special_tokens")):
        got = http(server, path, body)
        assert got.status_code == 400 and error_of(got)["param"] == param, (body, got.text)
    assert http(server, "/tokenize", {"prompt": "x"}, key=None).status_code == 401


def test_echo_with_logprobs_scores_the_prompt(server, client, real_model):
    """lm-eval's request: echo, logprobs and max_tokens 0 give each prompt token's log-probability
    (the first null), the same as the Python API's and as a request that also generates."""
    prompt = "The capital of France is Paris"
    scored = client.completions.create(model="smollm2", prompt=prompt, echo=True, logprobs=2, max_tokens=0)
    c = scored.choices[0]
    assert c.text == prompt and c.finish_reason == "length" and scored.usage.completion_tokens == 0
    lp = c.logprobs
    assert len(lp.tokens) == scored.usage.prompt_tokens and "".join(lp.tokens) == prompt
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(x < 0 for x in lp.token_logprobs[1:]) and all(len(t) == 2 for t in lp.top_logprobs[1:])
    assert lp.text_offset == [len("".join(lp.tokens[:i])) for i in range(len(lp.tokens))]
    more = client.completions.create(model="smollm2", prompt=prompt, echo=True, logprobs=2, max_tokens=3,
                                     temperature=0)
    n = len(lp.tokens)
    assert more.choices[0].logprobs.token_logprobs[:n] == lp.token_logprobs
    assert len(more.choices[0].logprobs.tokens) == n + more.usage.completion_tokens
    with Generator(real_model, None) as tok:
        ids = tok.prompt_ids(prompt)
    assert scored.usage.prompt_tokens == len(ids)
    for body, param in (({"prompt": prompt, "echo": True, "logprobs": 1, "stream": True}, "stream"),
                        ({"prompt": prompt, "max_tokens": 0, "stream": True}, "stream"),
                        ({"prompt": prompt, "echo": True, "logprobs": 21}, "logprobs")):
        r = http(server, "/v1/completions", body)
        assert r.status_code == 400 and error_of(r)["param"] == param, r.text


def test_min_tokens_holds_back_the_end(server, client):
    """Greedy: the answer that ended by itself is the start of the one min_tokens keeps going."""
    kw = dict(model="smollm2", temperature=0, max_tokens=64,
              messages=[{"role": "user", "content": "What is the capital of France?"}])
    short = client.chat.completions.create(**kw)
    n = short.usage.completion_tokens
    assert short.choices[0].finish_reason == "stop" and n < 40
    longer = client.chat.completions.create(**kw, extra_body={"min_tokens": n + 8})
    assert longer.usage.completion_tokens >= n + 8
    assert longer.choices[0].message.content.startswith(short.choices[0].message.content)
    r = http(server, "/v1/chat/completions", {**kw, "min_tokens": 65})
    assert r.status_code == 400 and error_of(r)["param"] == "min_tokens"


def test_named_messages_and_continuous_usage(client):
    kw = dict(model="smollm2", max_tokens=8, temperature=0,
              messages=[{"role": "user", "name": "ada", "content": "Name a colour."}])
    full = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={
        "include_usage": True, "continuous_usage_stats": True}))
    assert all(c.usage is not None for c in chunks)
    counts = [c.usage.completion_tokens for c in chunks]
    last, want = chunks[-1].usage, full.usage  # (cached_tokens differ: the second run hits the prefix cache)
    assert counts == sorted(counts) and (last.prompt_tokens, last.completion_tokens, last.total_tokens) == \
        (want.prompt_tokens, want.completion_tokens, want.total_tokens)
    assert all(c.usage.prompt_tokens == full.usage.prompt_tokens for c in chunks)


def test_tools_required_named_streamed_and_multi_turn(client):
    """Under `required` and a named choice decoding is constrained: every call names a defined
    function and its arguments validate, at temperature 1 too; streamed, a call's id and name come
    first, then its arguments; a tool's result goes back in a second turn."""
    asked = [{"role": "user", "content": "What is the weather in Paris?"}]
    # one call each, its strings bounded by the schemas: it always fits in max_tokens
    r = client.chat.completions.create(model="smollm2", messages=asked, tools=[WEATHER, CLOCK], tool_choice="required",
                                       parallel_tool_calls=False, max_tokens=120, n=4, temperature=1.0, seed=5)
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, CLOCK)}
    for c in r.choices:
        assert c.finish_reason == "tool_calls" and c.message.tool_calls
        for call in c.message.tool_calls:
            jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])
            assert call.id.startswith("call_") and call.type == "function"
    named = {"type": "function", "function": {"name": "get_weather"}}
    chunks = list(client.chat.completions.create(model="smollm2", messages=asked, tools=[WEATHER, CLOCK],
                                                 tool_choice=named, parallel_tool_calls=False, max_tokens=120,
                                                 temperature=0, stream=True))  # (sampled, a string may outrun it)
    deltas = [d for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or []]
    assert deltas[0].id and deltas[0].function.name == "get_weather" and deltas[0].function.arguments == ""
    assert len(deltas) > 3 and all(d.id is None and d.index == 0 and d.function.name is None for d in deltas[1:])
    arguments = "".join(d.function.arguments for d in deltas[1:])  # in pieces, as the model wrote them
    jsonschema.validate(json.loads(arguments), schemas["get_weather"])
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    call = r.choices[0].message.tool_calls[0]
    turn2 = client.chat.completions.create(model="smollm2", tools=[WEATHER, CLOCK], max_tokens=16, temperature=0,
                                           messages=[
        *asked, {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "18 C and sunny"}])
    assert turn2.choices[0].finish_reason in ("stop", "length", "tool_calls")
    none = client.chat.completions.create(model="smollm2", messages=asked, tools=[WEATHER], tool_choice="none",
                                          max_tokens=8, temperature=0)
    assert none.choices[0].message.tool_calls is None and none.choices[0].message.content


def test_responses_api_text_tools_stream_and_refusals(server, client):
    """/v1/responses through the official client: instructions and a string input, a required
    function call whose arguments validate, its output fed back as items, the event sequence
    streamed (its deltas making the final text), and stored responses refused by name."""
    tool = {"type": "function", "name": "get_weather", "parameters": WEATHER["function"]["parameters"], "strict": True}
    r = client.responses.create(model="smollm2", input="What is the capital of France?", instructions="Be brief.",
                                max_output_tokens=24, temperature=0, store=False)
    assert r.status == "completed" and r.output_text and r.usage.output_tokens <= 24 and r.usage.input_tokens > 5
    called = client.responses.create(model="smollm2", input="Weather in Paris?", tools=[tool], tool_choice="required",
                                     parallel_tool_calls=False, max_output_tokens=120)
    (fc,) = [o for o in called.output if o.type == "function_call"]
    assert fc.name == "get_weather" and fc.call_id.startswith("call_")
    jsonschema.validate(json.loads(fc.arguments), tool["parameters"])
    back = client.responses.create(model="smollm2", tools=[tool], max_output_tokens=12, temperature=0, input=[
        {"role": "user", "content": "Weather in Paris?"},
        {"type": "function_call", "call_id": fc.call_id, "name": fc.name, "arguments": fc.arguments},
        {"type": "function_call_output", "call_id": fc.call_id, "output": "18 C and sunny"}])
    assert back.status in ("completed", "incomplete") and back.output
    events = list(client.responses.create(model="smollm2", input="Say hi", max_output_tokens=8, temperature=0,
                                          stream=True))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-1] in ("response.completed", "response.incomplete")
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == events[-1].response.output_text
    assert [e.sequence_number for e in events] == list(range(len(events)))
    events = list(client.responses.create(model="smollm2", input="Weather in Paris?", tools=[tool], stream=True,
                                          tool_choice="required", parallel_tool_calls=False, max_output_tokens=120))
    pieces = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
    (done,) = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert len(pieces) > 3 and "".join(pieces) == done.arguments  # streamed as written
    jsonschema.validate(json.loads(done.arguments), tool["parameters"])
    (final,) = [o for o in events[-1].response.output if o.type == "function_call"]
    assert final.arguments == done.arguments and final.name == "get_weather"
    for body, param in (({"input": "x", "previous_response_id": "resp_1"}, "previous_response_id"),
                        ({"input": "x", "store": True}, "store"), ({"input": []}, "input")):
        got = http(server, "/v1/responses", body)
        assert got.status_code == 400 and error_of(got)["param"] == param, got.text


def test_messages_api_with_the_anthropic_client(server):
    """/v1/messages through Anthropic's official client, its key as x-api-key: text with a system
    prompt and the usage; a stop sequence named as met; a required tool's input validates, whole and
    streamed (the client's own accumulator rebuilds it from the input_json_delta pieces); a tool
    result goes back in a second turn; errors in Anthropic's shape."""
    import anthropic

    ac = anthropic.Anthropic(base_url=server, api_key=KEY, max_retries=0, timeout=120)
    hi = [{"role": "user", "content": "Name three colours."}]
    greedy = {"extra_body": {"temperature": 0}}  # the newest client has no temperature argument; the API takes it
    r = ac.messages.create(model="smollm2", max_tokens=24, system="Be brief.", messages=hi, **greedy)
    assert r.type == "message" and r.role == "assistant" and r.content[0].type == "text" and r.content[0].text
    assert r.stop_reason in ("end_turn", "max_tokens") and 0 < r.usage.output_tokens <= 24 and r.usage.input_tokens
    with ac.messages.stream(model="smollm2", max_tokens=24, system="Be brief.", messages=hi, **greedy) as stream:
        assert "".join(stream.text_stream) == r.content[0].text
    word = r.content[0].text.split()[1]
    cut = ac.messages.create(model="smollm2", max_tokens=24, system="Be brief.", messages=hi,
                             stop_sequences=["zzz", word], **greedy)
    assert cut.stop_reason == "stop_sequence" and cut.stop_sequence == word
    assert r.content[0].text.startswith(cut.content[0].text) and word not in cut.content[0].text
    tool = {"name": "get_weather", "description": "The weather in a city",
            "input_schema": WEATHER["function"]["parameters"]}
    asked = [{"role": "user", "content": "What is the weather in Paris?"}]
    called = ac.messages.create(model="smollm2", max_tokens=120, messages=asked, tools=[tool],
                                tool_choice={"type": "any", "disable_parallel_tool_use": True})
    (use,) = [b for b in called.content if b.type == "tool_use"]
    assert called.stop_reason == "tool_use" and use.name == "get_weather"
    jsonschema.validate(use.input, tool["input_schema"])
    with ac.messages.stream(model="smollm2", max_tokens=120, messages=asked, tools=[tool], **greedy,
                            tool_choice={"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True}) \
            as stream:
        kinds = [e.type for e in stream]
        final = stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop" and kinds.count("input_json") > 3
    (use,) = [b for b in final.content if b.type == "tool_use"]
    assert final.stop_reason == "tool_use" and use.id.startswith("call_")
    jsonschema.validate(use.input, tool["input_schema"])
    back = ac.messages.create(model="smollm2", max_tokens=12, tools=[tool], **greedy, messages=[
        *asked, {"role": "assistant", "content": [{"type": "tool_use", "id": use.id, "name": use.name,
                                                   "input": use.input}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "18 C, sunny"}]}])
    assert back.stop_reason in ("end_turn", "max_tokens", "tool_use") and back.content
    shaped = ac.messages.create(model="smollm2", max_tokens=60, messages=asked, output_config={"format": {
        "type": "json_schema", "schema": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                                          "required": ["city"], "additionalProperties": False}}})
    assert shaped.stop_reason == "end_turn" and set(json.loads(shaped.content[0].text)) == {"city"}
    with pytest.raises(anthropic.BadRequestError) as bad:
        ac.messages.create(model="smollm2", max_tokens=8, messages=[*hi, {"role": "assistant", "content": "Red"}])
    error = bad.value.body["error"]
    assert error["type"] == "invalid_request_error" and "prefill" in error["message"]
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=server, api_key="sk-wrong", max_retries=0).messages.create(
            model="smollm2", max_tokens=8, messages=hi)
    refused = httpx.post(server + "/v1/messages", headers={"x-api-key": KEY}, json={"max_tokens": 8, "messages": hi,
                                                                                    "thinking": {"type": "enabled"}})
    assert refused.status_code == 400 and refused.json()["type"] == "error"
    assert "thinking" in refused.json()["error"]["message"]


def test_api_key_is_enforced(server):
    for key in (None, "sk-wrong"):
        assert http(server, "/v1/models", key=key).status_code == 401
        r = http(server, "/v1/chat/completions", {"model": "smollm2", "messages": CHAT}, key=key)
        assert r.status_code == 401 and error_of(r)["type"] == "authentication_error"
        assert http(server, "/metrics", key=key).status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server + "/v1", api_key="sk-wrong", max_retries=0).models.list()
    assert http(server, "/v1/models").json()["data"][0]["id"] == "smollm2"


def test_disconnect_frees_the_kv_cache(server):
    body = {"model": "smollm2", "messages": CHAT, "max_tokens": 3000, "ignore_eos": True}
    with httpx.stream("POST", server + "/v1/chat/completions", json={**body, "stream": True},
                      headers={"authorization": f"Bearer {KEY}"}, timeout=60) as r:
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
        assert next(line for line in lines if '"content"' in line and '""' not in line)
        # polled: /health reuses a status younger than 0.5 s, which may predate this request
        assert [s["live_sequences"] for s in wait_live(server, 1)] == [1]
    assert [s["live_sequences"] for s in wait_live(server, 0)] == [0]
    with pytest.raises(httpx.ReadTimeout):  # not streamed: the client gives up and hangs up
        http(server, "/v1/chat/completions", body, timeout=2.0)
    stages = wait_live(server, 0)
    assert [(s["live_sequences"], s["kv_tokens_used"]) for s in stages] == [(0, 0)]


def test_predicted_outputs_are_drafts_the_answer_takes(server, client):
    """OpenAI's Predicted Outputs: the answer is the one without a prediction (greedy), and the usage
    says how many predicted tokens it took and how many it did not; /metrics counts the drafts."""
    code = "def area(width, height):\n    return width * height\n"
    asked = [{"role": "user", "content": f"Rename width to w in this code:\n\n{code}"}]
    plain = client.chat.completions.create(model="smollm2", messages=asked, max_tokens=40, temperature=0)
    predicted = client.chat.completions.create(model="smollm2", messages=asked, max_tokens=40, temperature=0,
                                               prediction={"type": "content", "content": code.replace("width", "w")})
    assert predicted.choices[0].message.content == plain.choices[0].message.content
    details = predicted.usage.completion_tokens_details
    assert details.accepted_prediction_tokens > 0 and details.rejected_prediction_tokens >= 0
    assert plain.usage.completion_tokens_details is None
    families = {f.name: f for f in text_string_to_metric_families(http(server, "/metrics").text)}
    drafted, taken = (families[n].samples[0].value
                      for n in ("hetpipe_spec_draft_tokens", "hetpipe_spec_accepted_tokens"))
    assert drafted >= taken >= details.accepted_prediction_tokens
    bad = http(server, "/v1/chat/completions", {"messages": asked, "prediction": {"type": "text", "content": "x"}})
    assert bad.status_code == 400 and error_of(bad)["param"] == "prediction.type"


def test_metrics_parse_with_prometheus_parser(server, client):
    client.chat.completions.create(model="smollm2", messages=CHAT, max_tokens=4)
    http(server, "/v1/chat/completions", {"model": "nope", "messages": CHAT})
    families = {f.name: f for f in text_string_to_metric_families(http(server, "/metrics").text)}
    statuses = {s.labels["status"] for s in families["hetpipe_requests"].samples if s.name.endswith("_total")}
    assert {"200", "404"} <= statuses
    for name in ("hetpipe_prompt_tokens", "hetpipe_generated_tokens", "hetpipe_pipeline_steps"):
        assert families[name].samples[0].value > 0, name
    count = {s.name: s.value for s in families["hetpipe_time_to_first_token_seconds"].samples}
    assert count["hetpipe_time_to_first_token_seconds_count"] >= 1
    assert any(s.value > 0 for s in families["hetpipe_inter_token_latency_seconds"].samples)
    assert families["hetpipe_stage_compute_ms"].samples[0].labels["stage"] == "torch:0-29"
    assert families["hetpipe_stage_compute_ms"].samples[0].value > 0
    assert "hetpipe_queue_depth" in families and "hetpipe_kv_tokens_used" in families
    assert families["hetpipe_kv_tokens_capacity"].samples[0].value > 0


def stage_cells(driver, by):
    """The first stage row's cell texts, or None while the table is empty or being redrawn."""
    from selenium.common.exceptions import StaleElementReferenceException

    try:
        rows = driver.find_elements(by.CSS_SELECTOR, "#stages tr.stage")
        return [c.text for c in rows[0].find_elements(by.TAG_NAME, "td")] if rows else None
    except StaleElementReferenceException:
        return None


def test_page_chats_and_shows_the_stages(server):
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        if os.environ.get("CI"):
            pytest.fail("chromium and chromedriver are not installed (setup.sh installs them)")
        pytest.skip("no chromium / chromedriver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        opts.add_argument(a)
    b = webdriver.Chrome(service=Service(driver), options=opts)
    try:
        b.get(server + "/")
        b.find_element(By.ID, "key").send_keys(KEY)
        b.execute_script("document.getElementById('key').dispatchEvent(new Event('change'))")
        wait = WebDriverWait(b, 60)
        wait.until(lambda d: d.find_element(By.ID, "model").text == "smollm2")
        b.find_element(By.ID, "max").clear()
        b.find_element(By.ID, "max").send_keys("12")
        b.find_element(By.ID, "prompt").send_keys("Name three colours.")
        b.find_element(By.ID, "send").click()
        answer = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".assistant[data-finish]"))[0]
        assert answer.text.strip()
        cells = wait.until(lambda d: stage_cells(d, By))  # the table is redrawn as it refreshes
        assert cells[:5] == ["torch:0-29", "torch", "cpu", "float32", "0-29"], cells
        # stop mid-answer: the page stops, and the server frees the sequence
        b.find_element(By.ID, "max").clear()
        b.find_element(By.ID, "max").send_keys("3000")
        b.find_element(By.ID, "prompt").send_keys("Write a very long story about a lighthouse.")
        b.find_element(By.ID, "send").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".assistant")) == 2
                   and d.find_elements(By.CSS_SELECTOR, ".assistant")[1].text.strip())
        b.find_element(By.ID, "stop").click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".assistant")[1].get_attribute("data-finish")
                   == "stopped")
        assert [s["live_sequences"] for s in wait_live(server, 0)] == [0]
    finally:
        b.quit()


# -- a server over a stage daemon ------------------------------------------------------------------

@pytest.fixture(scope="module")
def staged(real_model):
    stage, address = start_stage("torch", real_model, extra=["--layers", "0-29"])
    env = {**os.environ, "HETPIPE_SSE_KEEPALIVE_S": "0.05"}
    proc, url = start_server(["--model", str(real_model), "--stages", address, "--port", "0", "--max-seqs", "1",
                              "--max-queue", "1", "--recovery-timeout", "1"], env=env)
    yield url, proc, stage
    stop_stages([proc, stage])


def test_server_over_stages_imports_no_framework(staged):
    url, proc, _ = staged
    assert http(url, "/health", key=None).json()["stages"][0]["state"] == "ok"
    # the masks of structured output cross the wire to the daemon, which samples under them
    body = {"model": "smollm2", "messages": CHAT, "max_tokens": 120, "temperature": 0,
            "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": SCHEMAS[0]}}}
    r = http(url, "/v1/chat/completions", body)
    assert r.status_code == 200, r.text
    jsonschema.validate(json.loads(r.json()["choices"][0]["message"]["content"]), SCHEMAS[0])
    maps = open(f"/proc/{proc.pid}/maps").read()
    assert "libtorch" not in maps and "/mlx/" not in maps and "libmlx" not in maps


def test_keepalive_comments_and_queue_full(staged):
    url, _, _ = staged
    # a prompt no earlier request sent: its prefill is not served by the prefix cache, and takes
    # longer than the 0.05 s between keep-alives
    fresh = [{"role": "user", "content": f"Request {time.time()}: " + "tell me about the sea. " * 40}]
    body = {"model": "smollm2", "messages": fresh, "max_tokens": 400, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as first:
        lines = first.iter_lines()
        head = []
        for line in lines:
            head.append(line)
            if '"content"' in line and '""' not in line:
                break
        assert ": keep-alive" in head  # sent while the first token was being computed
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as second:  # queued
            deadline = time.monotonic() + 10
            while http(url, "/health").json()["queue_depth"] < 1 and time.monotonic() < deadline:
                time.sleep(0.05)
            r = http(url, "/v1/chat/completions", {**body, "stream": False})
            assert r.status_code == 429 and error_of(r)["type"] == "rate_limit_error"
            assert second.status_code == 200
    assert [s["live_sequences"] for s in wait_live(url, 0)] == [0]


def test_lost_stage_is_503(staged):
    url, _, stage = staged
    os.killpg(stage.pid, signal.SIGKILL)
    stage.wait()
    r = http(url, "/v1/chat/completions", {"model": "smollm2", "messages": CHAT, "max_tokens": 4})
    assert r.status_code == 503 and error_of(r)["code"] == "stage_unavailable"
    h = http(url, "/health")
    assert h.status_code == 503 and h.json()["stages"][0]["state"] == "lost"
