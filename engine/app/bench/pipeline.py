"""`hetpipe bench pipeline`: one split run four ways in one session.

torch+torch and mlx+torch, each in-process and over ZeroMQ (two daemons on loopback), each with a
coordinator process of its own, in alternating rounds; ratios ZeroMQ/in-process and
heterogeneous/homogeneous, with 95% intervals, and where each step's time went.
Writes pipeline.json, pipeline.md and pipeline.png under the output directory.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

from ...core.config import ModelConfig
from ...core.errors import UserError
from ..procs import start_stage, stop_stages
from .report import pyplot
from .stats import ratio_interval


PROMPT = "Once upon a time"


def run_pipeline(model_dir: str, split: int, dtype: str, rounds: int, tokens: int, log=print) -> dict:
    """The same split four ways, alternating; decode tokens/s and the time breakdown of each.

    Each configuration has a coordinator process of its own, as a user's `hetpipe generate` would:
    in-process stages do not share a process (its threads and memory) with each other's.
    """
    cfg = ModelConfig.load(model_dir)
    n = cfg.num_hidden_layers
    if not 0 <= split < n - 1:
        raise UserError(f"the split must be in 0..{n - 2}: the first stage holds layers 0..split")
    a, b = f"0-{split}", f"{split + 1}-{n - 1}"
    workers: dict[str, subprocess.Popen] = {}
    procs = []
    try:
        for backends in (("mlx", "torch"), ("torch", "torch")):
            workers[f"{'+'.join(backends)} in-process"] = _start_worker(
                model_dir, dtype, "--local", f"{backends[0]}:{a},{backends[1]}:{b}")
        for backends in (("mlx", "torch"), ("torch", "torch")):
            addrs = []
            for backend in backends:
                proc, address = start_stage(backend, model_dir, dtype)
                procs.append(proc)
                addrs.append(address)
            workers[f"{'+'.join(backends)} zeromq"] = _start_worker(
                model_dir, dtype, "--stages", f"{addrs[0]}={a},{addrs[1]}={b}")
        for k, w in workers.items():
            _read(k, w)  # loaded and warmed up
        rates = {k: [] for k in workers}
        profiles = {k: [] for k in workers}  # each round's
        for i in range(rounds):
            # every other round in reverse order: a machine slowing down or speeding up over the
            # run then favours no configuration
            for k, w in list(workers.items())[:: 1 if i % 2 == 0 else -1]:
                w.stdin.write(f"{tokens}\n")
                w.stdin.flush()
                res = _read(k, w)
                rates[k].append(res["decode_tokens_per_s"])
                profiles[k].append(res["profile"])
        med = {k: statistics.median(v) for k, v in rates.items()}
        for k in workers:
            log(f"{k}: {med[k]:.2f} tokens/s")
        ratios = _pipeline_ratios(med)
        # the same ratios within each round (runs seconds apart), then their median: less exposed
        # to a shared machine's slow minutes than the ratio of medians
        per_round = [_pipeline_ratios({k: v[i] for k, v in rates.items()}) for i in range(rounds)]
        paired = {k: statistics.median(r[k] for r in per_round) for k in ratios}
        intervals = {k: ratio_interval([r[k] for r in per_round]) for k in ratios}
        for k, v in ratios.items():
            log(f"{k}: {v:.3f} (median of per-round ratios {paired[k]:.3f}{_interval_text(intervals[k])})")
        return {"split": [a, b], "dtype": dtype, "rounds": rounds, "tokens": tokens, "tokens_per_s": med,
                "runs": rates, "ratios": ratios, "paired_ratios": paired, "ratio_intervals": intervals,
                "step_breakdown": {k: _median_breakdown(v) for k, v in profiles.items()},
                "last_profile": {k: v[-1] for k, v in profiles.items()}}
    finally:
        for w in workers.values():
            _stop_worker(w)
        stop_stages(procs)


def _start_worker(model_dir: str, dtype: str, how: str, spec: str) -> subprocess.Popen:
    # a session of its own: Ctrl-C reaches the bench, whose cleanup ends the workers (end of stdin)
    return subprocess.Popen([sys.executable, "-m", "engine.app.bench.pipeline", model_dir, dtype, how,
                             spec], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True)


def _read(name: str, w: subprocess.Popen) -> dict:
    line = w.stdout.readline()
    if not line:
        w.wait()
        raise UserError(f"bench pipeline: the {name} run exited with code {w.returncode} (its error is above)")
    return json.loads(line)


def _stop_worker(w: subprocess.Popen) -> None:
    try:
        w.stdin.close()  # end of commands: the worker closes its pipeline and exits
        w.wait(timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        w.kill()
        w.wait()


def pipeline_worker(model_dir: str, dtype: str, how: str, spec: str) -> None:
    """One configuration's coordinator: warm up, then one generation per line of stdin (its token
    count), each answered with a JSON line on stdout."""
    from ...api import Generator, connect_pipeline, local_pipeline

    out, sys.stdout = sys.stdout, sys.stderr  # stdout carries the answers and nothing else
    if how == "--local":
        pipeline = local_pipeline(model_dir, spec, dtype)
    else:
        pipeline = connect_pipeline(model_dir, spec, log=lambda m: None)
    with Generator(model_dir, pipeline) as gen:
        gen.generate(PROMPT, max_tokens=4)
        print(json.dumps({"ready": True}), file=out, flush=True)
        for line in sys.stdin:
            res = gen.generate(PROMPT, max_tokens=int(line), ignore_eos=True)
            print(json.dumps({"decode_tokens_per_s": res.decode_tokens_per_s, "profile": res.profile}), file=out,
                  flush=True)


def _interval_text(iv: dict | None) -> str:
    return "" if iv is None else f"; per-round mean {iv['mean']:.3f}, 95% interval {iv['low']:.3f}-{iv['high']:.3f}"


def _median_breakdown(profiles: list[dict]) -> dict:
    """Per-step compute of each stage and wire time, medians over the rounds (one round is noisy)."""
    return {"compute_ms_per_step": [statistics.median(p["stages"][i]["compute_ms_per_step"] for p in profiles)
                                    for i in range(len(profiles[0]["stages"]))],
            "wire_ms_per_step": statistics.median(p["wire_ms_per_step"] for p in profiles),
            "hop_ms_per_step": [statistics.median(p["hop_ms_per_step"][i] for p in profiles)
                                for i in range(len(profiles[0]["hop_ms_per_step"]))]}


def _pipeline_ratios(rate: dict[str, float]) -> dict[str, float]:
    return {
        "torch+torch zeromq / in-process": rate["torch+torch zeromq"] / rate["torch+torch in-process"],
        "mlx+torch zeromq / in-process": rate["mlx+torch zeromq"] / rate["mlx+torch in-process"],
        "mlx+torch / torch+torch (zeromq)": rate["mlx+torch zeromq"] / rate["torch+torch zeromq"],
        "mlx+torch / torch+torch (in-process)": rate["mlx+torch in-process"] / rate["torch+torch in-process"],
    }


def pipeline_table(r: dict) -> str:
    lines = ["| configuration | decode tokens/s | compute ms/step per stage | wire ms/step | ms per hop |",
             "|---|---|---|---|---|"]
    for k, v in r["tokens_per_s"].items():
        b = r["step_breakdown"][k]
        stages = ", ".join(f"{ms:.1f}" for ms in b["compute_ms_per_step"])
        hops = ", ".join(f"{ms:.2f}" for ms in b["hop_ms_per_step"]) or "-"
        lines.append(f"| {k} | {v:.2f} | {stages} | {b['wire_ms_per_step']:.2f} | {hops} |")
    lines += ["", f"Medians over {r['rounds']} rounds of {r['tokens']} tokens.", "",
              "| ratio | of the medians | median of per-round ratios | per-round geometric mean [95% interval] |",
              "|---|---|---|---|"]
    for k, v in r["ratios"].items():
        iv = r["ratio_intervals"][k]
        mean = "-" if iv is None else f"{iv['mean']:.3f} [{iv['low']:.3f}, {iv['high']:.3f}]"
        lines.append(f"| {k} | {v:.3f} | {r['paired_ratios'][k]:.3f} | {mean} |")
    return "\n".join(lines) + "\n"


def pipeline_plot(r: dict, path: Path) -> None:
    plt = pyplot()
    names = list(r["tokens_per_s"])
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.bar([n.replace(" ", "\n") for n in names], [r["tokens_per_s"][n] for n in names],
           color=["tab:orange" if "mlx" in n else "tab:blue" for n in names])
    ax.set_ylabel("decode tokens/s (one stream)")
    ax.set_title(f"split {r['split'][0]} | {r['split'][1]}, {r['dtype']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":  # a worker: python -m engine.app.bench.pipeline MODEL DTYPE --local|--stages SPEC
    pipeline_worker(*sys.argv[1:])
