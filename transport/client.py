"""The coordinator's sockets (`Client`) and `RemoteStage`, the `Stage` protocol over ZeroMQ.

The coordinator opens one DEALER per stage, its routing id naming this client, so the stage
that ends a route can answer it directly (`remote_pipeline.py` sends batches along routes).
"""

from __future__ import annotations

import itertools
import os
import time
import uuid
from collections.abc import Sequence

import zmq
from zmq.utils.monitor import recv_monitor_message

from engine.core.errors import HetpipeError, StageFailure, rebuild
from engine.core.stage import StageBatch, StageReport, StageResult

from . import protocol as P
from .auth import Auth
from .wire import WireError, pack, pack_batch, peek_envelope, unpack, unpack_report, unpack_result


class StageError(StageFailure):
    """A stage answered with an error, or did not answer in time."""


class Client:
    """Sockets to a set of stages. Replies are matched to requests by `req`.

    `wait` blocks for one reply (control calls); `expect` + `poll` collect the replies of requests
    left running (micro-batches in flight). A reply to a request nobody waits for any more is dropped.
    """

    def __init__(self, timeout_s: float = P.REPLY_TIMEOUT_S, auth: Auth | None = None):
        self.ctx = zmq.Context.instance()
        self.id = f"c-{uuid.uuid4().hex[:12]}"
        self.auth = auth
        self.socks: dict[str, zmq.Socket] = {}
        self._monitors: dict[str, zmq.Socket] = {}
        self.timeout_s = timeout_s
        self._req = itertools.count(1)
        self._expected: set[int] = set()
        self._mail: dict[int, tuple[dict, list]] = {}
        self._poller = zmq.Poller()
        # `wake()` from another thread ends a wait in `poll` at once: one end of a pipe is polled too
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._poller.register(self._wake_r, zmq.POLLIN)

    def sock(self, address: str) -> zmq.Socket:
        s = self.socks.get(address)
        if s is None:
            s = self.ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.ROUTING_ID, self.id.encode())
            s.setsockopt(zmq.LINGER, 0)
            if self.auth:
                self.auth.connect(s)
            # handshake failures (a key not allowed, CURVE on one side only) show up on a monitor
            self._monitors[address] = s.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_AUTH
                                                           | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                                                           | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
            s.connect(address)
            self.socks[address] = s
            self._poller.register(s, zmq.POLLIN)
        return s

    def refused(self, address: str) -> str | None:
        """Why the stage at `address` refused our handshake, if it did."""
        mon = self._monitors.get(address)
        if mon is None:
            return None
        while mon.poll(0):
            event = recv_monitor_message(mon)["event"]
            if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                return "it did not accept our key (authentication failed; check the keys)"
            return "the handshake failed (are keys given on one side only?)"
        return None

    def reset(self, address: str) -> None:
        """Drop the socket to `address` and whatever it still queues; the next send reconnects."""
        s = self.socks.pop(address, None)
        if s is not None:
            self._poller.unregister(s)
            s.disable_monitor()
            s.close(0)
        mon = self._monitors.pop(address, None)
        if mon is not None:
            mon.close(0)

    def send(self, address: str, frames) -> None:
        self.sock(address).send_multipart(frames, copy=False)

    def expect(self, req: int) -> None:
        """Keep the reply to `req` when it comes, for `poll` or `wait`."""
        self._expected.add(req)

    def forget(self, req: int) -> None:
        self._expected.discard(req)
        self._mail.pop(req, None)

    def wake(self) -> None:
        """End a wait in `poll` now (thread-safe)."""
        fd = self._wake_w
        if fd is None:
            return  # closed: nobody waits
        try:
            os.write(fd, b"w")
        except OSError:  # full of wake-ups already, or closed meanwhile
            pass

    def _receive(self, timeout_s: float) -> None:
        """Read what arrives within `timeout_s` (then what is already queued) into the mailbox."""
        for s, _ in self._poller.poll(max(0, int(timeout_s * 1000))):
            if not isinstance(s, zmq.Socket):
                try:
                    while os.read(self._wake_r, 4096):
                        pass
                except OSError:  # drained
                    pass
                continue
            while True:
                try:
                    frames = s.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                try:
                    header, arrays = unpack(frames)
                except WireError as e:  # a reply we cannot read fails its request now, not at its timeout
                    req, _ = peek_envelope(frames[0]) if frames else (None, None)
                    header, arrays = {"kind": P.ERROR, "req": req, "message": f"unreadable reply: {e}"}, []
                req = header.get("req")
                if req in self._expected:
                    self._mail[req] = (header, arrays)

    def poll(self, timeout_s: float) -> dict[int, tuple[dict, list]]:
        """Replies (or errors) to expected requests that have arrived, waiting up to `timeout_s` for one."""
        # one wait drains every socket that is readable; what arrives later is read by the next poll
        self._receive(0 if self._mail else timeout_s)
        out, self._mail = self._mail, {}
        self._expected.difference_update(out)
        return out

    def wait(self, address: str, req: int, timeout_s: float | None = None) -> tuple[dict, list]:
        """The reply to request `req` from `address`; an error from any stage raises."""
        timeout_s = timeout_s or self.timeout_s
        deadline = time.monotonic() + timeout_s
        self.expect(req)
        try:
            while req not in self._mail:
                left = deadline - time.monotonic()
                why = self.refused(address)
                if why:
                    raise StageError(f"stage {address} refused the connection: {why}")
                if left <= 0:
                    raise StageError(f"stage {address} did not answer within {timeout_s:.0f} s")
                self._receive(min(left, 0.25))
            header, arrays = self._mail.pop(req)
        finally:
            self.forget(req)
        raise_if_error(header, address)
        return header, arrays

    def next_req(self) -> int:
        return next(self._req)

    def call(self, address: str, kind: str, timeout_s: float | None = None, **fields) -> dict:
        req = self.next_req()
        self.send(address, pack(kind, req=req, **fields))
        return self.wait(address, req, timeout_s)[0]

    def close(self) -> None:
        for address in list(self.socks):
            self.reset(address)
        if self._wake_r is not None:
            self._poller.unregister(self._wake_r)
            os.close(self._wake_r)
            os.close(self._wake_w)
            self._wake_r = self._wake_w = None


