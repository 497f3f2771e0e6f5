"""Weights over the LAN: a coordinator sends a stage daemon started without `--model` the tensors
of its layers, over the same ZeroMQ link (and CURVE keys) that then carries its batches.

MODEL tells the daemon the model (its identity and config) and the tensors it will get, each with
the SHA-256 of each of its 8 MiB chunks (`engine.core.weight_store.manifest`); the daemon replies how
many bytes of each it holds already, so a cut transfer resumes and a second start sends nothing.
Then CHUNKs, DELIVERY_WINDOW in flight: the daemon keeps a chunk only if its bytes match their hash,
and replies what it holds; after a refused one, the coordinator sends from there again
(DELIVERY_TRIES times at most). Chunks are views of the memory-mapped files: neither side holds the
model in memory.
"""

from __future__ import annotations

import time
from collections import deque
from pathlib import Path

import numpy as np

from engine.core.config import ModelConfig
from engine.core.errors import StageFailure
from engine.core.weight_store import CHUNK_BYTES, TensorEntry, TensorSource, manifest

from . import protocol as P
from .client import Client
from .wire import pack, pack_tensor_entry


def deliver(client: Client, address: str, model_dir: str | Path, first: int, last: int, identity: dict,
            log=None) -> int:
    """Send the daemon at `address` what it lacks of layers [first, last]; returns the bytes sent."""
    source = TensorSource(model_dir)
    entries = manifest(source, ModelConfig.load(model_dir), first, last)
    t0 = time.monotonic()
    have = client.call(address, P.MODEL, timeout_s=P.LOAD_TIMEOUT_S, identity=identity,
                       config=(Path(model_dir) / "config.json").read_text(),
                       tensors=[pack_tensor_entry(e) for e in entries])
    held = have.get("have")
    if not (isinstance(held, list) and len(held) == len(entries)):
        raise StageFailure(f"stage {address} answered MODEL without what it holds")
    sent = sum(_send_tensor(client, address, source, t, h) for t, h in zip(entries, held))
    if log and sent:
        s = time.monotonic() - t0
        log(f"delivered {sent / 1e6:.1f} MB of layers {first}-{last} to {address} in {s:.1f} s "
            f"({sent / 1e6 / max(s, 1e-9):.0f} MB/s)")
    return sent


def _send_tensor(client: Client, address: str, source: TensorSource, t: TensorEntry, held: int) -> int:
    """Chunks of one tensor from byte `held` on, DELIVERY_WINDOW in flight; the bytes sent. After a
    refused chunk, the ones in flight behind it are refused too; the last reply says what the daemon
    holds, and the next round starts there."""
    sent, rounds = 0, 0
    while held < t.nbytes:
        rounds += 1
        if rounds > P.DELIVERY_TRIES:
            raise StageFailure(f"stage {address} refused {t.name} {P.DELIVERY_TRIES} times: its bytes fail "
                               "their hash on the way")
        flying: deque[int] = deque()
        offset, failed = held, False
        while True:
            while not failed and offset < t.nbytes and len(flying) < P.DELIVERY_WINDOW:
                chunk = source.chunk(t.name, offset)
                req = client.next_req()
                client.expect(req)  # its reply may come while we wait for an earlier one's
                client.send(address, pack(P.CHUNK, [("uint8", np.frombuffer(chunk, np.uint8))], req=req, name=t.name,
                                          offset=offset))
                flying.append(req)
                offset += len(chunk)
                sent += len(chunk)
            if not flying:
                break
            try:
                reply, _ = client.wait(address, flying.popleft(), P.LOAD_TIMEOUT_S)
            except BaseException:
                for req in flying:
                    client.forget(req)
                raise
            failed = failed or bool(reply.get("error"))
            held = reply.get("held", held)
    return sent


def raw_send(address: str, source: TensorSource, entries: list[TensorEntry]) -> int:
    """The baseline `hetpipe bench delivery` reports against: the same chunks of the same tensors,
    DELIVERY_WINDOW in flight, as bare ZeroMQ frames to `transport.sink` (no header, no hash, no
    disk). Ends the sink; returns the bytes sent."""
    import zmq

    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    sent, flying = 0, 0
    try:
        for t in entries:
            for offset in range(0, t.nbytes, CHUNK_BYTES):
                if flying == P.DELIVERY_WINDOW:
                    sock.recv()
                    flying -= 1
                chunk = source.chunk(t.name, offset)
                sock.send(chunk, copy=False)
                flying += 1
                sent += len(chunk)
        for _ in range(flying):
            sock.recv()
        sock.send(b"")
        sock.recv()
    finally:
        sock.close(0)
    return sent
