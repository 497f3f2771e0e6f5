"""The stage daemon: one poll loop on a ROUTER socket, dispatching on the header to `handle_*`.

A FORWARD carries its `route` (the addresses of the stages still to run) and the `client` it
came from. After computing, the daemon passes its hidden rows straight to the next stage on the
route; the stage that ends the route answers the client directly. Activations never detour
through the coordinator. Any error is answered to the client; the daemon serves on.

A daemon connects out only where it was told: to the next stage its coordinator named when it
assigned the layers (LOAD's `next_hop`), or to an address `--peers` lists. A route naming anything
else is refused, and no socket is opened for it; it holds one socket per allowed address at most.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable

import numpy as np
import zmq

from engine.core.base_stage import BaseStage, system_available_memory
from engine.core.config import ModelConfig
from engine.core.errors import CapacityError, HetpipeError, StageFailure, UserError, kind_of
from engine.core.identity import config_hash, weights_hash
from engine.core.layer_cost import calibration_layer, layer_cost, relative_costs
from engine.core.partition import check_range
from engine.core.sampling import SamplingParams
from engine.core.stage import SeqChunk, StageBatch, StageReport
from engine.core.tensors import TypedArray
from engine.core.weight_store import TensorEntry, WeightStore
from engine.core.weights import layer_bytes

from . import protocol as P
from .auth import Auth, is_loopback
from .wire import (
    SamplingMemo,
    WireError,
    forward_frames,
    pack,
    pack_report,
    pack_result,
    peek_envelope,
    unpack,
    unpack_batch,
    unpack_tensor_entry,
)

StageLoader = Callable[[str, int, int], BaseStage]  # (model dir, first, last) -> a loaded, warmed-up stage


def resident_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def bind_address(sock: zmq.Socket, listen: str) -> str:
    """Bind; port 0 picks a free port. Returns the address actually bound."""
    if listen.startswith("tcp://") and listen.rsplit(":", 1)[-1] == "0":
        listen = listen.rsplit(":", 1)[0] + ":*"
    try:
        sock.bind(listen)
    except zmq.ZMQError as e:
        raise UserError(f"cannot listen on {listen}: {e}") from None
    return sock.getsockopt_string(zmq.LAST_ENDPOINT)


def heartbeat_address(address: str) -> str:
    """Where the heartbeat socket binds: the same host on any free port (tcp), or a sibling path (ipc)."""
    if address.startswith("tcp://"):
        return address.rsplit(":", 1)[0] + ":*"
    return address + ".hb"


class StageDaemon:
    """Serves one stage over ZeroMQ. `load(model_dir, first, last)` builds the served stage; `probe`
    (same signature) builds the one-layer stages timed at start-up for the planner. The daemon loads,
    warms up and runs its stage on the thread that calls `serve` (torch is fastest on the thread
    that loaded it); heartbeats are answered from a thread of their own.

    Started without a model (`model_dir` None), it takes its layers' weights from the coordinator
    (MODEL, then CHUNKs: `engine.core.weight_store`) into $HETPIPE_HOME/weights/, and loads them
    from there; its identity says `source: delivered` so a coordinator knows to send them."""

    def __init__(self, backend: str, dtype: str, model_dir: str | None, listen: str, load: StageLoader, *,
                 probe: StageLoader | None = None, layers: tuple[int, int] | None = None,
                 max_seqs: int | None = None, auth_dir: str | None = None, insecure: bool = False,
                 drain_s: float = P.DRAIN_TIMEOUT_S, peers: tuple[str, ...] = ()):
        self.auth = Auth.load(auth_dir, "stage")
        if self.auth is None and not insecure and not is_loopback(listen):
            raise UserError(f"refusing to listen on {listen} without authentication: anyone who reaches it could "
                            "use this machine (make keys with `hetpipe keys init`, or allow it on a trusted network)")
        self.backend, self.dtype, self.model_dir = backend, dtype, model_dir
        self.device = "?"  # known once a stage is built
        self._load_stage, self.max_seqs, self.drain_s = load, max_seqs, drain_s
        self.draining_since: float | None = None
        self.delivered = model_dir is None  # its weights come from its coordinator
        self.store: WeightStore | None = None
        self.tensors: dict[str, TensorEntry] = {}  # what the last MODEL said it would send
        self.cfg = None if self.delivered else ModelConfig.load(model_dir)
        self.identity = {"source": "delivered"} if self.delivered else {"config": config_hash(model_dir),
                                                                        "weights": weights_hash(model_dir)}
        self.stage: BaseStage | None = None
        self.layer_bytes = 0 if self.delivered else self._layer_bytes()
        self.ms_per_layer, self.head_ms = self._calibrate(probe) if probe and not self.delivered else (0.0, 0.0)
        if layers:
            self._load(*layers)
        self.ctx = zmq.Context.instance()
        self.authenticator = self.auth.start_authenticator(self.ctx) if self.auth else None
        self.sock = self._router()
        self.address = bind_address(self.sock, listen)
        self.heartbeat = self._router()
        self.heartbeat_address = bind_address(self.heartbeat, heartbeat_address(self.address))
        self.next_hops: dict[str, zmq.Socket] = {}  # one per allowed address at most
        self.peers = frozenset(peers)  # next hops allowed whatever the coordinator says (--peers)
        self.next_hop: str | None = None  # the next stage, as the coordinator that assigned the layers named it
        self.memo = SamplingMemo()  # each live sequence's sampling parameters, as its coordinator sent them
        self.running = True
        threading.Thread(target=self._answer_heartbeats, name="heartbeat", daemon=True).start()

    def _router(self) -> zmq.Socket:
        sock = self.ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.MAXMSGSIZE, P.MAX_FRAME_BYTES)
        sock.setsockopt(zmq.LINGER, 0)
        if self.auth:
            self.auth.serve(sock)
        return sock

    def _answer_heartbeats(self) -> None:
        """Its own thread and socket: a daemon busy with a long batch still answers within ms.

        A PING with `report` gets the daemon's full report (what `/health` shows: it must not wait
        behind a long prefill on the compute socket); any other message an OK. A stopped
        (SIGSTOP) or dead process answers nothing, which is what the coordinator watches.
        """
        while self.running:
            try:
                if not self.heartbeat.poll(200):
                    continue
                sender, *frames = self.heartbeat.recv_multipart()
                try:
                    header, _ = unpack(frames)
                except WireError:
                    continue
                if header.get("kind") == P.PING and header.get("report"):
                    reply = self._info(header)
                else:
                    stage = self.stage
                    reply = pack(P.OK, req=header.get("req"), seqs=len(stage.live_sequences()) if stage else 0)
                self.heartbeat.send_multipart([sender, *reply])
            except zmq.ZMQError:
                if self.running:
                    time.sleep(0.05)

    # -- start-up ------------------------------------------------------------------------------

    def _layer_bytes(self) -> int:
        """The calibration layer's bytes, from its tensors' headers, or from the config's arithmetic
        where its weight file is not here (a Hub snapshot that fetches a stage's files on LOAD)."""
        layer = calibration_layer(self.cfg)
        try:
            return layer_bytes(self.model_dir, self.cfg, self.dtype, layer)
        except (OSError, UserError):
            return int(layer_cost(self.cfg, layer, self.dtype).held)

    def _calibrate(self, probe: StageLoader) -> tuple[float, float]:
        """(ms per layer, ms of the final norm + head) per decoded token on this device.

        Medians over one-layer stages: the calibration layer alone (the first of the model's most common
        kind: a routed layer of a MoE), then the last layer with the head, less what that layer reads.
        """
        last = self.cfg.num_hidden_layers - 1
        first = calibration_layer(self.cfg)
        layer_ms = self._time_stage(probe(self.model_dir, first, first))
        if last == first:
            return layer_ms, 0.0
        last_ms = layer_ms * relative_costs(self.cfg, self.dtype)[last].read
        return layer_ms, max(0.0, self._time_stage(probe(self.model_dir, last, last)) - last_ms)

    def _time_stage(self, stage: BaseStage) -> float:
        toks = np.arange(16, dtype=np.int32)
        hidden = None if stage.info.is_first else TypedArray.from_float32(
            np.zeros((16, self.cfg.hidden_size), np.float32), self.dtype)
        sampling = SamplingParams() if stage.info.is_last else None
        stage.forward(StageBatch([SeqChunk(0, 0, toks, sampling)], hidden))
        times = []
        for i in range(12):
            h = None if hidden is None else TypedArray(hidden.data[:1], hidden.dtype)
            t = time.perf_counter()
            stage.forward(StageBatch([SeqChunk(0, 16 + i, toks[:1], sampling)], h))
            times.append(time.perf_counter() - t)
        self.device = stage.info.device
        stage.close()
        return float(np.median(times) * 1000)

    def _load(self, first: int, last: int) -> None:
        if self.cfg is None:
            raise UserError("it has no model yet: its coordinator sends the weights first (MODEL)")
        check_range(first, last, self.cfg.num_hidden_layers)
        if self.stage is not None:
            if (self.stage.info.first, self.stage.info.last) == (first, last):
                return
            if self.stage.live_sequences():
                raise UserError(f"stage serves layers {self.stage.info.first}-{self.stage.info.last} "
                                "with live sequences; cannot reassign")
            self.stage.close()
            self.stage = None
        if self.store is not None:
            self.store.index()  # what was delivered, as a checkpoint
        self.stage = self._load_stage(self.model_dir, first, last)
        self.device, self.dtype = self.stage.info.device, self.stage.info.dtype

    def report(self, forward_ms: float | None = None) -> StageReport:
        own = dict(address=self.address, heartbeat=self.heartbeat_address, draining=self.draining_since is not None,
                   identity=self.identity, ms_per_layer=self.ms_per_layer, head_ms=self.head_ms,
                   layer_bytes=self.layer_bytes, free_memory=system_available_memory(),
                   resident_bytes=resident_bytes(), forward_ms=forward_ms)
        if self.stage is not None:
            return self.stage.report(**own)
        return StageReport(self.backend, self.device, self.dtype, self.cfg.num_hidden_layers if self.cfg else 0,
                           None, 0, 0, 0, [], self.max_seqs, **own)

    def _info(self, header: dict, forward_ms: float | None = None) -> list:
        return pack(P.INFO, req=header.get("req"), info=pack_report(self.report(forward_ms)))

    # -- the loop --------------------------------------------------------------------------------

    def serve(self) -> None:
        print(f"ready {self.address} backend={self.backend} device={self.device} dtype={self.dtype}", flush=True)
        self.sock.setsockopt(zmq.RCVTIMEO, 200)  # a wait, not a poll and a read: one call less per message
        while self.running:
            if self.draining_since is not None and self._drained():
                break
            try:
                sender, *frames = self.sock.recv_multipart(copy=False)
            except zmq.Again:
                continue
            self.dispatch(sender.bytes, frames)
        self.close()

    def drain(self) -> None:
        """Stop taking new sequences; exit once the live ones are released (or after drain_s).

        A second call (a second SIGTERM) exits at once.
        """
        if self.draining_since is not None:
            self.running = False
            return
        self.draining_since = time.monotonic()
        live = len(self.stage.live_sequences()) if self.stage else 0
        print(f"stage {self.address}: draining {live} live sequence(s)", file=sys.stderr, flush=True)

    def _drained(self) -> bool:
        if self.stage is None or not self.stage.live_sequences():
            return True
        return time.monotonic() - self.draining_since > self.drain_s

    def dispatch(self, sender: bytes, frames) -> None:
        header = {}
        try:
            header, arrays = unpack(frames)
            handler = getattr(self, f"handle_{header['kind']}", None)
            if handler is None:
                raise WireError(f"a stage does not take {header['kind']!r} messages")
            handler(sender, header, arrays)
        except Exception as e:  # bad input, a bug or a backend failure: report it, keep serving
            if not header and frames:  # not even read: still name the request it refuses
                req, client = peek_envelope(frames[0])
                header = {"req": req, "client": client}
            known = isinstance(e, (WireError, HetpipeError))
            self._error(sender, header, str(e) if known else f"{type(e).__name__}: {e}", kind_of(e))

    def _reply_to(self, sender: bytes, header: dict) -> bytes:
        client = header.get("client")
        return client.encode() if isinstance(client, str) and client else sender

    def _send(self, identity: bytes, frames) -> None:
        try:
            self.sock.send_multipart([identity, *frames], copy=False)
        except zmq.ZMQError as e:  # client gone (EHOSTUNREACH): nothing to deliver to
            print(f"stage {self.address}: cannot reach client: {e}", file=sys.stderr)

    def _error(self, sender: bytes, header: dict, message: str, kind: str = "internal") -> None:
        req = header.get("req") if isinstance(header, dict) else None
        self._send(self._reply_to(sender, header if isinstance(header, dict) else {}),
                   pack(P.ERROR, req=req, message=message, stage=self.address, error=kind))

    def handle_hello(self, sender, header, arrays) -> None:
        theirs = header.get("identity") or {}
        if self.delivered:  # any model: its coordinator sends what it lacks
            self._send(sender, self._info(header))
            return
        if theirs.get("config") != self.identity["config"]:
            raise UserError(f"it serves a different model (config {self.identity['config']}, "
                            f"coordinator has {theirs.get('config')})")
        if theirs.get("weights") and self.identity["weights"] and theirs["weights"] != self.identity["weights"]:
            raise UserError("it holds different weights for the same config")
        self._send(sender, self._info(header))

    def handle_ping(self, sender, header, arrays) -> None:
        self._send(sender, self._info(header))

    def handle_health(self, sender, header, arrays) -> None:
        """A real one-token forward through this stage's layers (a sequence of its own), timed."""
        ms = None
        if self.stage is not None:
            t = time.perf_counter()
            self.stage.warmup(decode_only=True)
            ms = (time.perf_counter() - t) * 1000
        self._send(sender, self._info(header, forward_ms=ms))

    def handle_load(self, sender, header, arrays) -> None:
        layers, next_hop = header.get("layers"), header.get("next_hop")
        if not (isinstance(layers, list) and len(layers) == 2
                and all(isinstance(x, int) and not isinstance(x, bool) for x in layers)):
            raise WireError("load needs layers [first, last]")
        if not (next_hop is None or _is_address(next_hop)):
            raise WireError("next_hop must be a tcp:// or ipc:// address, or null for the last stage")
        self._load(*layers)
        self.next_hop = next_hop
        for address in [a for a in self.next_hops if not self._allowed(a)]:  # a stage replaced elsewhere
            self.next_hops.pop(address).close(0)
        self._send(sender, self._info(header))

    def _allowed(self, address: str) -> bool:
        return address == self.next_hop or address in self.peers

    def handle_model(self, sender, header, arrays) -> None:
        """The model a coordinator will send this daemon's layers of: its identity, config.json and
        the tensors' manifest; replies how many bytes of each it holds already."""
        if not self.delivered:
            raise UserError(f"it loads its own weights from {self.model_dir} (started with --model)")
        identity, config, tensors = header.get("identity"), header.get("config"), header.get("tensors")
        if not (isinstance(identity, dict) and isinstance(config, str) and len(config) < (1 << 20)
                and isinstance(tensors, list) and len(tensors) < 100_000):
            raise WireError("model needs identity, config and tensors")
        entries = [unpack_tensor_entry(t) for t in tensors]
        theirs = {"config": identity.get("config"), "weights": identity.get("weights"), "source": "delivered"}
        if theirs != self.identity:
            if self.stage is not None and self.stage.live_sequences():
                raise UserError("it serves another model with live sequences; cannot switch")
            if self.stage is not None:
                self.stage.close()
                self.stage = None
            if self.store is not None:
                self.store.close()
            self.store = WeightStore(theirs)
            self.store.set_config(config)
            self.model_dir, self.cfg, self.identity = str(self.store.dir), ModelConfig.load(self.store.dir), theirs
        self.tensors = {t.name: t for t in entries}
        self._send(sender, pack(P.OK, req=header.get("req"), have=[self.store.have(t) for t in entries]))

    def handle_chunk(self, sender, header, arrays) -> None:
        """Bytes of one tensor at an offset, kept once they match their hash: `held` says what it
        holds after (`error` why a chunk was not kept)."""
        t = self.tensors.get(header.get("name"))
        offset = header.get("offset")
        if t is None or not isinstance(offset, int) or len(arrays) != 1 or arrays[0][0] != "uint8" \
                or arrays[0][1].ndim != 1:
            raise WireError("chunk needs the name of a tensor MODEL listed, an offset and one uint8 frame")
        fields = {"req": header.get("req"), "name": t.name}
        try:
            held = self.store.write(t, offset, arrays[0][1])
        except ValueError as e:
            self._send(sender, pack(P.OK, **fields, held=self.store.have(t), error=str(e)))
            return
        self._send(sender, pack(P.OK, **fields, held=held))

    def handle_release(self, sender, header, arrays) -> None:
        ids = header.get("seq_ids")
        if not isinstance(ids, list) or not all(isinstance(i, int) for i in ids):
            raise WireError("release needs a list of seq_ids")
        if self.stage is not None:
            self.stage.release(ids)
        self.memo.forget(ids)
        self._send(sender, pack(P.OK, req=header.get("req")))

    def handle_draft(self, sender, header, arrays) -> None:
        """A draft model's turn: this daemon holds all its layers (`BaseStage.draft`)."""
        if self.stage is None:
            raise UserError("it has no layers assigned yet")
        seq_id, start, k = header.get("seq_id"), header.get("start"), header.get("k")
        if not (all(isinstance(v, int) and not isinstance(v, bool) for v in (seq_id, start, k))
                and 0 <= seq_id <= P.MAX_SEQ_ID and start >= 0 and len(arrays) == 1 and arrays[0][0] == "int32"
                and arrays[0][1].ndim == 1):
            raise WireError("draft needs seq_id, start, k and one int32 frame of tokens")
        if self.draining_since is not None and seq_id not in self.stage.live_sequences():
            raise CapacityError("it is shutting down: it takes no new sequences")
        tokens = self.stage.draft(seq_id, start, arrays[0][1], k)
        self._send(sender, pack(P.OK, req=header.get("req"), tokens=tokens))

    def handle_forward(self, sender, header, arrays) -> None:
        if self.stage is None:
            raise UserError("it has no layers assigned yet")
        route = header.get("route", [])
        if not (isinstance(route, list) and len(route) <= P.MAX_ROUTE and all(_is_address(a) for a in route)):
            raise WireError("route must be a list of tcp:// or ipc:// addresses")
        if route and not self._allowed(route[0]):
            raise UserError(f"it does not connect to {route[0][:80]}: not the next stage its coordinator assigned "
                            "with the layers, nor one of its --peers")
        batch = unpack_batch(header, arrays, self.memo)
        if self.draining_since is not None:
            live = set(self.stage.live_sequences())
            if any(s.seq_id not in live for s in batch.seqs):
                raise CapacityError("it is shutting down: it takes no new sequences")
        t, received = time.perf_counter(), time.time()
        result = self.stage.forward(batch)
        # [address, compute ms, wall clock at receipt, wall clock at sending on]: the coordinator's hop times
        timings = list(header.get("timings", [])) + [[self.address, (time.perf_counter() - t) * 1000, received,
                                                      time.time()]]
        fields = dict(req=header.get("req"), client=header.get("client"), timings=timings)
        if len(self.memo.params) > 2 * len(self.stage.live_sequences()) + 64:
            self.memo.keep_only(self.stage.live_sequences())
        if route and result.hidden is not None:
            sock = self._next_hop(route[0])
            frames = forward_frames(header, arrays, result.hidden, route=route[1:], **fields)
            try:
                try:
                    sock.send_multipart(frames, copy=False, flags=zmq.NOBLOCK)
                except zmq.Again:  # not connected yet (a multipart message goes whole or not at all)
                    if not sock.poll(P.NEXT_HOP_WAIT_MS, zmq.POLLOUT):
                        raise
                    sock.send_multipart(frames, copy=False, flags=zmq.NOBLOCK)
            except zmq.Again:
                raise StageFailure(f"it cannot reach the next stage {route[0]}") from None
        else:
            self._send(self._reply_to(sender, header), pack_result(result, **fields))

    def _next_hop(self, address: str) -> zmq.Socket:
        sock = self.next_hops.get(address)
        if sock is None:
            sock = self.ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            # queue nothing for a peer that is not connected: after a restart, the new daemon must not
            # receive batches meant for the old one; the send fails and the client hears of it
            sock.setsockopt(zmq.IMMEDIATE, 1)
            if self.auth:
                self.auth.connect(sock)
            sock.connect(address)
            self.next_hops[address] = sock
        return sock

    def close(self) -> None:
        self.running = False
        for s in self.next_hops.values():
            s.close(0)
        self.sock.close(0)
        self.heartbeat.close(0)
        if self.authenticator:
            self.authenticator.stop()
        if self.stage is not None:
            self.stage.close()


def _is_address(a) -> bool:
    return isinstance(a, str) and a.startswith(("tcp://", "ipc://")) and len(a) < 256
