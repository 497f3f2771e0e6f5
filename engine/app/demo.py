"""`hetpipe demo`: SmolLM2 through an MLX stage daemon and a torch stage daemon on loopback."""

from __future__ import annotations

import sys

from ..api import Generator, connect_pipeline
from .fetch import fetch
from .procs import start_stage, stop_stages


def run_demo(prompt: str, max_tokens: int, dtype: str) -> int:
    model_dir = fetch("smollm2", progress=sys.stderr.isatty())
    procs = []
    try:
        addresses = []
        for backend in ("mlx", "torch"):  # one at a time, so each calibrates on idle cores
            proc, address = start_stage(backend, model_dir, dtype)
            procs.append(proc)
            addresses.append(address)
            print(f"started {backend} stage daemon (pid {proc.pid}) at {address}", file=sys.stderr)
        pipeline = connect_pipeline(model_dir, ",".join(addresses), log=lambda m: print(m, file=sys.stderr))
        with Generator(model_dir, pipeline) as gen:
            print(f"\nuser: {prompt}\nassistant: ", end="", flush=True)
            stream = gen.stream(prompt, chat=True, max_tokens=max_tokens)
            for piece in stream:
                print(piece.text, end="", flush=True)
            t = stream.timing
            print(f"\n\n{t.tokens} tokens, time to first token {t.ttft_ms:.0f} ms, "
                  f"{t.decode_tokens_per_s:.1f} tokens/s decode")
            stages = pipeline.describe()
            for d, p in zip(stages, stream.profile.to_json(stages)["stages"]):
                print(f"  {d['backend']:5s} {d['device']} {d['dtype']} layers {d['layers'][0]}-{d['layers'][1]} "
                      f"at {d['address']}: {p['compute_ms_per_step']:.1f} ms compute per step")
        return 0
    finally:
        stop_stages(procs)
