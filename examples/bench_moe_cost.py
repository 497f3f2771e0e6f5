"""Benchmark (not a test): does a MoE layer's decode time follow the bytes one token reads from it?

The planner assumes so (`engine/core/layer_cost.py`): a Mixtral layer holding 8 experts, 2 routed
per token, is timed like a dense layer whose MLP is as large as those 2 experts. This makes both as
random checkpoints (transformers saves them; hidden 1024, 16 heads, 4 kv heads), one with 8 experts
of 1536 and top-2, one dense with an MLP of 3072, and runs `hetpipe bench backends` on each in turn,
in rounds, on both backends and the dtypes and quantizations asked. It prints, per row, the MoE's ms
per layer over the dense model's (1.0: time follows bytes read) and the MoE's prefill over the
dense one's.

    .venv/bin/python examples/bench_moe_cost.py [--rounds 2] [--dtypes float32,bfloat16] [--quant 4:32]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

COMMON = dict(hidden_size=1024, num_hidden_layers=4, num_attention_heads=16, num_key_value_heads=4,
              vocab_size=4096, max_position_embeddings=4096)
MODELS = {"moe": ("mixtral", dict(intermediate_size=1536, num_local_experts=8, num_experts_per_tok=2)),
          "dense": ("llama", dict(intermediate_size=3072))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--quant", default="4:32")
    ap.add_argument("--out", default="/tmp/hetpipe-bench-moe")
    args = ap.parse_args()
    from tiny import make_tiny

    out = Path(args.out)
    dirs = {}
    for name, (variant, kw) in MODELS.items():
        dirs[name] = out / name
        if not (dirs[name] / "config.json").is_file():
            make_tiny(dirs[name], variant, **COMMON, **kw)
    rows: dict[tuple, dict[str, list]] = {}
    for r in range(args.rounds):
        for name in (list(dirs) if r % 2 == 0 else list(dirs)[::-1]):
            cmd = [str(ROOT / ".venv/bin/hetpipe"), "bench", "backends", "--model", str(dirs[name]), "--layers", "0-2",
                   "--dtypes", args.dtypes, "--quant", args.quant, "--max-tokens", "32", "--prompt-len", "64",
                   "--out", str(out / f"run-{name}"), "--json"]
            for x in json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout):
                key = (x["backend"], x["dtype"], x["weights"])
                rows.setdefault(key, {}).setdefault(name, []).append(x)
    print("| backend | dtype | weights | MoE / dense ms per layer (decode) | MoE / dense prefill tokens/s |")
    print("|---|---|---|---|---|")
    for (backend, dtype, weights), by in sorted(rows.items()):
        if set(by) != set(dirs):
            print(f"| {backend} | {dtype} | {weights} | (a model failed) | |")
            continue
        med = {n: {k: statistics.median(x[k] for x in v) for k in ("ms_per_layer", "prefill_tokens_per_s")}
               for n, v in by.items()}
        print(f"| {backend} | {dtype} | {weights} | {med['moe']['ms_per_layer'] / med['dense']['ms_per_layer']:.2f} "
              f"| {med['moe']['prefill_tokens_per_s'] / med['dense']['prefill_tokens_per_s']:.2f} |")


if __name__ == "__main__":
    main()
