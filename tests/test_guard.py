"""The server's door without a server: the JSON guard maps every malformed body to a 400 naming
why, and the request models bound every field."""

import json

import pytest
from pydantic import ValidationError

from engine.app.server.guard import validation_message
from engine.app.server.guard import MAX_DEPTH, ParamError, parse_json
from engine.app.server.schemas import ChatRequest, CompletionRequest

BASE = b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]'


@pytest.mark.parametrize("raw, why", [
    (BASE + b', "x": ' + b"[" * 2000 + b"]" * 2000 + b"}", "nests deeper"),
    (BASE + b', "x": ' + b"[" * (MAX_DEPTH + 1) + b"]" * (MAX_DEPTH + 1) + b"}", "nests deeper"),
    (BASE.replace(b'"hi"', b'"\\ud800"') + b"}", "lone surrogate"),
    (BASE + b', "stop": {"\\udfff": 1}}', "lone surrogate"),
    (BASE + b', "seed": ' + b"9" * 5000 + b"}", "digits"),
    (BASE + b', "seed": ' + b"9" * 40 + b"}", "digits"),
    (BASE + b', "temperature": NaN}', "NaN is not JSON"),
    (BASE + b', "temperature": 1e400}', "out of range"),
    (BASE + b', "x": [' + b",".join([b"0"] * 300_000) + b"]}", "JSON values"),
    (b'{"model": "\xff"}', "not UTF-8"),
    (b"[1, 2]", "JSON object"),
    (b"", "JSON object"),
    (b"{nope", "not JSON"),
])
def test_malformed_bodies_are_param_errors(raw, why):
    with pytest.raises(ParamError, match=why):
        parse_json(raw)


def test_a_sound_body_parses():
    assert parse_json(BASE + b', "logit_bias": {"12": -2.5}, "seed": 18446744073709551616}')["seed"] == 2**64


def msg(body, model=ChatRequest):
    with pytest.raises(ValidationError) as e:
        model.model_validate(body)
    return validation_message(e.value)


CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize("field, value", [("top_k", 2**64), ("top_k", -2), ("seed", 2**63), ("max_tokens", 2**64),
                                          ("n", 17), ("repetition_penalty", 1e-320), ("logit_bias", {"²": 1}),
                                          ("logit_bias", {"--5": 1}), ("logit_bias", {"5": 101}),
                                          ("logit_bias", {str(i): 1 for i in range(1025)}), ("stop", ["x"] * 17),
                                          ("stop", "x" * 257), ("stop", [""]), ("user", "u" * 300),
                                          ("messages", [{"role": "user", "content": "x"}] * 4097)])
def test_every_field_is_bounded_and_named(field, value):
    message, param = msg({**CHAT, field: value})
    assert param.split(".")[0] == field, message


def test_the_telling_error_of_a_union_is_reported():
    message, param = msg({"model": "m", "prompt": [2**40]}, CompletionRequest)
    assert param == "prompt.0" and "less than or equal" in message
    message, param = msg({"model": "m", "prompt": [["a"]] * 65}, CompletionRequest)
    assert param == "prompt"
    assert msg({**CHAT, "stream_options": {"include_usage": "x"}})[1] == "stream_options.include_usage"


def test_vllm_top_k_minus_one_means_off():
    assert ChatRequest.model_validate({**CHAT, "top_k": -1}).top_k == -1
    json.dumps(CHAT)  # (the planner maps -1 to 0: see completions._plan)
