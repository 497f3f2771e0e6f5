"""`hetpipe bench hostile --url URL`: malformed, extreme and slow requests against a running server.

While a streaming bystander decodes, it sends the hostile cases one at a time (each named, with
the status a sound server gives it), a few thousand mutated request bodies, loads (many choices
with big logit biases, long prompts while `/health` is polled), and raw-socket abuse (ambiguous
framing, a body that never ends, headers that never end). It reports the 5xx count, requests that
hung, cases answered otherwise than expected, the bystander's longest wait between two tokens,
`/health` 503s under load, and, given `--pid`, the server's RSS before and after.
"""

from __future__ import annotations

import json
import random
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from urllib.parse import urlsplit

HANG_S = 60.0  # a request not answered within this is a hang


@dataclass(slots=True)
class Case:
    """One hostile request and what a sound server answers it: a status, or a class ("4xx", "ok")."""

    name: str
    body: bytes | dict
    want: str
    path: str = "/v1/chat/completions"


@dataclass(slots=True)
class Outcome:
    name: str
    status: int | None  # None: no answer within HANG_S
    seconds: float
    want: str
    error: str = ""

    @property
    def expected(self) -> bool:
        if self.status is None:
            return False
        if self.want == "4xx":
            return 400 <= self.status < 500
        if self.want == "ok":  # answered, not failed by the server: 2xx or a 4xx refusal
            return self.status < 500
        return str(self.status) == self.want


def chat(model: str, **kw) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4, **kw}


def _raw(text: str) -> bytes:
    return text.encode()


def named_cases(model: str) -> list[Case]:
    """The cases of the hostile run, each with the status a sound server gives it."""
    base = json.dumps(chat(model))[:-1]  # '{..."max_tokens": 4' : fields appended as raw JSON below
    deep = "[" * 1000 + "]" * 1000
    schema = lambda s: chat(model, response_format={"type": "json_schema",  # noqa: E731
                                                   "json_schema": {"name": "s", "schema": s}})
    prompt = "The history of the lighthouse keepers of the northern coast. " * 70_000  # ~4 MB
    unicode_prompt = "日本語のテキスト、絵文字🙂と記号。" * 100_000  # ~5 MB of multi-byte UTF-8
    return [
        Case("top_k 2**64", chat(model, top_k=2**64), "400"),
        Case("top_k 2**31", chat(model, top_k=2**31), "400"),
        Case("seed 2**64", chat(model, seed=2**64), "400"),
        Case("n 17", chat(model, n=17), "400"),
        Case("max_tokens 2**64", chat(model, max_tokens=2**64), "400"),
        Case("nested 1000", _raw(base + f', "user": {deep}}}'), "400"),
        Case("nested 990 in a schema", _raw(base + ', "response_format": {"type": "json_schema", "json_schema": '
                                                   '{"name": "s", "schema": ' + "{\"a\":" * 990 + "1" + "}" * 990
                                              + "}}}"), "400"),
        Case("lone surrogate", _raw(base.replace('"Say hi."', '"\\ud800"') + "}"), "400"),
        Case("lone surrogate in stop", _raw(base + ', "stop": ["\\udfff"]}'), "400"),
        Case("logit_bias key ²", chat(model, logit_bias={"²": 1}), "400"),
        Case("logit_bias key --5", chat(model, logit_bias={"--5": 1}), "400"),
        Case("logit_bias key -1", chat(model, logit_bias={"-1": 1}), "400"),
        Case("logit_bias 1025 entries", chat(model, logit_bias={str(i): 1 for i in range(1025)}), "400"),
        Case("logit_bias value 1e400", _raw(base + ', "logit_bias": {"5": 1e400}}'), "400"),
        Case("logit_bias value NaN", _raw(base + ', "logit_bias": {"5": NaN}}'), "400"),
        Case("integer of 5000 digits", _raw(base + ', "seed": ' + "9" * 5000 + "}"), "400"),
        Case("temperature NaN", _raw(base + ', "temperature": NaN}'), "400"),
        Case("temperature 1e-320", chat(model, temperature=1e-320), "200"),
        Case("repetition_penalty 1e-320", chat(model, repetition_penalty=1e-320), "400"),
        Case("repetition_penalty 1e300", chat(model, repetition_penalty=1e300), "400"),
        Case("stop 1000 strings", chat(model, stop=["x"] * 1000), "400"),
        Case("stop string of 100k", chat(model, stop=["x" * 100_000]), "400"),
        Case("4 MB prompt", chat(model, messages=[{"role": "user", "content": prompt}]), "400"),
        Case("5 MB unicode prompt", chat(model, messages=[{"role": "user", "content": unicode_prompt}]), "400"),
        Case("100k messages", chat(model, messages=[{"role": "user", "content": "hi"}] * 100_000), "400"),
        Case("1200 prompts", {"model": model, "prompt": ["Once upon a time"] * 1200, "max_tokens": 1}, "400",
             "/v1/completions"),
        Case("prompt ids out of range", {"model": model, "prompt": [2**40], "max_tokens": 1}, "400",
             "/v1/completions"),
        Case("prompt ids negative", {"model": model, "prompt": [-1], "max_tokens": 1}, "400", "/v1/completions"),
        Case("prompt of 1M ids", {"model": model, "prompt": [1] * 1_000_000, "max_tokens": 1}, "4xx",
             "/v1/completions"),
        Case("schema $ref recursion", schema({"type": "object", "properties": {"a": {"$ref": "#"}},
                                              "required": ["a"]}), "ok"),
        Case("schema regex blow-up", schema({"type": "string", "pattern": "^(a{1000}){1000}$"}), "ok"),
        Case("schema anyOf 5000", schema({"anyOf": [{"type": "object", "properties": {f"k{i}": {"const": i}},
                                                     "required": [f"k{i}"]} for i in range(5000)]}), "ok"),
        Case("schema 100k enum", schema({"enum": [f"v{i}" for i in range(100_000)]}), "4xx"),
        Case("not JSON", _raw("{nope"), "400"),
        Case("JSON array", _raw("[1, 2]"), "400"),
        Case("JSON null", _raw("null"), "400"),
        Case("not UTF-8", b'{"model": "\xff\xfe"}', "400"),
        Case("200 MB body", b" " * (200 << 20), "413"),
    ]


