"""`hetpipe bench --url URL`: `bench serving`'s load, sent to a running `hetpipe serve`.

The same closed loop (N clients, R requests of L prompt tokens and exactly T generated tokens, EOS
ignored), as streamed `/v1/completions` with the prompts as token ids, so the numbers compare with
`hetpipe bench serving` against the Python API: the same keys, measured at the HTTP client.
"""

from __future__ import annotations

import asyncio
import json
import time

from ...core.errors import StageFailure, UserError
from ...serving.output import percentiles
from ...serving.text import Tokenizer
from .serving import bench_prompts


async def _run(url: str, api_key: str | None, prompts: list[list[int]], concurrency: int, max_tokens: int) -> dict:
    import httpx

    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    async with httpx.AsyncClient(base_url=url.rstrip("/"), headers=headers, timeout=600) as http:
        r = await http.get("/v1/models")
        if r.status_code != 200:
            raise UserError(f"{url}/v1/models answered {r.status_code}: {r.text[:200]}")
        model = r.json()["data"][0]["id"]

        async def one(ids: list[int]) -> tuple[int, float, list[float]]:
            body = {"model": model, "prompt": ids, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                    "ignore_eos": True, "stream_options": {"include_usage": True}}
            start, stamps, tokens = time.perf_counter(), [], 0
            async with http.stream("POST", "/v1/completions", json=body) as resp:
                if resp.status_code != 200:
                    raise StageFailure(f"the server answered {resp.status_code}: {(await resp.aread())[:200]!r}")
                async for line in resp.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    msg = json.loads(line[6:])
                    if "error" in msg:
                        raise StageFailure(f"the server failed a request: {msg['error']['message']}")
                    if msg["choices"] and msg["choices"][0]["text"]:  # a token's text (not the finish)
                        stamps.append(time.perf_counter())
                    elif msg.get("usage"):
                        tokens = msg["usage"]["completion_tokens"]
            ttft = (stamps[0] - start) * 1000 if stamps else 0.0
            return tokens, ttft, [(b - a) * 1000 for a, b in zip(stamps, stamps[1:])]

        await one(prompts[0][:8])  # warm the connection and the engine
        queue = list(reversed(prompts))
        done: list[tuple[int, float, list[float]]] = []

        async def client():
            while queue:
                done.append(await one(queue.pop()))

        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(min(concurrency, len(prompts)))))
        wall = time.perf_counter() - start
    return {"tokens": sum(n for n, _, _ in done), "wall_s": wall, "ttft": [t for _, t, _ in done],
            "itl": [g for _, _, gaps in done for g in gaps], "model": model}


def run_http(url: str, model_dir: str, *, api_key: str | None, concurrency: int, requests: int, max_tokens: int,
             prompt_len: int) -> dict:
    """Load the server at `url`; the prompts are cut from the same text, with `model_dir`'s tokenizer."""
    import httpx

    prompts = bench_prompts(Tokenizer(model_dir), requests, prompt_len)
    try:
        m = asyncio.run(_run(url, api_key, prompts, concurrency, max_tokens))
    except httpx.HTTPError as e:
        raise UserError(f"cannot load {url}: {e}") from None
    return {
        "aggregate_tokens_per_s": m["tokens"] / m["wall_s"],
        "requests_per_s": requests / m["wall_s"],
        **percentiles("ttft_ms", m["ttft"]),
        **percentiles("itl_ms", m["itl"]),
        "concurrency": concurrency, "requests": requests, "max_tokens": max_tokens, "prompt_len": prompt_len,
        "tokens": m["tokens"], "wall_s": m["wall_s"], "url": url, "model": m["model"],
    }


def format_http(r: dict) -> str:
    return (f"{r['url']} ({r['model']}): concurrency {r['concurrency']}, {r['requests']} requests of "
            f"{r['prompt_len']} + {r['max_tokens']} tokens\n"
            f"  aggregate {r['aggregate_tokens_per_s']:.1f} tokens/s, {r['requests_per_s']:.2f} requests/s "
            f"({r['tokens']} tokens in {r['wall_s']:.1f} s)\n"
            f"  time to first token p50 {r['ttft_ms_p50']:.0f} ms, p95 {r['ttft_ms_p95']:.0f} ms\n"
            f"  inter-token latency p50 {r['itl_ms_p50']:.1f} ms, p95 {r['itl_ms_p95']:.1f} ms")
