"""The coordinator's side: `RemoteStage` (the `Stage` protocol over ZeroMQ) and `RemotePipeline`.

The coordinator opens one DEALER per stage, its routing id naming this client, so the stage
that ends a route can answer it directly. A pipeline forward goes to the first stage with the
other stages' addresses as its route; hidden rows pass stage to stage, never through here.
"""

from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import Sequence

import zmq
from zmq.utils.monitor import recv_monitor_message

from engine.errors import StageFailure, UserError
from engine.partition import check_coverage
from engine.pipeline import BatchTiming
from engine.stage import SampledToken, StageBatch, StageInfo, StageResult

from . import protocol as P
from .auth import Auth
from .health import Heartbeat
from .wire import WireError, pack, pack_batch, unpack, unpack_result


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
                return "it did not accept our key (authentication failed; check --auth)"
            return "the handshake failed (is --auth given on one side only?)"
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

    def wake_on(self, fd: int) -> None:
        """Also end a wait in `poll` when `fd` becomes readable (the serving engine's new-work signal)."""
        self._poller.register(fd, zmq.POLLIN)

    def unwake(self, fd: int) -> None:
        try:
            self._poller.unregister(fd)
        except KeyError:
            pass

    def _receive(self, timeout_s: float) -> None:
        """Read what arrives within `timeout_s` (then what is already queued) into the mailbox."""
        for s, _ in self._poller.poll(max(0, int(timeout_s * 1000))):
            if not isinstance(s, zmq.Socket):
                continue  # the wake-up descriptor: its owner drains it
            while True:
                try:
                    frames = s.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                try:
                    header, arrays = unpack(frames)
                except WireError:
                    continue  # not a reply we can read: the request it answers times out
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


def raise_if_error(header: dict, address: str) -> None:
    if header.get("kind") == P.ERROR:
        raise StageError(f"stage {header.get('stage', address)}: {header.get('message')}")


class RemoteStage:
    """A stage daemon seen through the `Stage` protocol: interchangeable with an in-process one."""

    def __init__(self, client: Client, address: str, identity: dict, hello_timeout_s: float = 30.0):
        self.client, self.address = client, address
        try:
            self.remote = client.call(address, P.HELLO, timeout_s=min(client.timeout_s, hello_timeout_s),
                                      identity=identity)["info"]
        except StageError as e:
            raise UserError(str(e)) from None
        self.info = self._stage_info()

    def _stage_info(self) -> StageInfo | None:
        r = self.remote
        if r["layers"] is None:
            return None
        return StageInfo(r["backend"], r["device"], r["dtype"], r["layers"][0], r["layers"][1], r["num_layers"],
                         r["kv_tokens"])

    def load(self, first: int, last: int) -> None:
        try:
            reply = self.client.call(self.address, P.LOAD, timeout_s=P.LOAD_TIMEOUT_S, layers=[first, last])
            self.remote = reply["info"]
        except StageError as e:
            raise UserError(str(e)) from None
        self.info = self._stage_info()

    def forward(self, batch: StageBatch) -> StageResult:
        """This stage alone (its hidden rows come back here)."""
        req = self.client.next_req()
        self.client.send(self.address, pack_batch(batch, req=req, client=self.client.id, route=[]))
        return unpack_result(*self.client.wait(self.address, req))

    def kv_tokens_used(self) -> int:
        self.remote = self.client.call(self.address, P.PING)["info"]
        return self.remote["kv_tokens_used"]

    def release(self, seq_ids: Sequence[int], wait: bool = True) -> None:
        if wait:
            self.client.call(self.address, P.RELEASE, seq_ids=list(seq_ids))
        else:
            self.client.send(self.address, pack(P.RELEASE, req=self.client.next_req(), seq_ids=list(seq_ids)))

    def live_sequences(self) -> list[int]:
        self.remote = self.client.call(self.address, P.PING)["info"]
        return self.remote["live_sequences"]

    def close(self) -> None:
        pass  # the daemon keeps running; the client owns the sockets


