"""`hetpipe bench backends` and `hetpipe bench pipeline`: what each backend and each split delivers.

backends: for every backend importable here and each dtype, the same layer range is loaded in a
process of its own (so each keeps its own BLAS and threads) and timed: prefill tokens/s for one
prompt, decode tokens/s for one stream, ms per layer per decoded token.

pipeline: one split run four ways in one session: torch+torch and mlx+torch, each in-process and
over ZeroMQ (two daemons on loopback), each with a coordinator process of its own, alternating
rounds; ratios ZeroMQ/in-process and heterogeneous/homogeneous.

Each writes NAME.json, NAME.md (a Markdown table) and NAME.png (matplotlib) under --out.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from . import allocator
from .config import ModelConfig
from .errors import UserError
from .tensors import STORAGE

# -- backends ------------------------------------------------------------------------------------


def decode_weight_bytes(cfg: ModelConfig, first: int, last: int, dtype: str) -> int:
    """Weight bytes one decode step reads on layers [first, last]: every projection and norm, and
    the head on the last stage (the embedding is a lookup of one row: not counted)."""
    h, hd = cfg.hidden_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    layer = h * (q + 2 * kv) + q * h + 3 * h * cfg.intermediate_size + 2 * h
    if cfg.attention_bias:
        layer += q + 2 * kv
    n = layer * (last - first + 1)
    if last == cfg.num_hidden_layers - 1:
        n += cfg.vocab_size * h + h
    return n * np.dtype(STORAGE[dtype]).itemsize


def time_stage(backend: str, model_dir: str, first: int, last: int, dtype: str, prompt_len: int, tokens: int) -> dict:
    """Prefill and decode one sequence through one in-process stage; medians of three."""
    from .sampling import SamplingParams
    from .stage import Hidden, SeqChunk, StageBatch, import_backends, load_stage

    import_backends({backend})
    cfg = ModelConfig.load(model_dir)
    stage = load_stage(backend, model_dir, first, last, dtype=dtype)
    sampling = SamplingParams() if stage.info.is_last else None
    rng = np.random.default_rng(0)

    def batch(sid, offset, n):
        ids = rng.integers(0, cfg.vocab_size, n).astype(np.int32)
        hidden = None if stage.info.is_first else Hidden.from_float32(
            rng.standard_normal((n, cfg.hidden_size)).astype(np.float32), dtype)
        return StageBatch([SeqChunk(sid, offset, ids, sampling)], hidden)

    prefill, decode = [], []
    for run in range(3):
        t = time.perf_counter()
        stage.forward(batch(run, 0, prompt_len))
        prefill.append(time.perf_counter() - t)
        t = time.perf_counter()
        for i in range(tokens):
            stage.forward(batch(run, prompt_len + i, 1))
        decode.append((time.perf_counter() - t) / tokens)
        stage.release([run])
    step = statistics.median(decode)
    weights = decode_weight_bytes(cfg, first, last, dtype)
    bandwidth = stage.read_bandwidth()
    return {"backend": backend, "device": stage.info.device, "dtype": dtype, "layers": [first, last],
            "prefill_tokens_per_s": prompt_len / statistics.median(prefill),
            "decode_tokens_per_s": 1 / step, "ms_per_layer": step * 1000 / (last - first + 1),
            # the memory floor: one stream reads every weight once per token, so it can go no faster
            # than the device's read bandwidth over those bytes
            "weight_bytes_per_token": weights, "weights_gb_per_s": weights / step / 1e9,
            "memory_read_gb_per_s": bandwidth / 1e9 if bandwidth else None,
            "floor_tokens_per_s": bandwidth / weights if bandwidth else None,
            "of_floor": weights / step / bandwidth if bandwidth else None,
            "prompt_len": prompt_len, "decode_tokens": tokens, "allocator": allocator.in_use(),
            "kernels": stage.kernels or "framework"}


def available_backends() -> list[str]:
    from .stage import BACKENDS

    out = []
    for name, module in BACKENDS.items():
        r = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True)
        if r.returncode == 0:
            out.append(name)
    return out


def run_backends(model_dir: str, layers: tuple[int, int] | None, dtypes: list[str], prompt_len: int,
                 tokens: int, log=print) -> list[dict]:
    cfg = ModelConfig.load(model_dir)
    first, last = layers or (0, cfg.num_hidden_layers - 1)
    if not 0 <= first <= last < cfg.num_hidden_layers:
        raise UserError(f"--layers {first}-{last} are outside the model's 0-{cfg.num_hidden_layers - 1}")
    rows = []
    for backend in available_backends():
        for dtype in dtypes:
            args = [backend, model_dir, str(first), str(last), dtype, str(prompt_len), str(tokens)]
            r = subprocess.run([sys.executable, "-m", "engine.bench_suites", "stage", *args],
                               capture_output=True, text=True)
            if r.returncode != 0:
                tail = (r.stderr.strip().splitlines() or ["?"])[-1]
                log(f"{backend} {dtype}: failed: {tail}")
                continue
            rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
            x = rows[-1]
            log(f"{backend} {x['device']} {dtype}: prefill {x['prefill_tokens_per_s']:.0f} tokens/s, decode "
                f"{x['decode_tokens_per_s']:.1f} tokens/s, {x['ms_per_layer']:.2f} ms/layer, "
                f"weights read at {x['weights_gb_per_s']:.1f} GB/s{_floor(x)}")
    return rows


def _floor(x: dict) -> str:
    if x["floor_tokens_per_s"] is None:
        return ""
    return (f" of {x['memory_read_gb_per_s']:.1f} GB/s measured ({x['of_floor']:.0%} of the memory floor, "
            f"{x['floor_tokens_per_s']:.0f} tokens/s)")


def backends_table(rows: list[dict]) -> str:
    lines = ["| backend | device | dtype | layers | prefill tokens/s | decode tokens/s | ms per layer (decode) "
             "| weights read GB/s | memory read GB/s | memory floor tokens/s | of floor | kernels |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for x in rows:
        floor = (f"{x['memory_read_gb_per_s']:.1f} | {x['floor_tokens_per_s']:.0f} | {x['of_floor']:.0%}"
                 if x["floor_tokens_per_s"] else "- | - | -")
        lines.append(f"| {x['backend']} | {x['device']} | {x['dtype']} | {x['layers'][0]}-{x['layers'][1]} | "
                     f"{x['prefill_tokens_per_s']:.0f} | {x['decode_tokens_per_s']:.1f} | {x['ms_per_layer']:.2f} | "
                     f"{x['weights_gb_per_s']:.1f} | {floor} | {x['kernels']} |")
    return "\n".join(lines) + "\n"


def backends_plot(rows: list[dict], path: Path) -> None:
    plt = _pyplot()
    names = [f"{x['backend']}\n{x['device']} {x['dtype']}" for x in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, title in ((axes[0], "decode_tokens_per_s", "decode tokens/s (one stream)"),
                           (axes[1], "prefill_tokens_per_s", "prefill tokens/s")):
        ax.bar(names, [x[key] for x in rows], color="tab:blue")
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# -- pipeline ------------------------------------------------------------------------------------


PROMPT = "Once upon a time"


def run_pipeline(model_dir: str, split: int, dtype: str, rounds: int, tokens: int, log=print) -> dict:
    """The same split four ways, alternating; decode tokens/s and the time breakdown of each.

    Each configuration has a coordinator process of its own, as a user's `hetpipe generate` would:
    in-process stages do not share a process (its threads and memory) with each other's.
    """
    from .demo import start_stage, stop_stages

    cfg = ModelConfig.load(model_dir)
    n = cfg.num_hidden_layers
    if not 0 <= split < n - 1:
        raise UserError(f"--split must be in 0..{n - 2}: the first stage holds layers 0..split")
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
    return subprocess.Popen([sys.executable, "-m", "engine.bench_suites", "pipeline-worker", model_dir, dtype, how,
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
    from transport.client import connect_pipeline

    from .cli import local_pipeline
    from .generate import Generator

    out, sys.stdout = sys.stdout, sys.stderr  # stdout carries the answers and nothing else
    if how == "--local":
        pipeline = local_pipeline(model_dir, spec, dtype, None)
    else:
        pipeline = connect_pipeline(model_dir, spec, ModelConfig.load(model_dir).num_hidden_layers,
                                    log=lambda m: None)
    gen = Generator(model_dir, pipeline)
    try:
        gen.generate(PROMPT, max_tokens=4)
        print(json.dumps({"ready": True}), file=out, flush=True)
        for line in sys.stdin:
            res = gen.generate(PROMPT, max_tokens=int(line), ignore_eos=True)
            print(json.dumps({"decode_tokens_per_s": res.decode_tokens_per_s, "profile": res.profile}), file=out,
                  flush=True)
    finally:
        gen.close()
        pipeline.close()


def t_quantile_975(df: int) -> float:
    """Student's t 97.5% quantile: Abramowitz & Stegun 26.7.5 (within 0.1% from 3 degrees of freedom;
    exact figures for 1 and 2), so a confidence interval needs no scipy."""
    if df < 3:
        return {1: 12.706, 2: 4.303}[df]
    z = 1.959964
    g = [(z ** 3 + z) / 4, (5 * z ** 5 + 16 * z ** 3 + 3 * z) / 96,
         (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / 384,
         (79 * z ** 9 + 776 * z ** 7 + 1482 * z ** 5 - 1920 * z ** 3 - 945 * z) / 92160]
    return z + sum(gi / df ** (i + 1) for i, gi in enumerate(g))


def ratio_interval(ratios: list[float]) -> dict | None:
    """Geometric mean of per-round ratios and its 95% confidence interval (t on the logs).

    A shared machine's speed moves by 10-15% between rounds; the interval says whether a few
    percent of pipeline overhead is resolved by this run at all. None with fewer than 2 rounds.
    """
    if len(ratios) < 2:
        return None
    logs = np.log(ratios)
    mean, half = float(logs.mean()), t_quantile_975(len(logs) - 1) * float(logs.std(ddof=1)) / len(logs) ** 0.5
    return {"mean": float(np.exp(mean)), "low": float(np.exp(mean - half)), "high": float(np.exp(mean + half))}


def _interval_text(iv: dict | None) -> str:
    return "" if iv is None else f"; per-round mean {iv['mean']:.3f}, 95% interval {iv['low']:.3f}-{iv['high']:.3f}"


def _median_breakdown(profiles: list[dict]) -> dict:
    """Per-step compute of each stage and wire time, medians over the rounds (one round is noisy)."""
    return {"compute_ms_per_step": [statistics.median(p["stages"][i]["compute_ms_per_step"] for p in profiles)
                                    for i in range(len(profiles[0]["stages"]))],
            "wire_ms_per_step": statistics.median(p["wire_ms_per_step"] for p in profiles)}


def _pipeline_ratios(rate: dict[str, float]) -> dict[str, float]:
    return {
        "torch+torch zeromq / in-process": rate["torch+torch zeromq"] / rate["torch+torch in-process"],
        "mlx+torch zeromq / in-process": rate["mlx+torch zeromq"] / rate["mlx+torch in-process"],
        "mlx+torch / torch+torch (zeromq)": rate["mlx+torch zeromq"] / rate["torch+torch zeromq"],
        "mlx+torch / torch+torch (in-process)": rate["mlx+torch in-process"] / rate["torch+torch in-process"],
    }


def pipeline_table(r: dict) -> str:
    lines = ["| configuration | decode tokens/s | compute ms/step per stage | wire ms/step |", "|---|---|---|---|"]
    for k, v in r["tokens_per_s"].items():
        b = r["step_breakdown"][k]
        stages = ", ".join(f"{ms:.1f}" for ms in b["compute_ms_per_step"])
        lines.append(f"| {k} | {v:.2f} | {stages} | {b['wire_ms_per_step']:.2f} |")
    lines += ["", f"Medians over {r['rounds']} rounds of {r['tokens']} tokens.", "",
              "| ratio | of the medians | median of per-round ratios | per-round geometric mean [95% interval] |",
              "|---|---|---|---|"]
    for k, v in r["ratios"].items():
        iv = r["ratio_intervals"][k]
        mean = "-" if iv is None else f"{iv['mean']:.3f} [{iv['low']:.3f}, {iv['high']:.3f}]"
        lines.append(f"| {k} | {v:.3f} | {r['paired_ratios'][k]:.3f} | {mean} |")
    return "\n".join(lines) + "\n"


def pipeline_plot(r: dict, path: Path) -> None:
    plt = _pyplot()
    names = list(r["tokens_per_s"])
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.bar([n.replace(" ", "\n") for n in names], [r["tokens_per_s"][n] for n in names],
           color=["tab:orange" if "mlx" in n else "tab:blue" for n in names])
    ax.set_ylabel("decode tokens/s (one stream)")
    ax.set_title(f"split {r['split'][0]} | {r['split'][1]}, {r['dtype']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_outputs(out: Path, name: str, data, table: str, plot) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.json", out / f"{name}.md", out / f"{name}.png"]
    paths[0].write_text(json.dumps(data, indent=1))
    paths[1].write_text(table)
    plot(data, paths[2])
    return paths


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


if __name__ == "__main__":  # the workers: python -m engine.bench_suites stage|pipeline-worker ARGS
    if sys.argv[1] == "pipeline-worker":
        pipeline_worker(*sys.argv[2:])
    else:
        _, _, backend, model, first, last, dtype, prompt_len, tokens = sys.argv
        print(json.dumps(time_stage(backend, model, int(first), int(last), dtype, int(prompt_len), int(tokens))))
