"""Liveness: the coordinator's watch over the heartbeat sockets of its stages.

Each daemon answers heartbeats from a socket and thread of its own (`daemon.py`), so a stage busy
with a long batch still answers within milliseconds; a stage silent for DEAD_AFTER_S is killed,
stopped or cut off.
"""

from __future__ import annotations

import time

import zmq

from . import protocol as P
from .auth import Auth
from .wire import pack


class Heartbeat:
    """Pings each stage's heartbeat socket and names the stages silent for DEAD_AFTER_S."""

    def __init__(self, ctx: zmq.Context, auth: Auth | None = None):
        self.ctx, self.auth = ctx, auth
        self.socks: dict[str, zmq.Socket] = {}  # stage address -> DEALER to its heartbeat socket
        self.last_seen: dict[str, float] = {}
        self.last_sent = 0.0

    def watch(self, address: str, heartbeat: str) -> None:
        """Watch the stage at `address`, whose heartbeat socket is at `heartbeat`."""
        self.unwatch(address)
        s = self.ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        if self.auth:
            self.auth.connect(s)
        s.connect(heartbeat)
        self.socks[address] = s
        self.last_seen[address] = time.monotonic()

    def unwatch(self, address: str) -> None:
        s = self.socks.pop(address, None)
        if s is not None:
            s.close(0)
        self.last_seen.pop(address, None)

    def lost(self) -> list[str]:
        """Addresses silent for DEAD_AFTER_S; sends the next round of pings when it is due."""
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
