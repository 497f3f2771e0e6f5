"""`hetpipe bench delivery`: weights over the LAN against a raw ZeroMQ transfer of the same bytes.

Each round starts a stage daemon without a model (its own empty $HETPIPE_HOME) and times
`transport.delivery.deliver` of a layer range to it (MODEL, then hash-checked chunks written to
disk), then a second delivery (nothing left to send), then the same chunks as bare frames to
`transport.sink`, which drops them, and then the daemon's own work without a network: the same
chunks checked and written by a `WeightStore` in this process (the floor the disk and SHA-256 set).
The ratios are delivered MB/s over raw MB/s and over that floor, round by round.
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from transport.client import Client
from transport.delivery import deliver, raw_send

from ...core.config import ModelConfig
from ...core.identity import config_hash, weights_hash
from ...core.weight_store import CHUNK_BYTES, TensorSource, WeightStore, manifest
from ..procs import start_sink, start_stage, stop_stages


def run_delivery(model_dir: str | Path, layers: tuple[int, int] | None, rounds: int, backend: str, log) -> dict:
    cfg = ModelConfig.load(model_dir)
    first, last = layers or (0, cfg.num_hidden_layers - 1)
    source = TensorSource(model_dir)
    t = time.perf_counter()
    entries = manifest(source, cfg, first, last)  # hashed once, then read from the cache
    hash_s = time.perf_counter() - t
    total = sum(e.nbytes for e in entries)
    identity = {"config": config_hash(model_dir), "weights": weights_hash(model_dir)}
    rows = []
    for r in range(rounds):
        home = Path(tempfile.mkdtemp(prefix="hetpipe-bench-delivery-"))
        proc, address = start_stage(backend, None, env={**os.environ, "HETPIPE_HOME": str(home)})
        client = Client()
        try:
            t = time.perf_counter()
            sent = deliver(client, address, model_dir, first, last, identity)
            first_s = time.perf_counter() - t
            t = time.perf_counter()
            again = deliver(client, address, model_dir, first, last, identity)
            again_s = time.perf_counter() - t
        finally:
            client.close()
            stop_stages([proc])
            shutil.rmtree(home, ignore_errors=True)
        sink, sink_address = start_sink()
        try:
            t = time.perf_counter()
            raw = raw_send(sink_address, source, entries)
            raw_s = time.perf_counter() - t
        finally:
            stop_stages([sink])
        floor_s = _store_floor(source, entries, identity)
        row = {"round": r + 1, "bytes": sent, "delivery_mb_s": sent / 1e6 / first_s, "raw_mb_s": raw / 1e6 / raw_s,
               "second_start_bytes": again, "second_start_s": again_s, "store_mb_s": total / 1e6 / floor_s}
        row["ratio"] = row["delivery_mb_s"] / row["raw_mb_s"]
        row["of_store"] = row["delivery_mb_s"] / row["store_mb_s"]
        log(f"round {r + 1}: delivery {row['delivery_mb_s']:.0f} MB/s, raw ZeroMQ {row['raw_mb_s']:.0f} MB/s "
            f"({row['ratio']:.2f}x), checked and written here {row['store_mb_s']:.0f} MB/s ({row['of_store']:.2f}x); "
            f"second start sent {again} bytes in {again_s * 1000:.0f} ms")
        rows.append(row)
    return {"model": str(model_dir), "layers": [first, last], "tensors": len(entries), "bytes": total,
            "hash_s": hash_s, "rounds": rows,
            "ratio_median": statistics.median(r["ratio"] for r in rows),
            "delivery_mb_s_median": statistics.median(r["delivery_mb_s"] for r in rows),
            "raw_mb_s_median": statistics.median(r["raw_mb_s"] for r in rows),
            "store_mb_s_median": statistics.median(r["store_mb_s"] for r in rows),
            "of_store_median": statistics.median(r["of_store"] for r in rows)}


def _store_floor(source: TensorSource, entries, identity: dict) -> float:
    """Seconds for a WeightStore in this process to check and write the same chunks: no network."""
    root = Path(tempfile.mkdtemp(prefix="hetpipe-bench-store-"))
    try:
        store = WeightStore(identity, root)
        t = time.perf_counter()
        for e in entries:
            for offset in range(0, e.nbytes, CHUNK_BYTES):
                store.write(e, offset, source.chunk(e.name, offset))
        return time.perf_counter() - t
    finally:
        shutil.rmtree(root, ignore_errors=True)


def format_delivery(r: dict) -> str:
    return "\n".join([
        f"layers {r['layers'][0]}-{r['layers'][1]}: {r['tensors']} tensors, {r['bytes'] / 1e6:.1f} MB "
        f"(manifest {r['hash_s']:.2f} s: hashed once, cached after)",
        "| round | delivery MB/s | raw ZeroMQ MB/s | ratio | checked + written, no network MB/s | ratio "
        "| second start |",
        "|---|---|---|---|---|---|---|",
        *(f"| {x['round']} | {x['delivery_mb_s']:.0f} | {x['raw_mb_s']:.0f} | {x['ratio']:.2f}x | "
          f"{x['store_mb_s']:.0f} | {x['of_store']:.2f}x | "
          f"{x['second_start_bytes']} B in {x['second_start_s'] * 1000:.0f} ms |" for x in r["rounds"]),
        f"median: delivery {r['delivery_mb_s_median']:.0f} MB/s, raw {r['raw_mb_s_median']:.0f} MB/s, "
        f"{r['ratio_median']:.2f}x (target >= 0.8x); against checking and writing alone {r['of_store_median']:.2f}x",
    ])