# -- mutated bodies -----------------------------------------------------------------------------------

NASTY = [None, True, False, 0, -1, 1, 2**31, 2**63, 2**64, -(2**63), 10**30, 0.5, -0.0, 1e-320, 1e308, "", "x",
         "\u0000", "-1", "1e3", "²", "𝟙", "null", [], [0], [[[]]], {}, {"a": 1}, {"": None}, "x" * 10_000, [1] * 5000,
         {str(i): i for i in range(2000)}]
FIELDS = ["model", "messages", "max_tokens", "max_completion_tokens", "n", "stop", "stream", "stream_options",
          "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty",
          "seed", "logit_bias", "logprobs", "top_logprobs", "response_format", "ignore_eos", "user", "prompt",
          "echo", "tools", "unknown_field"]


def mutated_cases(model: str, count: int, seed: int = 0) -> list[Case]:
    """`count` bodies: a valid small request with one to three fields set to nasty values, or cut,
    or with a message or part mangled. Each is answered, not failed by the server ("ok")."""
    rng = random.Random(seed)
    out = []
    for i in range(count):
        completions = rng.random() < 0.3
        body = ({"model": model, "prompt": "Once", "max_tokens": 2} if completions else chat(model, max_tokens=2))
        for _ in range(rng.randint(1, 3)):
            key = rng.choice(FIELDS)
            if key == "messages" and not completions and rng.random() < 0.5:
                body["messages"] = [{"role": rng.choice(["user", "tool", "", 5, "system"]),
                                     "content": rng.choice(NASTY)}]
            else:
                body[key] = rng.choice(NASTY)
        mt = body.get("max_tokens")
        if mt is None or (isinstance(mt, int) and 8 < mt < 100_000):
            body["max_tokens"] = 2  # a valid request that asks for thousands of tokens is slow, not hostile
        raw = json.dumps(body).encode()
        if rng.random() < 0.1:
            raw = raw[: rng.randrange(len(raw))]  # truncated
        out.append(Case(f"mutated {i}", raw, "ok", "/v1/completions" if completions else "/v1/chat/completions"))
    return out


# -- sending ------------------------------------------------------------------------------------------

