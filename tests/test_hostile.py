"""`hetpipe serve` under hostile input, as real processes on loopback, with `--local` and with
`--stages`: every hostile case gets its status while a streaming bystander keeps decoding, the
engine serves a normal request after each, loads that froze the pipeline complete, `/health` tells
busy from lost, slow and ambiguous HTTP is refused, a lost stage is 503 until it is back, and
fuzzed bodies never get a 5xx. The cases and loads are `hetpipe bench hostile`'s own."""

from __future__ import annotations

import json
import os
import signal
import socket
import time

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.app.bench.hostile import (Bystander, Case, Client, chat, framing_cases, long_prompts_with_health,
                                      many_choices, named_cases, rss_mib)
from engine.app.procs import start_server, start_stage, stop_stages
from engine.app.server.schemas import ChatRequest, CompletionRequest

READ_TIMEOUT_S = 2.0
FUZZ_EXAMPLES = int(os.environ.get("HETPIPE_FUZZ_EXAMPLES", "40"))  # a long run by hand: 2000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def daemon(real_model):
    address = f"tcp://127.0.0.1:{free_port()}"
    proc, _ = start_stage("torch", real_model, listen=address, extra=["--layers", "0-29"])
    yield address, proc
    stop_stages([proc])


def serve(real_model, where: list[str]):
    return start_server(["--model", str(real_model), *where, "--port", "0", "--read-timeout", str(READ_TIMEOUT_S)])


@pytest.fixture(scope="module")
def staged(real_model, daemon):
    proc, url = serve(real_model, ["--stages", daemon[0], "--recovery-timeout", "1"])
    yield url, proc
    stop_stages([proc])


@pytest.fixture(scope="module")
def local(real_model):
    proc, url = serve(real_model, ["--local", "torch"])
    yield url, proc
    stop_stages([proc])


@pytest.fixture(params=["local", "stages"])
def server(request):
    return request.getfixturevalue("local" if request.param == "local" else "staged")


@pytest.mark.alone
def test_every_hostile_case_gets_its_status_and_no_stall(server):
    url, proc = server
    client = Client(url, None)
    normal = Case("normal", chat("smollm2", temperature=0), "200")
    with Bystander(url, None, "smollm2") as bystander:
        for case in named_cases("smollm2"):
            bystander.phase = case.name
            got = client.send(case)
            assert got.expected, f"{case.name}: {got.status} (want {case.want}) {got.error}"
            after = client.send(normal)
            assert after.status == 200, f"after {case.name}: {after.status} {after.error}"
    assert not bystander.errors and bystander.tokens > 20
    assert bystander.worst_s < 1.0, f"the bystander waited {bystander.worst_s:.2f} s during {bystander.worst_during}"
    assert proc.poll() is None
    client.close()


def test_many_choices_with_big_biases_all_complete_over_daemons(staged):
    """16 requests x n=16 with 1,024-entry logit biases (each within the limits): a micro-batch of
    them is over a stage's header limit, so it goes in parts; every one completes."""
    url, _ = staged
    client = Client(url, None)
    outcomes = many_choices(client, "smollm2", requests=16, n=16, bias=1024)
    assert [o.status for o in outcomes] == [200] * 16, [o.error for o in outcomes]
    assert client.send(Case("normal", chat("smollm2"), "200")).status == 200
    client.close()


def test_health_stays_200_while_the_stage_computes_long_prompts(staged):
    """/health asks each stage's heartbeat socket, which a stage busy with a long prefill answers."""
    url, _ = staged
    client = Client(url, None)
    outcomes, polls = long_prompts_with_health(client, "smollm2", prompts=4)
    assert [o.status for o in outcomes] == [200] * 4
    assert {status for status, _ in polls} == {200}, polls
    assert sum(1 for _, held in polls if held) >= 3  # polled while the stage held (and computed) the prompts
    client.close()


def test_slow_and_ambiguous_http_is_refused(local):
    url, proc = local
    outcomes = {o.name: o for o in framing_cases(url, None, "smollm2")}
    assert outcomes["Transfer-Encoding with Content-Length"].status == 400
    assert outcomes["Content-Length of 200 MB"].status == 413
    assert outcomes["Content-Length of 200 MB"].seconds < 5  # refused before the body is sent
    assert outcomes["body slower than the timeout"].status == 408
    slow_headers = outcomes["headers that never end"]
    assert slow_headers.status == 499 and slow_headers.seconds < READ_TIMEOUT_S + 5  # closed, no answer
    assert proc.poll() is None and httpx.get(url + "/health").status_code == 200


def test_memory_returns_after_big_bodies(local):
    """Requests near the 8 MiB cap, parsed and refused: the server's RSS comes back near where it was."""
    url, proc = local
    client = Client(url, None)
    client.send(Case("warm", chat("smollm2"), "200"))
    before = rss_mib(proc.pid)
    values = "[" + ",".join(["{}"] * 200_000) + "]"
    for _ in range(5):
        assert client.send(Case("values", f'{{"model": "smollm2", "x": {values}}}'.encode(), "400")).status == 400
        assert client.send(Case("prompt", chat("smollm2", messages=[{"role": "user", "content": "word " * 1_500_000}]),
                                "400")).status == 400
    time.sleep(1.0)
    assert rss_mib(proc.pid) < before * 1.2 + 16, (before, rss_mib(proc.pid))
    client.close()