def raise_if_error(header: dict, address: str) -> None:
    """An ERROR reply raised as the type its `error` kind names (`errors.rebuild`): a lost stage, or
    one without a kind, as `StageError`."""
    if header.get("kind") == P.ERROR:
        raise rebuild(header.get("error"), f"stage {header.get('stage', address)}: {header.get('message')}",
                      lost=StageError)


class RemoteStage:
    """A stage daemon seen through the `Stage` protocol: interchangeable with an in-process one.

    Saying hello checks the model identity; `report` is what the daemon said about itself last.
    """

    def __init__(self, client: Client, address: str, identity: dict, timeout_s: float = P.HELLO_TIMEOUT_S):
        self.client, self.address = client, address
        self.report = self._call(P.HELLO, min(client.timeout_s, timeout_s), identity=identity)
        self.info = self.report.info  # None until it holds layers

    def _call(self, kind: str, timeout_s: float | None = None, **fields) -> StageReport:
        try:
            return unpack_report(self.client.call(self.address, kind, timeout_s, **fields).get("info"))
        except WireError as e:
            raise StageError(f"stage {self.address} sent a bad report: {e}") from None

    def load(self, first: int, last: int, next_hop: str | None = None, timeout_s: float = P.LOAD_TIMEOUT_S) -> None:
        """Give the daemon layers [first, last] and the address of the stage after it (None: it is
        the last), the only one it will pass hidden rows to; it loads and warms them up before it answers."""
        self.report = self._call(P.LOAD, timeout_s, layers=[first, last], next_hop=next_hop)
        self.info = self.report.info

    def refresh(self) -> StageReport:
        self.report = self._call(P.PING)
        return self.report

    def forward(self, batch: StageBatch) -> StageResult:
        """This stage alone: its hidden rows (or sampled tokens) come back here."""
        req = self.client.next_req()
        self.client.send(self.address, pack_batch(batch, req=req, client=self.client.id, route=[]))
        return unpack_result(*self.client.wait(self.address, req))

    def release(self, seq_ids: Sequence[int]) -> None:
        self.client.call(self.address, P.RELEASE, seq_ids=list(seq_ids))

    def live_sequences(self) -> list[int]:
        return self.refresh().live_sequences

    def kv_tokens_used(self) -> int:
        return self.refresh().kv_tokens_used

    def kv_tokens_cached(self) -> int:
        return self.refresh().kv_tokens_cached

    def close(self) -> None:
        pass  # the daemon keeps running; the client owns the sockets


def health_reports(addresses: Sequence[str], auth: Auth | None = None, timeout_s: float = 5.0,
                   kind: str = P.HEALTH, **fields) -> list[StageReport | HetpipeError]:
    """Each stage's report after a real one-token forward through its layers (`kind` PING: without
    one; to a heartbeat socket, with `report=True`: at once, even from a stage busy computing), or
    why it gave none. On sockets of its own: safe beside a pipeline serving on another thread."""
    client = Client(timeout_s, auth)
    out: list[StageReport | HetpipeError] = []
    try:
        for address in addresses:
            try:
                out.append(unpack_report(client.call(address, kind, timeout_s=timeout_s, **fields).get("info")))
            except HetpipeError as e:
                out.append(e)
            except WireError as e:
                out.append(StageError(f"stage {address} sent a bad report: {e}"))
    finally:
        client.close()
    return out
