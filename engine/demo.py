"""`hetpipe demo`: SmolLM2 through an MLX stage daemon and a torch stage daemon on loopback."""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import sys
import time

from .config import ModelConfig
from .errors import UserError
from .fetch import fetch
from .generate import Generator

READY_TIMEOUT_S = 180
SHARED_CORES_ENV = {"OMP_WAIT_POLICY": "PASSIVE", "OPENBLAS_THREAD_TIMEOUT": "4"}


def start_stage(backend: str, model_dir, dtype: str = "float32", listen: str = "tcp://127.0.0.1:0",
                extra: list[str] = ()) -> tuple[subprocess.Popen, str]:
    """Start `hetpipe stage` as its own process; return it and the address from its ready line."""
    # daemons sharing this machine's cores: idle BLAS/OpenMP workers sleep instead of spinning
    # (measured: the torch daemon's step went from ~40 to ~28 ms beside an MLX daemon)
    env = {**SHARED_CORES_ENV, **os.environ}
    cmd = [sys.executable, "-m", "engine.cli", "stage", "--backend", backend, "--model", str(model_dir),
           "--listen", listen, "--dtype", dtype, *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env, start_new_session=True)
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise UserError(f"{backend} stage exited with code {proc.returncode} before it was ready")
        if sel.select(timeout=0.5):
            line = proc.stdout.readline()
            if line.startswith("ready "):
                return proc, line.split()[1]
    stop_stages([proc])
    raise UserError(f"{backend} stage was not ready within {READY_TIMEOUT_S} s")


def stop_stages(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def run_demo(prompt: str, max_tokens: int, dtype: str) -> int:
    from transport.client import connect_pipeline

    model_dir = fetch("smollm2", progress=sys.stderr.isatty())
    procs = []
    try:
        addresses = []
        for backend in ("mlx", "torch"):  # one at a time, so each calibrates on idle cores
            proc, address = start_stage(backend, model_dir, dtype)
            procs.append(proc)
            addresses.append(address)
            print(f"started {backend} stage daemon (pid {proc.pid}) at {address}", file=sys.stderr)
        pipeline = connect_pipeline(str(model_dir), ",".join(addresses), ModelConfig.load(model_dir).num_hidden_layers,
                                    log=lambda m: print(m, file=sys.stderr))
        gen = Generator(model_dir, pipeline)
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
        gen.close()
        pipeline.close()
        return 0
    finally:
        stop_stages(procs)
