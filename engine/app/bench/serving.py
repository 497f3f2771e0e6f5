"""`hetpipe bench serving`: throughput and latency under concurrent load.

N client threads each keep one request going (closed loop) until R requests are done. Every
request has a prompt of L tokens (different text per request) and decodes exactly T tokens
(EOS ignored), so runs are comparable. Reported: aggregate generated tokens/s and requests/s over
the wall time, time to first token and inter-token latency percentiles over all requests.
"""

from __future__ import annotations

import threading
import time

from ...core.errors import UserError
from ...serving.generator import Generator
from ...serving.output import Profile, percentiles
from ...serving.text import Tokenizer

# plain English to cut prompts from: each request starts at a different place
TEXT = (
    "The lighthouse keeper climbed the spiral stairs each evening, counting the steps as his father had. "
    "Below, the harbor settled into its usual noises: ropes creaking against wood, gulls arguing over "
    "scraps, a radio playing somewhere behind a shuttered window. He trimmed the wick, polished the lens, "
    "and watched the first ships turn toward the light. Some nights the fog came in so thick that the beam "
    "seemed to stop a few yards from the glass, and he would stand at the rail listening for horns. "
    "Scientists measure the distance to stars by parallax, the small shift in position seen from two ends "
    "of the Earth's orbit. Bread rises because yeast turns sugar into carbon dioxide, which the gluten "
    "traps in small bubbles. A good recipe asks for patience more than skill. Rivers carve valleys over "
    "millions of years, carrying sand from mountains to the sea, where it settles into new layers of rock. "
)

KEYS = ("aggregate_tokens_per_s", "requests_per_s", "ttft_ms_p50", "ttft_ms_p95", "itl_ms_p50", "itl_ms_p95")


def bench_prompts(tokenizer: Tokenizer, n: int, length: int) -> list[list[int]]:
    """n prompts of `length` token ids each, cut from TEXT at different places."""
    if length < 1:
        raise UserError("the prompt length must be at least 1")
    base = tokenizer.encode(TEXT)
    ids = base * (length // len(base) + 2)
    return [ids[(i * 37) % len(base):][:length] for i in range(n)]


def run_serving(gen: Generator, *, concurrency: int, requests: int, max_tokens: int, prompt_len: int) -> dict:
    if concurrency < 1 or requests < 1 or max_tokens < 1:
        raise UserError("concurrency, requests and max tokens must each be at least 1")
    prompts = bench_prompts(gen.tokenizer, requests, prompt_len)
    for _ in gen.stream(prompts[0][:8], max_tokens=2):  # warm the engine thread and the sockets
        pass
    next_index = iter(range(requests))
    lock = threading.Lock()
    done, errors = [], []

    def client():
        while True:
            with lock:
                i = next(next_index, None)
            if i is None:
                return
            try:
                st = gen.stream(prompts[i], max_tokens=max_tokens, ignore_eos=True)
                n = sum(1 for _ in st)
            except Exception as e:  # reported below: a benchmark that lost requests is no benchmark
                errors.append(e)
                return
            with lock:
                done.append((n, st.timing, st.request.cached_tokens))

    profile = gen.engine.profile = Profile()  # this run's batches only, not the warm-up
    start = time.perf_counter()
    threads = [threading.Thread(target=client, daemon=True) for _ in range(min(concurrency, requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if errors:
        raise errors[0]
    tokens = sum(n for n, _, _ in done)
    ttft = [t.ttft_ms for _, t, _ in done]
    itl = [g * 1000 for _, t, _ in done for g in t.gaps]
    return {
        "aggregate_tokens_per_s": tokens / wall,
        "requests_per_s": requests / wall,
        **percentiles("ttft_ms", ttft),
        **percentiles("itl_ms", itl),
        "concurrency": concurrency,
        "requests": requests,
        "max_tokens": max_tokens,
        "prompt_len": prompt_len,
        "inflight": gen.engine.inflight,
        "tokens": tokens,
        "cached_tokens": sum(c for _, _, c in done),  # prompt tokens the prefix cache served
        "prefix_cache": gen.engine.prefix is not None,
        "wall_s": wall,
        "stages": (stages := gen.pipeline.describe()),
        "breakdown": profile.to_json(stages),  # compute per stage and wire time, summed over the run's batches
    }


def format_serving(r: dict) -> str:
    return (f"concurrency {r['concurrency']}, {r['requests']} requests of {r['prompt_len']} + {r['max_tokens']} "
            f"tokens, {r['inflight']} micro-batch(es) in flight\n"
            f"  aggregate {r['aggregate_tokens_per_s']:.1f} tokens/s, {r['requests_per_s']:.2f} requests/s "
            f"({r['tokens']} tokens in {r['wall_s']:.1f} s)\n"
            f"  time to first token p50 {r['ttft_ms_p50']:.0f} ms, p95 {r['ttft_ms_p95']:.0f} ms\n"
            f"  inter-token latency p50 {r['itl_ms_p50']:.1f} ms, p95 {r['itl_ms_p95']:.1f} ms\n"
            + format_breakdown(r["breakdown"]))


def format_breakdown(b: dict) -> str:
    parts = [f"{s['stage']} {s['compute_ms_per_step']:.1f} ms" for s in b["stages"]]
    return (f"  per step ({b['steps']} steps): compute {', '.join(parts)}; "
            f"wire and waiting {b['wire_ms_per_step']:.1f} ms")