class Client:
    def __init__(self, url: str, api_key: str | None):
        import httpx

        self.url = url.rstrip("/")
        self.headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=self.url, headers=self.headers, timeout=HANG_S)

    def send(self, case: Case) -> Outcome:
        import httpx

        body = case.body if isinstance(case.body, bytes) else json.dumps(case.body, ensure_ascii=False).encode()
        t = time.perf_counter()
        try:
            r = self.http.post(case.path, content=body, headers={"content-type": "application/json"})
            status, error = r.status_code, ("" if r.status_code < 500 else r.text[:200])
        except httpx.TimeoutException:
            status, error = None, "no answer"
        except httpx.HTTPError as e:  # the server closed the connection: a refusal if it answered first
            status, error = None, f"{type(e).__name__}: {e}"
        return Outcome(case.name, status, time.perf_counter() - t, case.want, error)

    def health(self) -> tuple[int, int]:
        """`/health`'s status, and the sequences its stages said they held (0: no answer)."""
        import httpx

        try:
            r = self.http.get("/health", timeout=10)
            return r.status_code, sum(s.get("live_sequences") or 0 for s in r.json().get("stages", []))
        except (httpx.HTTPError, ValueError):
            return 0, 0

    def loop_lag_max_ms(self) -> float | None:
        """The longest the server's event loop was held, from its /metrics (None if it has no such metric)."""
        import httpx

        try:
            for line in self.http.get("/metrics", timeout=10).text.splitlines():
                if line.startswith("hetpipe_event_loop_lag_max_seconds "):
                    return round(float(line.split()[1]) * 1000, 1)
        except (httpx.HTTPError, ValueError):
            pass
        return None

    def close(self) -> None:
        self.http.close()


class Bystander:
    """A stream that keeps decoding (a new one when one ends); its longest wait between two tokens."""

    def __init__(self, url: str, api_key: str | None, model: str):
        self.url, self.api_key, self.model = url, api_key, model
        self.worst_s = 0.0
        self.phase = "start"  # what the hostile run is doing now (the runner sets it)
        self.worst_during = ""
        self.tokens = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        deadline = time.monotonic() + 120
        while self.tokens == 0 and time.monotonic() < deadline and not self.errors:
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(HANG_S)

    def _run(self) -> None:
        import httpx

        headers = {"authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        body = {"model": self.model, "messages": [{"role": "user", "content": "Tell me a long story about a ship."}],
                "max_tokens": 400, "ignore_eos": True, "temperature": 0, "stream": True}
        while not self._stop.is_set():
            try:
                with httpx.stream("POST", self.url.rstrip("/") + "/v1/chat/completions", json=body, headers=headers,
                                  timeout=HANG_S) as r:
                    if r.status_code != 200:
                        self.errors.append(f"bystander got {r.status_code}")
                        time.sleep(0.5)
                        continue
                    last = None
                    for line in r.iter_lines():
                        if not line.startswith("data: {"):
                            continue
                        if '"error"' in line:
                            self.errors.append(line[:200])
                            break
                        if '"content"' not in line or '"content":""' in line:
                            continue
                        now = time.monotonic()
                        if last is not None and now - last > self.worst_s:
                            self.worst_s, self.worst_during = now - last, self.phase
                        last = now
                        self.tokens += 1
                        if self._stop.is_set():
                            break
            except httpx.HTTPError as e:
                self.errors.append(f"bystander: {type(e).__name__}: {e}")
                time.sleep(0.5)


# -- loads and raw sockets -------------------------------------------------------------------------

def many_choices(client: Client, model: str, requests: int = 16, n: int = 16, bias: int = 1024) -> list[Outcome]:
    """`requests` at once, each with `n` choices and a `bias`-entry logit bias: every one should complete."""
    body = chat(model, n=n, max_tokens=3, temperature=1.0, seed=1,
                logit_bias={str(i): 0.5 for i in range(1000, 1000 + bias)})
    return _concurrently(client, [Case(f"n={n} with {bias} biases #{i}", body, "200") for i in range(requests)])


