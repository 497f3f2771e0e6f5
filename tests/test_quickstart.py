"""The README's quickstart, run as written with SmolLM2 on loopback: the Hub is the stand-in
(`hub_server.py`, through HF_ENDPOINT) serving the fetched SmolLM2 under a Hub id; the Mac's MLX
daemon and the NVIDIA box's torch daemon are two processes with homes of their own, started without
`--model`; the coordinator fetches the model and sends each its layers' weights. Only the `pip
install` lines are left out (this venv is the install), and the hosts, ports and model name are
swapped for loopback's and SmolLM2's."""

from __future__ import annotations

import json
import os
import re
import selectors
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from engine.core.config import ModelConfig
from engine.core.weights import checkpoint_files, stage_tensor_names
from hub_server import HubServer
from stage_home import held_tensors, stage_home

ROOT = Path(__file__).resolve().parent.parent
REPO = "HuggingFaceTB/SmolLM2-135M-Instruct"


def quickstart_lines() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Quickstart"):]
    block = re.search(r"```sh\n(.*?)```", section, re.S).group(1)
    return [line for line in block.replace("\\\n", " ").splitlines() if line.strip() and not line.startswith("#")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def on_loopback(line: str, ports: dict) -> str:
    if "--backend mlx" in line:
        line = line.replace("tcp://0.0.0.0:5555", f"tcp://127.0.0.1:{ports['mac']}")
    if "--backend torch" in line:
        line = line.replace("tcp://0.0.0.0:5555", f"tcp://127.0.0.1:{ports['nvidia']}")
    line = line.replace("mac.local:5555", f"127.0.0.1:{ports['mac']}")
    line = line.replace("nvidia.local:5555", f"127.0.0.1:{ports['nvidia']}")
    line = line.replace("--port 8000", f"--port {ports['http']}")
    line = line.replace("localhost:8000", f"127.0.0.1:{ports['http']}")
    return re.sub(r"^M=\S+", f"M={REPO}", line)


def start(line: str, env: dict, cwd: Path, ready: str, log: Path, assigned: str = "") -> subprocess.Popen:
    proc = subprocess.Popen(["bash", "-c", f"{assigned}exec {line}"], stdout=subprocess.PIPE, stderr=log.open("w"),
                            text=True, env=env, cwd=cwd, start_new_session=True)
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"{line!r} exited: {log.read_text()[-2000:]}"
        if sel.select(timeout=0.5) and proc.stdout.readline().startswith(ready):
            return proc
    raise AssertionError(f"{line!r} was not ready: {log.read_text()[-2000:]}")


def test_the_readme_quickstart_runs_on_loopback(real_model, tmp_path):
    hub_root = tmp_path / "hub"
    (hub_root / REPO).mkdir(parents=True)
    for f in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors"):
        (hub_root / REPO / f).symlink_to(real_model / f)
    hub = HubServer(hub_root)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "hetpipe").write_text(f'#!/bin/sh\nexec {sys.executable} -m engine.app.cli "$@"\n')
    (bin_dir / "hetpipe").chmod(0o755)
    base = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHONPATH": str(ROOT), "HF_ENDPOINT": hub.url}
    homes = {"mac": stage_home(tmp_path / "mac"), "nvidia": stage_home(tmp_path / "nvidia")}
    ports = {k: free_port() for k in ("mac", "nvidia", "http")}
    work = tmp_path / "work"
    work.mkdir()
    coordinator = {**base, "HF_HOME": str(tmp_path / "hf"), "HETPIPE_HOME": str(tmp_path / "coordinator")}
    procs, assigned, out = [], "", {}
    try:
        for line in quickstart_lines():
            if line.startswith("pip install"):
                continue
            line = on_loopback(line, ports)
            if re.match(r"^\w+=", line):
                assigned += line.split("#")[0] + "; "  # shell variables for the lines after
                continue
            if " stage " in line:
                machine = "mac" if "--backend mlx" in line else "nvidia"
                assert "--model" not in line
                env = {**base, "HETPIPE_HOME": str(homes[machine])}
                procs.append(start(line, env, work, "ready ", tmp_path / f"{machine}.log"))
            elif " serve " in line:
                procs.append(start(line, coordinator, work, "serving ", tmp_path / "serve.log", assigned))
            else:
                r = subprocess.run(["bash", "-c", assigned + line], capture_output=True, text=True, env=coordinator,
                                   cwd=work, timeout=300)
                assert r.returncode == 0, f"{line!r}: {r.stderr[-2000:]}"
                out[line.split()[1] if line.startswith("hetpipe") else line.split()[0]] = r.stdout
        assert set(out) == {"keys", "fetch", "plan", "curl"} and len(procs) == 3
        reply = json.loads(out["curl"])
        assert "choices" in reply, reply
        assert reply["choices"][0]["message"]["content"] and reply["usage"]["completion_tokens"] <= 32
        assert f"127.0.0.1:{ports['mac']}" in out["plan"] and f"127.0.0.1:{ports['nvidia']}" in out["plan"]
        served = (tmp_path / "serve.log").read_text()
        assert len(re.findall(r"delivered [\d.]+ MB of layers", served)) == 2, served
        # each machine holds its own layers' tensors, and together they hold the model
        cfg = ModelConfig.load(real_model)
        names = list(checkpoint_files(real_model))
        held = {m: held_tensors(h) for m, h in homes.items()}
        for m in held:
            where = re.search(rf"layers (\d+)-(\d+) to tcp://127\.0\.0\.1:{ports[m]}\b", served)
            first, last = map(int, where.groups())
            assert held[m] == set(stage_tensor_names(cfg, names, first, last))
        assert held["mac"] | held["nvidia"] == set(names)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, 15)
        for p in procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, 9)
        hub.close()
        shutil.rmtree(tmp_path / "hf", ignore_errors=True)
