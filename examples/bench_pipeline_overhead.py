"""Benchmark (not a test): the same split in-process versus over ZeroMQ on loopback.

Starts an MLX and a torch stage daemon, then alternates runs of the in-process pipeline and
the daemon pipeline for the same layer split in this one session, and prints the ratio.

    .venv/bin/python examples/bench_pipeline_overhead.py [--split 14] [--rounds 5] [--tokens 64]
"""

from __future__ import annotations

import argparse
import os
import statistics

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads, as the CLI does for mixed runs

from engine import allocator  # noqa: E402

allocator.reexec()  # on tcmalloc like the daemons this starts (the `hetpipe` command runs on it)

from engine.cli import local_pipeline  # noqa: E402
from engine.demo import start_stage, stop_stages  # noqa: E402
from engine.fetch import default_model_dir  # noqa: E402
from engine.generate import Generator  # noqa: E402
from transport.client import connect_pipeline  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(default_model_dir()))
    ap.add_argument("--split", type=int, default=14, help="last layer of the MLX stage")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()
    a, b = f"0-{args.split}", f"{args.split + 1}-29"
    procs = []
    try:
        for backend in ("mlx", "torch"):
            procs.append(start_stage(backend, args.model, args.dtype))
        remote = Generator(args.model, connect_pipeline(
            args.model, f"{procs[0][1]}={a},{procs[1][1]}={b}", 30))
        local = Generator(args.model, local_pipeline(args.model, f"mlx:{a},torch:{b}", args.dtype, None))
        for g in (local, remote):
            g.generate("warm up", max_tokens=8)
        rates = {"in-process": [], "zeromq": []}
        for _ in range(args.rounds):
            for name, g in (("in-process", local), ("zeromq", remote)):
                res = g.generate("Once upon a time", max_tokens=args.tokens, ignore_eos=True)
                rates[name].append(res.decode_tokens_per_s)
        med = {k: statistics.median(v) for k, v in rates.items()}
        ratios = [zmq / local for local, zmq in zip(rates["in-process"], rates["zeromq"])]
        print(f"split mlx:{a} torch:{b} {args.dtype}, {args.rounds} alternating rounds of {args.tokens} tokens")
        for k, v in rates.items():
            print(f"  {k:10s} decode tokens/s: median {med[k]:.2f}  runs {' '.join(f'{x:.2f}' for x in v)}")
        print(f"  zeromq / in-process: {med['zeromq'] / med['in-process']:.3f} "
              f"(per-round ratios median {statistics.median(ratios):.3f})")
        for g in (local, remote):
            g.close()  # the engine thread first, then the sockets it uses
        remote.pipeline.close()
    finally:
        stop_stages([p for p, _ in procs])


if __name__ == "__main__":
    main()