@pytest.mark.alone
def test_a_stage_lost_beyond_recovery_is_503_until_it_is_back(real_model):
    """Recovery gives up after --recovery-timeout: requests and /health are 503 at once, and once a
    daemon is back at the address, serving resumes by itself."""
    address = f"tcp://127.0.0.1:{free_port()}"
    stage, _ = start_stage("torch", real_model, listen=address, extra=["--layers", "0-29"])
    proc, url = serve(real_model, ["--stages", address, "--recovery-timeout", "1"])
    try:
        body = chat("smollm2", temperature=0)
        want = httpx.post(url + "/v1/chat/completions", json=body, timeout=60).json()["choices"][0]["message"]
        os.killpg(stage.pid, signal.SIGKILL)
        stage.wait()
        first = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
        assert first.status_code == 503 and first.json()["error"]["code"] == "stage_unavailable"
        t = time.monotonic()
        again = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
        assert again.status_code == 503 and time.monotonic() - t < 1.0  # refused at once, no timeout waited out
        health = httpx.get(url + "/health", timeout=10)
        assert health.status_code == 503 and "resumes" in health.json()["error"]
        stage, _ = start_stage("torch", real_model, listen=address, extra=["--layers", "0-29"])
        deadline = time.monotonic() + 30
        while httpx.get(url + "/health", timeout=10).status_code != 200:
            assert time.monotonic() < deadline, "serving did not resume"
            time.sleep(0.3)
        got = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
        assert got.status_code == 200 and got.json()["choices"][0]["message"] == want
        assert proc.poll() is None
    finally:
        stop_stages([proc, stage])


# -- fuzzing ------------------------------------------------------------------------------------------

def from_schema(schema: dict, defs: dict, depth: int = 0):
    """A hypothesis strategy of JSON values valid for a (pydantic-written) JSON schema, kept small."""
    if "$ref" in schema:
        return from_schema(defs[schema["$ref"].rsplit("/", 1)[-1]], defs, depth)
    for key in ("anyOf", "oneOf"):
        if key in schema:
            return st.one_of([from_schema(s, defs, depth) for s in schema[key]])
    if "const" in schema:
        return st.just(schema["const"])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    kind = schema.get("type")
    if kind == "integer":
        return st.integers(schema.get("minimum", -(2**63)), schema.get("maximum", 2**63))
    if kind == "number":
        low, high = schema.get("minimum", schema.get("exclusiveMinimum")), schema.get("maximum",
                                                                                   schema.get("exclusiveMaximum"))
        return st.floats(low, high, allow_nan=False, allow_infinity=False, exclude_min="exclusiveMinimum" in schema,
                         exclude_max="exclusiveMaximum" in schema)
    if kind == "boolean":
        return st.booleans()
    if kind == "null":
        return st.none()
    if kind == "string":
        return st.text(min_size=schema.get("minLength", 0), max_size=min(schema.get("maxLength", 40), 40))
    if kind == "array" or depth > 3:
        item = from_schema(schema.get("items", {"type": "integer"}), defs, depth + 1) if kind == "array" else st.none()
        return st.lists(item, min_size=min(schema.get("minItems", 0), 2), max_size=min(schema.get("maxItems", 3), 3))
    if kind == "object":
        props = schema.get("properties", {})
        if not props:
            return st.dictionaries(st.text(max_size=8), st.integers(0, 9), max_size=3)
        required = set(schema.get("required", []))
        return st.fixed_dictionaries({k: from_schema(v, defs, depth + 1) for k, v in props.items() if k in required},
                                     optional={k: from_schema(v, defs, depth + 1) for k, v in props.items()
                                               if k not in required})
    return st.none()


NASTY = st.one_of(st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=30), st.none(), st.booleans(),
                  st.lists(st.integers(), max_size=4), st.dictionaries(st.text(max_size=4), st.integers(), max_size=3))


def bodies(model_cls, path):
    schema = model_cls.model_json_schema()
    valid = from_schema(schema, schema.get("$defs", {}))

    @st.composite
    def body(draw):
        b = draw(valid)
        b["model"] = draw(st.sampled_from(["smollm2"] * 5 + ["other"]))
        b["max_tokens"] = draw(st.integers(1, 3))  # valid requests stay short; the fields under test are the rest
        b.pop("max_completion_tokens", None)
        b["n"] = min(b.get("n", 1), 2) if isinstance(b.get("n"), int) else 1
        for _ in range(draw(st.sampled_from([0, 0, 1, 2]))):  # mutations: a field set to anything, or an unknown one
            b[draw(st.sampled_from([*schema["properties"], "tools", "x"]))] = draw(NASTY)
        if b.get("max_tokens") is None or (isinstance(b["max_tokens"], int) and 3 < b["max_tokens"] < 10**6):
            b["max_tokens"] = 2
        raw = json.dumps(b, ensure_ascii=False).encode("utf-8", "surrogatepass")
        if draw(st.integers(0, 9)) == 0:
            raw = raw[: draw(st.integers(0, len(raw)))]  # cut short
        return path, raw

    return body()


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                 HealthCheck.data_too_large])
@given(case=st.one_of(bodies(ChatRequest, "/v1/chat/completions"), bodies(CompletionRequest, "/v1/completions")))
def test_fuzzed_bodies_never_get_a_5xx(staged, case):
    url, proc = staged
    path, raw = case
    r = httpx.post(url + path, content=raw, headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code < 500, (raw[:300], r.text[:300])
    assert proc.poll() is None
