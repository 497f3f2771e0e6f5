"""Benchmark (not a test): one stream's decode tokens/s and the time to first token of a 512-token
prompt, for hetpipe's own paths beside the yardsticks, all in one run.

    hetpipe:SPEC:DTYPE          `hetpipe generate --local SPEC --dtype DTYPE` (Generator, compute thread)
    hetpipe-compiled:SPEC:DTYPE the same with --compile
    direct:torch:DTYPE          a bare loop of TorchStage.forward calls on the thread that loaded it
    moved:torch:DTYPE           the same stage loaded on one thread and run on another (what a
                                stage run off its loading thread pays)
    lean-torch:DTYPE            examples/lean_torch_loop.py: ~100 lines of plain torch
    transformers:DTYPE          transformers' `generate`
    mlx-lm:float32              mlx-lm's `stream_generate`
    llama.cpp:FILE              llama-cpp-python on a GGUF (`--gguf FILE`, e.g. a bf16 GGUF of the model)

Each configuration runs in a fresh process of its own, in rounds whose order reverses every other
time, so thread pools do not mix and the machine's drift hits every configuration alike; figures
are medians over rounds and the table gives ratios to the lean loop and to llama.cpp.

    .venv/bin/python examples/bench_model_core.py [--rounds 3] [--tokens 64] [--configs 'A;B'] [--json out.json]

hetpipe's configurations run on tcmalloc where the system has it and with short spin-waits, as the
`hetpipe` command does (`engine/compose/allocator.py`, `engine/app/threads.py`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))

CONFIGS = ["hetpipe:torch:bfloat16", "direct:torch:bfloat16", "moved:torch:bfloat16", "lean-torch:bfloat16",
           "transformers:bfloat16"]
PROMPT = "Once upon a time"
LONG = ("The history of computing is a story of people, machines and ideas. " * 60)


def worker(config: str, model_dir: str, tokens: int) -> dict:
    kind, rest = config.split(":", 1)
    if kind in ("hetpipe", "hetpipe-compiled"):
        spec, dtype = rest.rsplit(":", 1)
        return _hetpipe(model_dir, spec, dtype, tokens, compile=kind == "hetpipe-compiled")
    if kind in ("direct", "moved"):
        return _direct(model_dir, rest.split(":")[1], tokens, moved=kind == "moved")
    if kind == "lean-torch":
        return _lean(model_dir, rest, tokens)
    if kind == "transformers":
        return _transformers(model_dir, rest, tokens)
    if kind == "llama.cpp":
        return _llama_cpp(rest, tokens)
    return _mlx_lm(model_dir, tokens)


def _ids(model_dir):
    from engine.serving.text import Tokenizer

    tok = Tokenizer(model_dir)
    return tok.encode(PROMPT), tok.encode(LONG)[:512]


def _hetpipe(model_dir, spec, dtype, tokens, compile=False):
    from engine.api import Generator, local_pipeline

    ids, long_ids = _ids(model_dir)
    # no prefix cache: each timed prefill of the long prompt computes it (a cache would serve the 2nd and 3rd)
    with Generator(model_dir, local_pipeline(model_dir, spec, dtype, compile=compile), prefix_cache=False) as gen:
        gen.generate(ids, max_tokens=8)
        # ignore_eos: always decode `tokens` tokens
        rates = [gen.generate(ids, max_tokens=tokens, ignore_eos=True).decode_tokens_per_s for _ in range(3)]
        ttft = [gen.generate(long_ids, max_tokens=1).ttft_ms for _ in range(3)]
    return {"decode_tokens_per_s": statistics.median(rates), "ttft_512_ms": statistics.median(ttft)}


def _direct(model_dir, dtype, tokens, moved=False):
    """The stage's own calls with nothing around them: greedy, one sequence."""
    import numpy as np

    from engine.compose.stages import load_stage
    from engine.core.sampling import SamplingParams
    from engine.core.stage import SeqChunk, StageBatch

    stage = load_stage("torch", model_dir, 0, stage_last(model_dir), dtype=dtype)
    ids, long_ids = _ids(model_dir)
    p = SamplingParams()

    def generate(sid, prompt, n):
        t0 = time.perf_counter()
        (tok,) = stage.forward(StageBatch([SeqChunk(sid, 0, np.asarray(prompt, np.int32), p)])).tokens
        first = time.perf_counter()
        for i in range(n - 1):
            (tok,) = stage.forward(StageBatch([SeqChunk(sid, len(prompt) + i, np.array([tok.token_id], np.int32),
                                                         p)])).tokens
        stage.release([sid])
        return first - t0, (n - 1) / (time.perf_counter() - first) if n > 1 else 0.0

    def measure():
        generate(0, ids, 8)
        rates = [generate(1 + r, ids, tokens)[1] for r in range(3)]
        ttft = [generate(9 + r, long_ids, 1)[0] * 1000 for r in range(3)]
        return {"decode_tokens_per_s": statistics.median(rates), "ttft_512_ms": statistics.median(ttft)}

    if not moved:
        return measure()
    out = {}
    t = threading.Thread(target=lambda: out.update(measure()))
    t.start()
    t.join()
    return out


