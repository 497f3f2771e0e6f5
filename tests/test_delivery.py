"""Weights over the LAN: stage daemons started without `--model` get their layers' tensors from the
coordinator over the same ZeroMQ link, into $HETPIPE_HOME/weights/, and serve the tokens
`--local` serves; each holds its own layers only; a second start sends nothing; a chunk whose bytes
fail their hash is refused and sent again; a killed transfer resumes; without the CURVE keys a
peer gets nothing."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from stage_home import held_tensors, stage_home

from engine.api import Generator, connect_pipeline, local_pipeline
from engine.app.procs import start_stage, stop_stages
from engine.core.config import ModelConfig
from engine.core.weights import stage_tensor_names
from transport import protocol as P
from transport.auth import init_keys
from transport.client import Client
from transport.wire import pack, pack_tensor_entry

PROMPT = [1, 9690, 314, 253, 1345, 28, 504]


def daemon(home: Path, extra=()):
    """A stage daemon whose $HETPIPE_HOME is `home` (a machine of its own)."""
    stage_home(home)
    return start_stage("torch", None, env={**os.environ, "HETPIPE_HOME": str(home)}, extra=list(extra))


def held_bytes(home: Path) -> int:
    """Bytes of weight files under `home` now (a partial file may be renamed while this looks)."""
    total = 0
    for f in (home / "weights").rglob("*.safetensors*"):
        try:
            total += f.stat().st_size
        except FileNotFoundError:
            pass
    return total


def test_daemons_without_a_model_serve_what_local_serves(real_model, tmp_path):
    homes = [tmp_path / "mac", tmp_path / "linux"]
    (a, addr_a), (b, addr_b) = daemon(homes[0]), daemon(homes[1])
    logs = []
    try:
        with Generator(real_model, connect_pipeline(real_model, f"{addr_a}=0-14,{addr_b}=15-29",
                                                    log=logs.append)) as gen:
            got = gen.generate(PROMPT, max_tokens=12, ignore_eos=True).token_ids
        with Generator(real_model, local_pipeline(real_model, "torch:0-14,torch:15-29")) as gen:
            assert got == gen.generate(PROMPT, max_tokens=12, ignore_eos=True).token_ids
        assert sum("delivered" in m for m in logs) == 2
        cfg = ModelConfig.load(real_model)
        index = json.loads((real_model / "model.safetensors").read_bytes()[8:8 + int.from_bytes(
            (real_model / "model.safetensors").read_bytes()[:8], "little")])
        names = [n for n in index if n != "__metadata__"]
        for home, (first, last) in zip(homes, [(0, 14), (15, 29)]):
            assert held_tensors(home) == set(stage_tensor_names(cfg, names, first, last))
        logs.clear()  # a second coordinator: everything is held already, nothing goes over the wire
        with Generator(real_model, connect_pipeline(real_model, f"{addr_a}=0-14,{addr_b}=15-29",
                                                    log=logs.append)) as gen:
            assert gen.generate(PROMPT, max_tokens=12, ignore_eos=True).token_ids == got
        assert not any("delivered" in m for m in logs)
    finally:
        stop_stages([a, b])


def test_a_chunk_that_fails_its_hash_is_refused_and_sent_again(tiny_dirs, tmp_path):
    from engine.core.identity import config_hash, weights_hash
    from engine.core.weight_store import TensorSource, manifest
    from transport.delivery import deliver

    d = tiny_dirs["llama"]
    proc, address = daemon(tmp_path)
    client = Client(30)
    try:
        identity = {"config": config_hash(d), "weights": weights_hash(d)}
        source = TensorSource(d)
        entries = manifest(source, ModelConfig.load(d), 0, 3)
        have = client.call(address, P.MODEL, identity=identity, config=(d / "config.json").read_text(),
                           tensors=[pack_tensor_entry(e) for e in entries])["have"]
        assert have == [0] * len(entries)
        t = entries[0]
        bad = bytearray(source.chunk(t.name, 0))
        bad[len(bad) // 2] ^= 0xFF  # one bit pattern flipped on the way
        req = client.next_req()
        client.send(address, pack(P.CHUNK, [("uint8", np.frombuffer(bytes(bad), np.uint8))], req=req, name=t.name,
                                  offset=0))
        reply, _ = client.wait(address, req)
        assert reply["error"] == "chunk hash mismatch" and reply["held"] == 0
        assert deliver(client, address, d, 0, 3, identity) == sum(e.nbytes for e in entries)  # sent again, whole
        assert client.call(address, P.MODEL, identity=identity, config=(d / "config.json").read_text(),
                           tensors=[pack_tensor_entry(e) for e in entries])["have"] == [e.nbytes for e in entries]
    finally:
        client.close()
        stop_stages([proc])


def test_a_killed_transfer_resumes(real_model, tmp_path):
    home = tmp_path / "stage"
    proc, address = daemon(home)
    run = [sys.executable, "-m", "engine.app.cli", "generate", "--model", str(real_model), "--stages",
           f"{address}=0-29", "--prompt-ids", "1,2,3", "--max-tokens", "2", "--ignore-eos"]
    try:
        first = subprocess.Popen(run, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while held_bytes(home) < 150e6:
            assert time.monotonic() < deadline and first.poll() is None, "the transfer did not get going"
            time.sleep(0.02)
        first.kill()
        first.wait()
        r = subprocess.run(run, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        sent = float(re.search(r"delivered ([\d.]+) MB", r.stderr).group(1)) * 1e6
        total = (real_model / "model.safetensors").stat().st_size
        assert sent < total - 100e6  # the rest only
    finally:
        stop_stages([proc])


def test_without_the_keys_a_peer_gets_nothing(real_model, tmp_path):
    keys = tmp_path / "keys"
    init_keys(keys)
    home = tmp_path / "stage"
    proc, address = daemon(home, ["--auth", str(keys)])
    try:
        r = subprocess.run([sys.executable, "-m", "engine.app.cli", "generate", "--model", str(real_model), "--stages",
                            f"{address}=0-29", "--prompt-ids", "1,2", "--max-tokens", "2", "--timeout", "5"],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode != 0
        assert held_bytes(home) == 0
        r = subprocess.run([sys.executable, "-m", "engine.app.cli", "generate", "--model", str(real_model), "--stages",
                            f"{address}=0-29", "--prompt-ids", "1,2", "--max-tokens", "2", "--auth", str(keys)],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr  # with them, it is delivered (encrypted) and serves
    finally:
        stop_stages([proc])
