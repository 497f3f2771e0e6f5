"""Benchmark (not a test): what one more layer costs a torch stage in resident memory, bf16 against
4-bit g32, at Llama-3-8B's widths (random weights made in memory, `engine/core/shapes.py`).

Each configuration loads in a fresh process a stage of layers 1..1 and of layers 1..3 of a 6-layer
shape (no embedding, no head) and reads the process's RSS after loading; the difference over two
layers is one layer's share. Prints both and their ratio.

    .venv/bin/python examples/bench_layer_rss.py [--shape llama-3-8b] [--bits 4] [--group 32]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

WORKER = r"""
import gc, json, sys
sys.path.insert(0, sys.argv[1])
from engine.compose import allocator
from engine.compose.stages import load_stage
from engine.core.shapes import ShapeModel

name, last, bits, group = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
shape = ShapeModel(name, 6, *((bits, group) if bits else ()))
stage = load_stage("torch", shape, 1, last, dtype="bfloat16", kv_tokens=64)
gc.collect()
allocator.release_free_memory()
with open("/proc/self/status") as f:
    print(json.dumps({"rss": next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) * 1024}))
"""


def rss(name: str, last: int, bits: int, group: int) -> int:
    r = subprocess.run([sys.executable, "-c", WORKER, str(ROOT), name, str(last), str(bits), str(group)],
                       capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])["rss"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="llama-3-8b")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group", type=int, default=32)
    args = ap.parse_args()
    per_layer = {}
    for bits in (0, args.bits):
        one, three = rss(args.shape, 1, bits, args.group), rss(args.shape, 3, bits, args.group)
        per_layer[bits] = (three - one) / 2
        label = "bf16" if bits == 0 else f"{bits}-bit g{args.group}"
        print(f"{label}: RSS {one / 1e6:.0f} MB with 1 layer, {three / 1e6:.0f} MB with 3: "
              f"{per_layer[bits] / 1e6:.0f} MB a layer")
    print(f"a {args.bits}-bit layer's share of RSS: {per_layer[args.bits] / per_layer[0]:.3f}x a bf16 layer's")


if __name__ == "__main__":
    main()