class RemotePipeline:
    """Stage daemons in pipeline order; same interface as the in-process `Pipeline`.

    A batch goes to the first stage with the others' addresses as its route; the last stage
    answers here. Several batches may be in flight at once: the daemons work on different ones.
    A lost stage is replaced by `recover` (the same address once it is back, or a standby).
    """

    def __init__(self, stages: list[RemoteStage], identity: dict | None = None, standby: Sequence[str] = (),
                 recovery_timeout_s: float = 30.0):
        check_coverage([(s.info.first, s.info.last) for s in stages], stages[0].info.num_layers)
        self.stages = stages
        self.client = stages[0].client
        self.identity = identity or {}
        self.standby = list(standby)
        self.recovery_timeout_s = recovery_timeout_s
        self.route = [s.address for s in stages[1:]]
        self._flying: dict[int, tuple[object, float]] = {}  # req -> (tag, deadline)
        self.heartbeat = Heartbeat(self.client)
        for s in stages:
            self.heartbeat.watch(s)

    overlaps = True  # `submit` returns at once: the coordinator works while the stages compute

    @property
    def max_inflight(self) -> int:
        return 4 * len(self.stages)

    def wake_on(self, fd: int) -> None:
        self.client.wake_on(fd)

    def unwake(self, fd: int) -> None:
        self.client.unwake(fd)

    def submit(self, tag, batch: StageBatch) -> None:
        req = self.client.next_req()
        self.client.expect(req)
        self.client.send(self.stages[0].address,
                         pack_batch(batch, req=req, client=self.client.id, route=self.route))
        self._flying[req] = (tag, time.monotonic())

    def poll(self, timeout_s: float) -> list[tuple[object, list[SampledToken] | Exception, BatchTiming | None]]:
        out = []
        for req, (header, arrays) in self.client.poll(timeout_s).items():
            tag, sent = self._flying.pop(req)
            try:
                raise_if_error(header, self.stages[-1].address)
                result = unpack_result(header, arrays)
            except Exception as e:
                out.append((tag, e, None))
                continue
            by_stage = {}
            for address, ms in header.get("timings", []):
                by_stage[address] = by_stage.get(address, 0.0) + ms
            timing = BatchTiming([by_stage.get(s.address, 0.0) for s in self.stages], (time.monotonic() - sent) * 1000)
            out.append((tag, result.tokens, timing))
        now = time.monotonic()
        for req, (tag, sent) in list(self._flying.items()):
            if now - sent > self.client.timeout_s:
                del self._flying[req]
                self.client.forget(req)
                out.append((tag, StageError(f"the pipeline did not answer within {self.client.timeout_s:.0f} s"),
                            None))
        return out

    def forward(self, batch: StageBatch) -> list[SampledToken]:
        tag = object()
        self.submit(tag, batch)
        while True:
            for t, out, _ in self.poll(1.0):
                if t is tag:
                    if isinstance(out, Exception):
                        raise out
                    return out

    def release(self, seq_ids: Sequence[int]) -> None:
        """Tell every stage to free these sequences; no reply awaited (a later ping sees it done)."""
        for s in self.stages:
            s.release(seq_ids, wait=False)

    def kv_tokens(self) -> int:
        return min(s.info.kv_tokens for s in self.stages)

    def lost(self) -> list[int]:
        """Indices of stages whose heartbeat went silent."""
        gone = set(self.heartbeat.lost())
        return [i for i, s in enumerate(self.stages) if s.address in gone]

    def unhealthy(self) -> list[int]:
        """Indices of stages that do not answer a ping at once, or no longer hold their layers."""
        out = []
        for i, s in enumerate(self.stages):
            try:
                info = self.client.call(s.address, P.PING, timeout_s=P.DEAD_AFTER_S)["info"]
                if info["layers"] != [s.info.first, s.info.last]:
                    out.append(i)
            except StageError:
                out.append(i)
        return out

    def recover(self, lost: list[int], live_seq_ids: list[int], log=print) -> list[str]:
        """Replace the lost stages and free every live sequence everywhere, so callers rebuild them.

        Waits up to `recovery_timeout_s` for a stage at each lost address, or an unused standby, to
        say hello; loads it with the lost layer range. Returns the addresses now serving; raises
        StageFailure if capacity did not come back in time.
        """
        for req in self._flying:
            self.client.forget(req)
        self._flying.clear()
        deadline = time.monotonic() + self.recovery_timeout_s
        todo = list(lost)
        for i in todo:
            self.client.reset(self.stages[i].address)  # drop what was queued for the old process
            self.heartbeat.unwatch(self.stages[i].address)
        while todo:
            for i in list(todo):
                old = self.stages[i]
                in_use = {s.address for s in self.stages}
                for address in [old.address] + [a for a in self.standby if a not in in_use]:
                    try:
                        new = RemoteStage(self.client, address, self.identity, hello_timeout_s=1.0)
                        new.load(old.info.first, old.info.last)
                    except (UserError, StageError):
                        self.client.reset(address)
                        continue
                    log(f"recovered: layers {old.info.first}-{old.info.last} on {address}")
                    self.stages[i] = new
                    self.heartbeat.watch(new)
                    todo.remove(i)
                    break
            if todo:
                time.sleep(0.2)
            if todo and time.monotonic() > deadline:
                lost_text = ", ".join(f"{self.stages[i].address} (layers {self.stages[i].info.first}-"
                                      f"{self.stages[i].info.last})" for i in todo)
                raise StageError(f"lost {lost_text}; no stage took its place within {self.recovery_timeout_s:.0f} s")
        self.route = [s.address for s in self.stages[1:]]
        for s in self.stages:
            s.release(live_seq_ids)  # survivors drop what they held; the caller re-prefills from token ids
        return [s.address for s in self.stages]

    def describe(self) -> list[dict]:
        return [{**s.info.describe(), "address": s.address} for s in self.stages]

    def close(self) -> None:
        self.heartbeat.close()
        self.client.close()