def long_prompts_with_health(client: Client, model: str, prompts: int = 8, words: int = 550,
                             polls: list[tuple[int, int]] | None = None) -> tuple[list[Outcome], list[tuple[int, int]]]:
    """`prompts` long prompts (~1,600 tokens each for SmolLM2's tokenizer) at once while `/health` is
    polled every 0.2 s; (outcomes, each poll's (status, sequences the stages held))."""
    polls = [] if polls is None else polls
    done = threading.Event()

    def poll():
        while not done.is_set():
            polls.append(client.health())
            time.sleep(0.2)

    t = threading.Thread(target=poll, daemon=True)
    t.start()
    try:
        stamp = time.time()
        cases = [Case(f"long prompt #{i}", chat(model, max_tokens=2, messages=[
            {"role": "user", "content": f"{stamp} {i}: " + " ".join(f"word{j % 97}" for j in range(words))}]), "200")
            for i in range(prompts)]
        return _concurrently(client, cases), polls
    finally:
        done.set()
        t.join()


def _concurrently(client: Client, cases: list[Case]) -> list[Outcome]:
    out: list[Outcome | None] = [None] * len(cases)
    def one(i: int) -> None:
        out[i] = client.send(cases[i])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(cases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def raw_request(url: str, data: bytes, *, pause_s: float = 0.0, then: bytes = b"", read_s: float = 30.0) -> str:
    """Send `data` on a fresh TCP connection, wait `pause_s`, send `then`; the status line answered
    (or "closed" / "no answer")."""
    u = urlsplit(url)
    with socket.create_connection((u.hostname, u.port or 80), timeout=read_s) as s:
        try:
            s.sendall(data)
            if pause_s:
                time.sleep(pause_s)
            if then:
                s.sendall(then)
            reply = s.recv(4096)
        except TimeoutError:
            return "no answer"
        except OSError:
            return "closed"
    return reply.split(b"\r\n", 1)[0].decode(errors="replace") if reply else "closed"


def framing_cases(url: str, api_key: str | None, model: str) -> list[Outcome]:
    """Raw HTTP: Transfer-Encoding with Content-Length, a body slower than the read timeout, a
    header that never ends, and a huge Content-Length refused before the body is sent."""
    host = urlsplit(url).netloc
    auth = f"Authorization: Bearer {api_key}\r\n" if api_key else ""
    body = json.dumps(chat(model)).encode()
    head = f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\n{auth}Content-Type: application/json\r\n"
    out = []

    def case(name, *args, **kw):
        t = time.perf_counter()
        line = raw_request(url, *args, **kw)
        # a connection closed without an answer is a refusal too (what a read timeout does)
        status = int(line.split()[1]) if line.startswith("HTTP/") else (499 if line == "closed" else None)
        out.append(Outcome(name, status, time.perf_counter() - t, "4xx", "" if status and status < 500 else line))

    chunked = head + f"Transfer-Encoding: chunked\r\nContent-Length: {len(body)}\r\n\r\n"
    case("Transfer-Encoding with Content-Length",
         chunked.encode() + f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n")
    case("Content-Length of 200 MB", (head + f"Content-Length: {200 << 20}\r\n\r\n").encode(), read_s=10)
    case("body slower than the timeout", (head + f"Content-Length: {len(body)}\r\n\r\n").encode()
         + body[:10], read_s=90)
    case("headers that never end", (head + "X-Slow: 1\r\n").encode(), read_s=90)
    return out


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


@dataclass(slots=True)
class Report:
    outcomes: list[Outcome] = field(default_factory=list)
    health_polls: list[tuple[int, int]] = field(default_factory=list)
    bystander_worst_s: float = 0.0
    bystander_worst_during: str = ""
    bystander_errors: list[str] = field(default_factory=list)
    rss_before_mib: float | None = None
    rss_after_mib: float | None = None
    loop_lag_max_ms: float | None = None  # the server's own measure (its /metrics), if it has one
    rss_by_phase: dict[str, float] = field(default_factory=dict)  # with a pid: RSS after each phase, MiB

    def to_json(self) -> dict:
        statuses = Counter("none" if o.status is None else str(o.status) for o in self.outcomes)
        return {
            "requests": len(self.outcomes),
            "five_xx": sum(1 for o in self.outcomes if o.status is not None and o.status >= 500),
            "hung": sum(1 for o in self.outcomes if o.status is None),
            "unexpected": [f"{o.name}: {o.status} (want {o.want}) {o.error}".strip() for o in self.outcomes
                           if not o.expected],
            "statuses": dict(sorted(statuses.items())),
            "health_503_under_load": sum(1 for s, _ in self.health_polls if s != 200),
            "health_polls": len(self.health_polls),
            "bystander_worst_stall_s": round(self.bystander_worst_s, 3),
            "bystander_worst_stall_during": self.bystander_worst_during,
            "bystander_errors": self.bystander_errors[:5],
            "rss_before_mib": self.rss_before_mib,
            "rss_after_mib": self.rss_after_mib,
            "event_loop_lag_max_ms": self.loop_lag_max_ms,
            "rss_by_phase_mib": {k: round(v, 1) for k, v in self.rss_by_phase.items()},
            "slowest_s": round(max((o.seconds for o in self.outcomes), default=0.0), 2),
        }


def run_hostile(url: str, *, api_key: str | None = None, pid: int | None = None, mutated: int = 2000,
                framing: bool = True, skip: tuple[str, ...] = (), log=print) -> dict:
    """The whole hostile run against the server at `url`; the report's JSON (see the module).
    `skip`: leave out the named cases whose names contain one of these."""
    client = Client(url, api_key)
    try:
        r = client.http.get("/v1/models")
        model = r.json()["data"][0]["id"]
        report = Report()
        if pid:
            client.send(Case("warm-up", chat(model), "200"))
            report.rss_before_mib = rss_mib(pid)
        def phase_done(name: str) -> None:
            if pid:
                report.rss_by_phase[name] = rss_mib(pid)

        with Bystander(url, api_key, model) as bystander:
            for case in [c for c in named_cases(model) if not any(x in c.name for x in skip)]:
                bystander.phase = case.name
                report.outcomes.append(o := client.send(case))
                log(f"{case.name}: {o.status} in {o.seconds:.2f} s")
            phase_done("named cases")
            cases = mutated_cases(model, mutated)
            for i, case in enumerate(cases):
                bystander.phase = case.name
                report.outcomes.append(client.send(case))
                if (i + 1) % 500 == 0:
                    log(f"{i + 1} mutated bodies sent")
            phase_done("mutated bodies")
            bystander.phase = "16 x n=16 with biases"
            report.outcomes += many_choices(client, model)
            phase_done("16 x n=16 with biases")
            log("16 requests x n=16 with 1,024-entry biases: "
                + ", ".join(str(o.status) for o in report.outcomes[-16:]))
            bystander.phase = "8 long prompts"
            outcomes, _ = long_prompts_with_health(client, model, polls=report.health_polls)
            report.outcomes += outcomes
            phase_done("8 long prompts")
            health = Counter(s for s, _ in report.health_polls)
            log(f"8 long prompts: {[o.status for o in outcomes]}; /health: {health}")
            if framing:
                bystander.phase = "raw framing"
                report.outcomes += framing_cases(url, api_key, model)
                phase_done("raw framing")
            report.outcomes.append(client.send(Case("a normal request after it all", chat(model), "200")))
        report.bystander_worst_s, report.bystander_errors = bystander.worst_s, bystander.errors
        report.bystander_worst_during = bystander.worst_during
        if pid:
            time.sleep(2.0)
            report.rss_after_mib = rss_mib(pid)
        report.loop_lag_max_ms = client.loop_lag_max_ms()
        return report.to_json()
    finally:
        client.close()


def format_hostile(r: dict) -> str:
    lines = [f"{r['requests']} hostile requests: {r['five_xx']} answered 5xx, {r['hung']} hung; "
             f"statuses {r['statuses']}",
             f"  /health under load: {r['health_503_under_load']} of {r['health_polls']} polls not 200",
             f"  bystander stream: longest wait between tokens {r['bystander_worst_stall_s']:.2f} s "
             f"(during {r['bystander_worst_stall_during']})"]
    if r["event_loop_lag_max_ms"] is not None:
        lines.append(f"  the server's event loop was held at most {r['event_loop_lag_max_ms']:.0f} ms")
    if r["rss_before_mib"] is not None:
        lines.append(f"  server RSS: {r['rss_before_mib']:.0f} MiB before, {r['rss_after_mib']:.0f} MiB after")
    lines += [f"  unexpected: {u}" for u in r["unexpected"][:40]]
    return "\n".join(lines)
