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

from engine.errors import StageFailure, UserError
from engine.partition import check_coverage
from engine.stage import SampledToken, StageBatch, StageInfo, StageResult

from . import protocol as P
from .wire import pack, pack_batch, unpack, unpack_result


class StageError(StageFailure):
    """A stage answered with an error, or did not answer in time."""


class Client:
    """Sockets to a set of stages, one request at a time per caller."""

    def __init__(self, timeout_s: float = P.REPLY_TIMEOUT_S):
        self.ctx = zmq.Context.instance()
        self.id = f"c-{uuid.uuid4().hex[:12]}"
        self.socks: dict[str, zmq.Socket] = {}
        self.timeout_s = timeout_s
        self._req = itertools.count(1)

    def sock(self, address: str) -> zmq.Socket:
        s = self.socks.get(address)
        if s is None:
            s = self.ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.ROUTING_ID, self.id.encode())
            s.setsockopt(zmq.LINGER, 0)
            s.connect(address)
            self.socks[address] = s
        return s

    def send(self, address: str, frames) -> None:
        self.sock(address).send_multipart(frames, copy=False)

    def wait(self, address: str, req: int, timeout_s: float | None = None) -> tuple[dict, list]:
        """The reply to request `req` from `address`; an error from any stage raises."""
        deadline = time.monotonic() + (timeout_s or self.timeout_s)
        poller = zmq.Poller()
        for s in self.socks.values():
            poller.register(s, zmq.POLLIN)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise StageError(f"stage {address} did not answer within {timeout_s or self.timeout_s:.0f} s")
            for s, _ in poller.poll(int(left * 1000) + 1):
                header, arrays = unpack(s.recv_multipart(copy=False))
                if header.get("req") != req:
                    continue  # a late answer to a request already given up on
                if header["kind"] == P.ERROR:
                    raise StageError(f"stage {header.get('stage', address)}: {header.get('message')}")
                return header, arrays

    def next_req(self) -> int:
        return next(self._req)

    def call(self, address: str, kind: str, timeout_s: float | None = None, **fields) -> dict:
        req = self.next_req()
        self.send(address, pack(kind, req=req, **fields))
        return self.wait(address, req, timeout_s)[0]

    def close(self) -> None:
        for s in self.socks.values():
            s.close(0)
        self.socks.clear()


class RemoteStage:
    """A stage daemon seen through the `Stage` protocol: interchangeable with an in-process one."""

    def __init__(self, client: Client, address: str, identity: dict):
        self.client, self.address = client, address
        try:
            self.remote = client.call(address, P.HELLO, timeout_s=min(client.timeout_s, 30), identity=identity)["info"]
        except StageError as e:
            raise UserError(str(e)) from None
        self.info = self._stage_info()

    def _stage_info(self) -> StageInfo | None:
        r = self.remote
        if r["layers"] is None:
            return None
        return StageInfo(r["backend"], r["device"], r["dtype"], r["layers"][0], r["layers"][1], r["num_layers"])

    def load(self, first: int, last: int) -> None:
        try:
            reply = self.client.call(self.address, P.LOAD, timeout_s=P.LOAD_TIMEOUT_S, layers=[first, last])
            self.remote = reply["info"]
        except StageError as e:
            raise UserError(str(e)) from None
        self.info = self._stage_info()

    def forward(self, batch: StageBatch, route: Sequence[str] = ()) -> StageResult:
        req = self.client.next_req()
        self.client.send(self.address, pack_batch(batch, req=req, client=self.client.id, route=list(route)))
        header, arrays = self.client.wait(route[-1] if route else self.address, req)
        self.last_timings = header.get("timings", [])
        return unpack_result(header, arrays)

    def release(self, seq_ids: Sequence[int]) -> None:
        self.client.call(self.address, P.RELEASE, seq_ids=list(seq_ids))

    def live_sequences(self) -> list[int]:
        self.remote = self.client.call(self.address, P.PING)["info"]
        return self.remote["live_sequences"]

    def close(self) -> None:
        pass  # the daemon keeps running; the client owns the sockets


class RemotePipeline:
    """Stage daemons in pipeline order; same interface as the in-process `Pipeline`."""

    def __init__(self, stages: list[RemoteStage]):
        check_coverage([(s.info.first, s.info.last) for s in stages], stages[0].info.num_layers)
        self.stages = stages
        self.route = [s.address for s in stages[1:]]
        self.compute_ms: dict[str, float] = {s.address: 0.0 for s in stages}
        self.calls = 0

    def forward(self, batch: StageBatch) -> list[SampledToken]:
        result = self.stages[0].forward(batch, route=self.route)
        for address, ms in self.stages[0].last_timings:
            self.compute_ms[address] = self.compute_ms.get(address, 0.0) + ms
        self.calls += 1
        return result.tokens

    def release(self, seq_ids: Sequence[int]) -> None:
        for s in self.stages:
            s.release(seq_ids)

    def describe(self) -> list[dict]:
        return [{**s.info.describe(), "address": s.address} for s in self.stages]

    def close(self) -> None:
        self.stages[0].client.close()


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
                     log=print) -> RemotePipeline:
    """Say hello to every stage (identity check), assign layers (given, or planned), return the pipeline."""
    from engine.identity import config_hash, weights_hash
    from engine.planner import StageCapacity, plan_layers

    entries = parse_stages_spec(spec)
    identity = {"config": config_hash(model_dir), "weights": weights_hash(model_dir)}
    client = Client(timeout_s)
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
    return RemotePipeline(stages)