def parse_stages_spec(spec: str) -> list[tuple[str, tuple[int, int] | None]]:
    """`tcp://a:5555=0-14,tcp://b:5555=15-29`, or addresses alone for the planner to split."""
    out = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        address, _, rng = item.partition("=")
        if "://" not in address:
            raise UserError(f"stage address {address!r} needs a scheme, like tcp://host:port or ipc:///path")
        layers = None
        if rng:
            try:
                a, _, b = rng.partition("-")
                layers = (int(a), int(b if b else a))
            except ValueError:
                raise UserError(f"bad layer range {rng!r} for {address} (want FIRST-LAST)") from None
        out.append((address, layers))
    if not out:
        raise UserError("empty --stages")
    given = [layers is not None for _, layers in out]
    if any(given) and not all(given):
        raise UserError("--stages: give a range for every stage or for none")
    return out


def connect_pipeline(model_dir: str, spec: str, num_layers: int, timeout_s: float = P.REPLY_TIMEOUT_S,
                     log=print, auth: Auth | None = None, standby: Sequence[str] = (),
                     recovery_timeout_s: float = 30.0) -> RemotePipeline:
    """Say hello to every stage (identity check), assign layers (given, or planned), return the pipeline."""
    from engine.identity import config_hash, weights_hash
    from engine.planner import StageCapacity, plan_layers

    entries = parse_stages_spec(spec)
    identity = {"config": config_hash(model_dir), "weights": weights_hash(model_dir)}
    client = Client(timeout_s, auth)
    stages = [RemoteStage(client, address, identity) for address, _ in entries]
    if entries[0][1] is not None:
        ranges = [layers for _, layers in entries]
        check_coverage(ranges, num_layers)
    else:
        caps = [StageCapacity(s.address, s.remote["ms_per_layer"],
                              int(0.8 * s.remote["free_memory"] // max(s.remote["layer_bytes"], 1)),
                              s.remote["head_ms"])
                for s in stages]
        plan = plan_layers(caps, num_layers)
        log(plan.describe(caps))
        ranges = plan.ranges
    for s, (first, last) in zip(stages, ranges):
        s.load(first, last)
    for address in standby:
        if "://" not in address:
            raise UserError(f"standby address {address!r} needs a scheme, like tcp://host:port")
    return RemotePipeline(stages, identity, standby, recovery_timeout_s)
