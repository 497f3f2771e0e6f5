"""Liveness: the coordinator's `Heartbeat` watch over its stages, and `health` (a real forward).

Each daemon answers heartbeats from a socket and thread of its own (`daemon.py`), so a stage busy
with a long batch still answers within milliseconds; a stage silent for DEAD_AFTER_S is killed,
stopped or cut off, and the serving engine starts a recovery.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import zmq

from . import protocol as P
from .auth import Auth
from .wire import pack


class Heartbeat:
    """Pings each stage's heartbeat socket (answered by a thread of its own, even mid-batch) and
    names the stages silent for DEAD_AFTER_S: killed, stopped, or cut off."""

    def __init__(self, client):  # a transport.client.Client: its context and keys
        self.client = client
        self.socks: dict[str, zmq.Socket] = {}  # stage address -> DEALER to its heartbeat socket
        self.last_seen: dict[str, float] = {}
        self.last_sent = 0.0

    def watch(self, stage) -> None:  # a RemoteStage
        self.unwatch(stage.address)
        s = self.client.ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        if self.client.auth:
            self.client.auth.connect(s)
        s.connect(stage.remote["heartbeat"])
        self.socks[stage.address] = s
        self.last_seen[stage.address] = time.monotonic()

    def unwatch(self, address: str) -> None:
        s = self.socks.pop(address, None)
        if s is not None:
            s.close(0)
        self.last_seen.pop(address, None)

    def lost(self) -> list[str]:
        now = time.monotonic()
        for address, s in self.socks.items():
            while s.poll(0):
                s.recv_multipart()
                self.last_seen[address] = now
        if now - self.last_sent >= P.HEARTBEAT_S:
            if now - self.last_sent > P.DEAD_AFTER_S:  # we were not looking (idle): no one is late
                self.last_seen = dict.fromkeys(self.socks, now)
            for s in self.socks.values():
                try:
                    s.send_multipart(pack(P.PING, req=0), flags=zmq.NOBLOCK)
                except zmq.Again:
                    pass
            self.last_sent = now
        return [a for a, t in self.last_seen.items() if now - t > P.DEAD_AFTER_S]

    def close(self) -> None:
        for address in list(self.socks):
            self.unwatch(address)


def health(addresses: Sequence[str], auth: Auth | None = None, timeout_s: float = 5.0) -> list[dict]:
    """Each stage's state after a real one-token forward: ok, idle (no layers), or down (why)."""
    from .client import Client, StageError

    client = Client(timeout_s, auth)
    out = []
    try:
        for address in addresses:
            try:
                info = client.call(address, P.HEALTH, timeout_s=timeout_s)["info"]
            except StageError as e:
                out.append({"address": address, "state": "down", "error": str(e)})
                continue
            out.append({"address": address, "state": "ok" if info["layers"] else "idle",
                        "backend": info["backend"], "device": info["device"], "dtype": info["dtype"],
                        "layers": info["layers"], "live_sequences": len(info["live_sequences"]),
                        "kv_tokens_used": info["kv_tokens_used"], "kv_tokens": info["kv_tokens"],
                        "forward_ms": info["forward_ms"], "draining": info["draining"]})
    finally:
        client.close()
    return out
