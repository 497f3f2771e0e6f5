"""`RemotePipeline`: stage daemons in pipeline order, satisfying `engine.core.pipeline.Pipeline`.

A batch goes to the first stage with the other stages' addresses as its route; each stage passes
its hidden rows straight to the next, and the last answers here. Several batches may be in flight
at once: the daemons work on different ones. Liveness comes from the daemons' heartbeat sockets;
`replace` does the socket work of putting a stage in a lost one's place (the policy around it is
the engine's: `engine.serving.recovery`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from engine.core.errors import HetpipeError
from engine.core.partition import check_coverage
from engine.core.pipeline import BatchOutcome, BatchTiming
from engine.core.stage import StageBatch, StageStatus

from . import protocol as P
from .client import RemoteStage, StageError, health_reports, raise_if_error
from .delivery import deliver
from .heartbeat import Heartbeat
from .wire import SamplingMemo, pack, pack_batch, unpack_result

STATUS_TIMEOUT_S = 2.0  # a stage whose heartbeat socket does not answer a status ping this fast is reported lost


class RemotePipeline:
    def __init__(self, stages: list[RemoteStage], identity: dict, standby: Sequence[str] = (),
                 model_dir: str | None = None):
        check_coverage([(s.info.first, s.info.last) for s in stages], stages[0].info.num_layers)
        self.stages = stages
        self.client = stages[0].client
        self.identity = identity
        self.standby = list(standby)  # addresses of spare daemons that may take a lost stage's place
        self.model_dir = model_dir  # the weights a daemon started without a model is sent (None: none here)
        self._flying: dict[int, tuple[int, float]] = {}  # req -> (tag, sent)
        self.memo = SamplingMemo()  # what each live sequence's sampling parameters were sent as
        self.heartbeat = Heartbeat(self.client.ctx, self.client.auth)
        for s in stages:
            self.heartbeat.watch(s.address, s.report.heartbeat)

    @property
    def max_inflight(self) -> int:
        return 4 * len(self.stages)

    @property
    def route(self) -> list[str]:
        return [s.address for s in self.stages[1:]]

    def submit(self, tag: int, batch: StageBatch) -> None:
        """Send a batch along the route; a batch too large for one message raises `BatchTooLarge`,
        sending nothing."""
        req = self.client.next_req()
        frames = pack_batch(batch, self.memo, req=req, client=self.client.id, route=self.route)
        self.client.expect(req)
        sent = time.monotonic(), time.time()  # read before sending: the stage may take it before this thread runs on
        try:
            self.client.send(self.stages[0].address, frames)
        except Exception:
            self.client.forget(req)
            self.memo.forget(s.seq_id for s in batch.seqs)  # what it marked as sent was not
            raise
        self._flying[req] = (tag, *sent)

    def poll(self, timeout_s: float) -> list[BatchOutcome]:
        out = []
        for req, (header, arrays) in self.client.poll(timeout_s).items():
            arrived = time.time()
            tag, sent, sent_clock = self._flying.pop(req)
            try:
                raise_if_error(header, self.stages[-1].address)
                result = unpack_result(header, arrays)
            except Exception as e:
                out.append(BatchOutcome(tag, error=e))
                continue
            timing = _timing(header.get("timings", []), self.stages, (time.monotonic() - sent) * 1000, sent_clock,
                             arrived)
            out.append(BatchOutcome(tag, result.tokens, timing, prompt_logprobs=result.prompt_logprobs))
        now = time.monotonic()
        for req, (tag, sent, _) in list(self._flying.items()):
            if now - sent > self.client.timeout_s:
                del self._flying[req]
                self.client.forget(req)
                out.append(BatchOutcome(tag, error=StageError(
                    f"the pipeline did not answer within {self.client.timeout_s:.0f} s")))
        return out

    def wake(self) -> None:
        self.client.wake()

    def release(self, seq_ids: Sequence[int]) -> None:
        """Tell every stage to free these sequences; no reply awaited (a later message sees it done)."""
        self.memo.forget(seq_ids)
        for s in self.stages:
            self.client.send(s.address, pack(P.RELEASE, req=self.client.next_req(), seq_ids=list(seq_ids)))

    def draft(self, seq_id: int, start: int, tokens: Sequence[int], k: int) -> list[int]:
        """A draft model's turn on a daemon holding all its layers (`BaseStage.draft`); waits for it."""
        (stage,) = self.stages
        req = self.client.next_req()
        self.client.send(stage.address, pack(P.DRAFT, [("int32", np.asarray(tokens, np.int32))], req=req,
                                             seq_id=seq_id, start=start, k=k))
        tokens = self.client.wait(stage.address, req, P.DRAFT_TIMEOUT_S)[0].get("tokens")
        if not (isinstance(tokens, list) and len(tokens) == k and all(isinstance(t, int) for t in tokens)):
            raise StageError(f"stage {stage.address} answered a draft of {k} tokens with something else")
        return tokens

    def kv_tokens(self) -> int:
        return min(s.info.kv_tokens for s in self.stages)

    def describe(self) -> list[dict]:
        return [{**s.info.describe(), "address": s.address} for s in self.stages]

    def status(self) -> list[StageStatus]:
        """Each stage as its heartbeat socket reports it now, on sockets of its own (any thread may
        ask): a stage busy with a long batch still answers; a stopped or dead one is "lost"."""
        reports = health_reports([s.report.heartbeat for s in self.stages], self.client.auth, STATUS_TIMEOUT_S,
                                 P.PING, report=True)
        return [StageStatus(s.address, None, s.info, str(r)) if isinstance(r, Exception) else
                StageStatus(s.address, r, s.info) for s, r in zip(self.stages, reports)]

    def lost(self) -> list[int]:
        """Indices of stages whose heartbeat went silent."""
        gone = set(self.heartbeat.lost())
        return [i for i, s in enumerate(self.stages) if s.address in gone]

    def check(self) -> list[int]:
        """Indices of stages that do not answer a ping at once, or no longer hold their layers."""
        out = []
        for i, s in enumerate(self.stages):
            try:
                if s.refresh().layers != (s.info.first, s.info.last):
                    out.append(i)
            except StageError:
                out.append(i)
        return out

    def abandon(self) -> None:
        for req in self._flying:
            self.client.forget(req)
        self._flying.clear()
        self.memo = SamplingMemo()  # a replaced stage was sent nothing: every sequence starts afresh

    def replace(self, index: int, timeout_s: float) -> str | None:
        """One try, within `timeout_s`: the lost stage's own address (restarted), then each unused
        standby, says hello (identity checked) and loads the lost layer range."""
        old = self.stages[index]
        deadline = time.monotonic() + timeout_s
        self.heartbeat.unwatch(old.address)
        in_use = {s.address for i, s in enumerate(self.stages) if i != index}
        for address in [old.address] + [a for a in self.standby if a not in in_use and a != old.address]:
            self.client.reset(address)  # drop what was queued for the old process
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                new = RemoteStage(self.client, address, self.identity, timeout_s=min(left, 1.0))
                if new.report.identity.get("source") == "delivered" and self.model_dir and self.identity["weights"]:
                    deliver(self.client, address, self.model_dir, old.info.first, old.info.last, self.identity)
                new.load(old.info.first, old.info.last, self._next_hop(index),
                         timeout_s=max(deadline - time.monotonic(), 0.01))
                if index > 0 and address != old.address:  # the stage before passes its rows here now
                    before = self.stages[index - 1]
                    before.load(before.info.first, before.info.last, address,
                                timeout_s=max(deadline - time.monotonic(), 0.01))
            except HetpipeError:
                self.client.reset(address)
                continue
            self.stages[index] = new
            self.heartbeat.watch(new.address, new.report.heartbeat)
            return address
        return None

    def _next_hop(self, index: int) -> str | None:
        return self.stages[index + 1].address if index + 1 < len(self.stages) else None

    def close(self) -> None:
        self.heartbeat.close()
        self.client.close()


def _timing(timings: list, stages: list[RemoteStage], total_ms: float, sent: float, arrived: float) -> BatchTiming:
    """Each stage's compute, and each hop's time when every stage on the route gave its clock
    readings ([address, ms, received, sent on])."""
    timings = [e for e in timings if isinstance(e, list) and len(e) in (2, 4) and isinstance(e[0], str)
               and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in e[1:])]
    by_stage: dict[str, float] = {}
    for entry in timings:
        by_stage[entry[0]] = by_stage.get(entry[0], 0.0) + entry[1]
    hops = []
    if len(timings) == len(stages) and all(len(e) == 4 for e in timings):
        last = sent
        for _, _, received, sent_on in timings:
            hops.append((received - last) * 1000)
            last = sent_on
        hops.append((arrived - last) * 1000)
    return BatchTiming([by_stage.get(s.address, 0.0) for s in stages], total_ms, hops)
