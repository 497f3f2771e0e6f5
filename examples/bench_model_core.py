"""Benchmark (not a test): decode tokens/s and time to first token, per backend and dtype,
beside transformers' `generate` (and mlx-lm, and llama.cpp through llama-cpp-python, when
installed; llama.cpp needs `--gguf FILE`, e.g. a bf16 GGUF of the same model) in the same run.

Each configuration runs in its own fresh process, in interleaved rounds, so that thread pools
do not mix and the machine's drift hits every configuration alike. Figures are medians.

    .venv/bin/python examples/bench_model_core.py [--rounds 2] [--tokens 64] [--json out.json]

hetpipe configurations run on tcmalloc where the system has it, as the `hetpipe` command does;
the anchors run on the system allocator unless named with `+tcmalloc` (e.g.
`transformers+tcmalloc:bfloat16`), to see how much of a ratio the allocator accounts for.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

CONFIGS = [
    "hetpipe:mlx:float32", "hetpipe:torch:float32", "hetpipe:mlx:0-14,torch:15-29:float32",
    "hetpipe:mlx:bfloat16", "hetpipe:torch:bfloat16", "hetpipe:mlx:0-14,torch:15-29:bfloat16",
    "transformers:float32", "transformers:bfloat16", "mlx-lm:float32", "hetpipe-compiled:torch:bfloat16",
]
PROMPT = "Once upon a time"
LONG = ("The history of computing is a story of people, machines and ideas. " * 60)


def worker(config: str, model_dir: str, tokens: int) -> dict:
    kind, rest = config.split(":", 1)
    kind = kind.removesuffix("+tcmalloc")  # an anchor run on the allocator hetpipe runs on
    spec, dtype = rest.rsplit(":", 1) if kind.startswith("hetpipe") else (None, rest)
    if kind.startswith("hetpipe"):  # hetpipe-compiled: torch stages under torch.compile
        return _hetpipe(model_dir, spec, dtype, tokens, compile=kind == "hetpipe-compiled")
    if kind == "transformers":
        return _transformers(model_dir, dtype, tokens)
    if kind == "llama.cpp":
        return _llama_cpp(rest, tokens)
    return _mlx_lm(model_dir, tokens)


def _llama_cpp(gguf: str, tokens: int):
    from llama_cpp import Llama

    llm = Llama(model_path=gguf, n_ctx=1024, n_threads=os.cpu_count(), verbose=False)
    ids = llm.tokenize(PROMPT.encode())
    long_ids = llm.tokenize(LONG.encode())[:512]

    def run(prompt, n):
        llm.reset()
        t, first = time.perf_counter(), None
        for i, _ in enumerate(llm.generate(prompt, temp=0.0)):
            first = first or time.perf_counter()
            if i + 1 >= n:
                break
        return first - t, (n - 1) / (time.perf_counter() - first) if n > 1 else 0.0

    run(ids, 8)
    rates = [run(ids, tokens)[1] for _ in range(3)]
    ttft = [run(long_ids, 1)[0] * 1000 for _ in range(3)]
    return {"decode_tokens_per_s": statistics.median(rates), "ttft_512_ms": statistics.median(ttft)}


def _hetpipe(model_dir, spec, dtype, tokens, compile=False):
    from engine.api import local_pipeline
    from engine.api import Generator

    gen = Generator(model_dir, local_pipeline(model_dir, spec, dtype, None, compile))
    long_ids = gen.tokenizer.encode(LONG)[:512]
    gen.generate(PROMPT, max_tokens=8)
    # ignore_eos: always decode `tokens` tokens
    rates = [gen.generate(PROMPT, max_tokens=tokens, ignore_eos=True).decode_tokens_per_s for _ in range(3)]
    ttft = [gen.generate(long_ids, max_tokens=1).ttft_ms for _ in range(3)]
    return {"decode_tokens_per_s": statistics.median(rates), "ttft_512_ms": statistics.median(ttft)}


def _transformers(model_dir, dtype, tokens):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
    ids = tok(PROMPT, return_tensors="pt").input_ids
    long_ids = tok(LONG, return_tensors="pt").input_ids[:, :512]
    kw = dict(do_sample=False, pad_token_id=0)
    model.generate(ids, max_new_tokens=8, **kw)
    rates, ttft = [], []
    for _ in range(3):
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
        first = time.perf_counter() - t
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, **kw)
        rates.append((tokens - 1) / (time.perf_counter() - t - first))
        t = time.perf_counter()
        model.generate(long_ids, max_new_tokens=1, **kw)
        ttft.append((time.perf_counter() - t) * 1000)
    return {"decode_tokens_per_s": statistics.median(rates), "ttft_512_ms": statistics.median(ttft)}


def _mlx_lm(model_dir, tokens):
    import backends.mlx_stage  # noqa: F401  (the same OpenBLAS preload hetpipe uses, before mlx)
    from mlx_lm import load, stream_generate

    model, tok = load(model_dir)
    long_ids = tok.encode(LONG)[:512]
    for _ in stream_generate(model, tok, PROMPT, max_tokens=8):
        pass
    rates, ttft = [], []
    for _ in range(3):
        *_, last = stream_generate(model, tok, PROMPT, max_tokens=tokens)
        rates.append(last.generation_tps)
        t = time.perf_counter()
        for _ in stream_generate(model, tok, long_ids, max_tokens=1):
            pass
        ttft.append((time.perf_counter() - t) * 1000)
    return {"decode_tokens_per_s": statistics.median(rates), "ttft_512_ms": statistics.median(ttft)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--configs", default=";".join(CONFIGS), help="';'-separated")
    ap.add_argument("--json", default=None)
    ap.add_argument("--gguf", default=None, help="a GGUF for the llama.cpp anchor (needs llama-cpp-python)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    from engine.app import allocator
    from engine.app.fetch import default_model_dir

    model_dir = args.model or str(default_model_dir())
    if args.worker:
        print(json.dumps(worker(args.worker, model_dir, args.tokens)))
        return
    configs = args.configs.split(";")
    import importlib.util

    if args.gguf and importlib.util.find_spec("llama_cpp"):
        configs.append(f"llama.cpp:{args.gguf}")
    elif args.gguf:
        print("llama-cpp-python is not installed: no llama.cpp anchor", file=sys.stderr)
    results = {c: [] for c in configs}
    for r in range(args.rounds):
        for c in configs:
            env = dict(os.environ)
            if c.startswith("hetpipe") or c.split(":")[0].endswith("+tcmalloc"):
                env = allocator.environment(env)  # on tcmalloc, as the `hetpipe` command runs
            if "mlx" in c and "torch" in c:
                env["OMP_WAIT_POLICY"] = "PASSIVE"  # as `hetpipe generate --local` sets for mixed
            p = subprocess.run([sys.executable, __file__, "--worker", c, "--model", model_dir,
                                "--tokens", str(args.tokens)], capture_output=True, text=True, env=env)
            if p.returncode != 0:
                print(f"{c}: failed: {p.stderr.strip().splitlines()[-1] if p.stderr.strip() else '?'}",
                      file=sys.stderr)
                continue
            results[c].append(json.loads(p.stdout.strip().splitlines()[-1]))
            print(f"round {r + 1} {c}: {results[c][-1]}", file=sys.stderr)
    table = {c: {k: statistics.median(x[k] for x in v) for k in v[0]} for c, v in results.items() if v}
    base = table.get("transformers:bfloat16", {}).get("decode_tokens_per_s")
    print("| configuration | decode tokens/s | vs transformers bf16 | TTFT 512 tokens (ms) |")
    print("|---|---|---|---|")
    for c, v in table.items():
        ratio = f"{v['decode_tokens_per_s'] / base:.2f}x" if base else "-"
        print(f"| {c} | {v['decode_tokens_per_s']:.1f} | {ratio} | {v['ttft_512_ms']:.0f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(table, f, indent=2)


if __name__ == "__main__":
    main()