def stage_last(model_dir) -> int:
    from engine.core.config import ModelConfig

    return ModelConfig.load(model_dir).num_hidden_layers - 1


def _lean(model_dir, dtype, tokens):
    import lean_torch_loop

    ids, long_ids = _ids(model_dir)
    return lean_torch_loop.run(model_dir, dtype, ids, long_ids, tokens)


def _transformers(model_dir, dtype, tokens):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
    ids, long_ids = (torch.tensor([x]) for x in _ids(model_dir))
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


def table(results: dict) -> str:
    med = {c: {k: statistics.median(x[k] for x in v) for k in v[0]} for c, v in results.items() if v}
    lean = next((v for c, v in med.items() if c.startswith("lean-torch")), None)
    cpp = next((v for c, v in med.items() if c.startswith("llama.cpp")), None)

    def ratio(v, base, key):
        return f"{v[key] / base[key]:.2f}x" if base else "-"

    lines = ["| configuration | decode tokens/s | vs lean loop | vs llama.cpp | TTFT 512 (ms) | TTFT vs lean loop |",
             "|---|---|---|---|---|---|"]
    for c, v in med.items():
        lines.append(f"| {c} | {v['decode_tokens_per_s']:.1f} | {ratio(v, lean, 'decode_tokens_per_s')} | "
                     f"{ratio(v, cpp, 'decode_tokens_per_s')} | {v['ttft_512_ms']:.0f} | "
                     f"{ratio(v, lean, 'ttft_512_ms')} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--configs", default=";".join(CONFIGS), help="';'-separated")
    ap.add_argument("--json", default=None)
    ap.add_argument("--gguf", default=None, help="a GGUF for the llama.cpp anchor (needs llama-cpp-python)")
    ap.add_argument("--llama-python", default=sys.executable, help="the Python that has llama-cpp-python")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    from engine.app import threads
    from engine.compose import allocator
    from engine.app.fetch import default_model_dir

    model_dir = args.model or str(default_model_dir())
    if args.worker:
        print(json.dumps(worker(args.worker, model_dir, args.tokens)))
        return
    configs = args.configs.split(";") + ([f"llama.cpp:{args.gguf}"] if args.gguf else [])
    results = {c: [] for c in configs}
    for r in range(args.rounds):
        for c in configs[:: 1 if r % 2 == 0 else -1]:
            env = dict(os.environ)
            python = sys.executable
            if c.startswith(("hetpipe", "direct", "moved")):  # as the `hetpipe` command runs
                env = threads.apply(allocator.environment(env))
            if c.startswith("llama.cpp"):
                python = args.llama_python
                env["PYTHONPATH"] = str(ROOT)
            p = subprocess.run([python, __file__, "--worker", c, "--model", model_dir, "--tokens", str(args.tokens)],
                               capture_output=True, text=True, env=env)
            if p.returncode != 0:
                print(f"{c}: failed: {p.stderr.strip().splitlines()[-1] if p.stderr.strip() else '?'}",
                      file=sys.stderr)
                continue
            results[c].append(json.loads(p.stdout.strip().splitlines()[-1]))
            print(f"round {r + 1} {c}: {results[c][-1]}", file=sys.stderr)
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
