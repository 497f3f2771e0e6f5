"""Serving benchmarks behind the README's figures, as ratios measured in one run.

1. Concurrency: aggregate decode tokens/s at concurrency 16 over concurrency 1, one in-process
   torch stage (each dtype), alternating rounds.
2. Micro-batches in flight: two torch stage daemons on loopback, each limited to one thread (two
   single-core "machines"), concurrency 16, `--inflight 2` over `--inflight 1`, for a decode-heavy
   load (short prompts) and a prefill-heavy one (long prompts), alternating rounds.

    .venv/bin/python examples/bench_serving.py [--rounds 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.api import Generator, connect_pipeline, local_pipeline  # noqa: E402
from engine.app.bench.serving import run_serving  # noqa: E402
from engine.app.fetch import default_model_dir  # noqa: E402
from engine.app.procs import start_stage, stop_stages  # noqa: E402


def rounds(runs: dict, n: int) -> dict:
    """Alternate the named runs n times; median aggregate tokens/s and ratio of each to the first."""
    rates = {k: [] for k in runs}
    for _ in range(n):
        for k, fn in runs.items():
            rates[k].append(fn()["aggregate_tokens_per_s"])
    med = {k: statistics.median(v) for k, v in rates.items()}
    base = next(iter(med))
    return {"tokens_per_s": med, "runs": rates, "ratio": {k: med[k] / med[base] for k in med}}


def concurrency(model: str, dtype: str, n: int) -> dict:
    with Generator(model, local_pipeline(model, "torch", dtype)) as gen:
        return rounds({c: (lambda c=c: run_serving(gen, concurrency=c, requests=c * 2, max_tokens=32, prompt_len=32))
                       for c in (1, 16)}, n)


def inflight(model: str, addresses: list[str], prompt_len: int, max_tokens: int, n: int, split: int | None) -> dict:
    spec = ",".join(addresses) if split is None else f"{addresses[0]}=0-{split},{addresses[1]}={split + 1}-29"
    # a pipeline (and so a coordinator connection) of its own per engine: the daemons serve both
    gens = {k: Generator(model, connect_pipeline(model, spec, log=lambda m: print(m, file=sys.stderr)), inflight=k)
            for k in (1, 2)}
    try:
        return rounds({k: (lambda g=g: run_serving(g, concurrency=16, requests=32, max_tokens=max_tokens,
                                                    prompt_len=prompt_len)) for k, g in gens.items()}, n)
    finally:
        for g in gens.values():
            g.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(default_model_dir()))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", default=None)
    ap.add_argument("--split", type=int, default=None, help="last layer of stage 1 (default: the planner's split)")
    ap.add_argument("--only", choices=["concurrency", "inflight"], default=None)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--loads", default="decode-heavy:32:32,prefill-heavy:256:16",
                    help="NAME:PROMPT_LEN:MAX_TOKENS,... for the micro-batch runs")
    args = ap.parse_args()
    dtypes = args.dtypes.split(",")
    loads = [(name, int(pl), int(mt)) for name, pl, mt in (x.split(":") for x in args.loads.split(","))]
    out = {}
    for dtype in dtypes if args.only != "inflight" else ():
        r = out[f"concurrency torch {dtype}"] = concurrency(args.model, dtype, args.rounds)
        print(f"torch {dtype}: conc 1 {r['tokens_per_s'][1]:.1f} tokens/s, conc 16 {r['tokens_per_s'][16]:.1f} "
              f"-> {r['ratio'][16]:.2f}x", flush=True)
    for dtype in dtypes if args.only != "concurrency" else ():
        procs = []
        try:
            for _ in range(2):
                procs.append(start_stage("torch", args.model, dtype, extra=["--threads", "1"]))
            for name, pl, mt in loads:
                r = out[f"inflight torch+torch {dtype} {name}"] = inflight(
                    args.model, [a for _, a in procs], pl, mt, args.rounds, args.split)
                print(f"torch+torch {dtype} {name} (prompt {pl}, {mt} tokens), conc 16: inflight 1 "
                      f"{r['tokens_per_s'][1]:.1f}, inflight 2 {r['tokens_per_s'][2]:.1f} tokens/s "
                      f"-> {r['ratio'][2]:.2f}x", flush=True)
        finally:
            stop_stages([p for p, _ in procs])
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1, default=str))


if __name__ == "__main__":
    main()
