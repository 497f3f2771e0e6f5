"""Stage daemons and servers as processes of their own: start one and read its ready line; stop them."""

from __future__ import annotations

import selectors
import signal
import subprocess
import sys
import time

from ..core.errors import UserError

READY_TIMEOUT_S = 180


def start_stage(backend: str, model_dir, dtype: str = "auto", listen: str = "tcp://127.0.0.1:0",
                extra: list[str] = (), env: dict | None = None) -> tuple[subprocess.Popen, str]:
    """Start `hetpipe stage` as its own process; return it and the address from its ready line.
    `model_dir` None: a daemon without a model (its coordinator sends the weights)."""
    model = [] if model_dir is None else ["--model", str(model_dir)]
    cmd = [sys.executable, "-m", "engine.app.cli", "stage", "--backend", backend, *model,
           "--listen", listen, "--dtype", dtype, *extra]
    return _start(cmd, "ready ", f"{backend} stage", env)


def start_sink() -> tuple[subprocess.Popen, str]:
    """Start `transport.sink` (drops what it gets: `bench delivery`'s raw baseline); return it and its address."""
    return _start([sys.executable, "-m", "transport.sink"], "ready ", "sink", None)


def start_server(args: list[str], env: dict | None = None) -> tuple[subprocess.Popen, str]:
    """Start `hetpipe serve ARGS` (give `--port 0` for any free port); return it and its URL."""
    return _start([sys.executable, "-m", "engine.app.cli", "serve", *args], "serving ", "server", env)


def _start(cmd: list[str], prefix: str, what: str, env: dict | None) -> tuple[subprocess.Popen, str]:
    """Run cmd and wait for its line starting with `prefix`; return the process and that line's next word."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env, start_new_session=True)
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise UserError(f"{what} exited with code {proc.returncode} before it was ready")
        if sel.select(timeout=0.5):
            line = proc.stdout.readline()
            if line.startswith(prefix):
                return proc, line.split()[1]
    stop_stages([proc])
    raise UserError(f"{what} was not ready within {READY_TIMEOUT_S} s")


def stop_stages(procs: list[subprocess.Popen]) -> None:
    """SIGTERM (a daemon drains its live sequences, then exits); SIGKILL after 10 s."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
