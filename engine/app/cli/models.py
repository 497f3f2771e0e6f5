"""`hetpipe fetch`, `import-gguf`, `quantize` and `plan`: getting a model, and seeing where it fits."""

from __future__ import annotations

import json
import sys

from ...core.errors import UserError
from ...core.partition import parse_layer_range
from ...core.tensors import DTYPES
from .common import count, resolve_model_dir


def add_parsers(sub) -> None:
    f = sub.add_parser("fetch", help="download and import a known model (default: smollm2), or a Hub id's files")
    f.add_argument("name", nargs="?", default="smollm2", help="smollm2, smollm2-q4, or ORG/NAME[@REVISION]")
    f.add_argument("--out", default=None, help="directory (default: ~/.cache/hetpipe/models/NAME)")
    f.add_argument("--layers", default=None, metavar="FIRST-LAST",
                   help="with a Hub id: only the weight files these layers need (default: all)")
    g = sub.add_parser("import-gguf", help="import a GGUF (llama, mixtral, qwen2/3, qwen3moe, gemma2/3, phi3) into "
                                           "a Hugging Face layout directory (its quantization kept, in MLX's layout)")
    g.add_argument("file")
    g.add_argument("--out", required=True)
    g.add_argument("--dequantize", action="store_true", help="write every tensor as float32 instead")
    g.add_argument("--mlx-lm", action="store_true",
                   help="write MLX's affine form only (biases written out, Q6_K requantized to 8 bits), "
                        "which mlx-lm loads; larger than the file")
    q = sub.add_parser("quantize", help="quantize a float checkpoint directory (MLX affine; mlx-lm loads it)")
    q.add_argument("model_dir", metavar="DIR")
    q.add_argument("--out", required=True, metavar="DIR2")
    q.add_argument("--bits", type=int, default=4, choices=(4, 8))
    q.add_argument("--group-size", type=int, default=64, choices=(32, 64, 128))
    pn = sub.add_parser("plan", help="what fits where: each stage's layers, weights, KV and memory left; tokens/s")
    pn.add_argument("--model", default=None, help="model directory, .gguf file or Hub id (only its config is read)")
    on = pn.add_mutually_exclusive_group(required=True)
    on.add_argument("--devices", metavar="NAME=BACKEND:DEVICE:MEMORY,...",
                    help="machines in pipeline order, like mac=mlx:m2-max:64GB,linux=torch:rtx4090:24GB (DEVICE: "
                         "a named device, whose read bandwidth is known, or gpu, cuda, cpu)")
    on.add_argument("--stages", metavar="ADDR,...", help="live daemons: their free memory and measured speed")
    pn.add_argument("--auth", default=None, metavar="DIR", help="with --stages: CURVE keys")
    pn.add_argument("--bits", type=int, default=None, choices=(4, 8, 16),
                    help="plan the weights at this width (default: the checkpoint's own)")
    pn.add_argument("--context", type=count, default=None, help="tokens per sequence (default: the model's context)")
    pn.add_argument("--concurrency", type=count, default=1, help="sequences at once")
    pn.add_argument("--json", action="store_true", help="print one JSON line")


def cmd_fetch(args) -> int:
    from ..fetch import KNOWN_MODELS, fetch
    from ...compose.hub import ensure_layers, fetch_meta, parse_hub_id

    hub_id = None if args.name in KNOWN_MODELS else parse_hub_id(args.name)
    if hub_id is None:
        if args.layers:
            raise UserError("--layers applies to a Hub id")
        print(fetch(args.name, args.out, progress=sys.stderr.isatty()))
        return 0
    if args.out:
        raise UserError("a Hub id is fetched into huggingface_hub's cache (HF_HOME); --out applies to known models")
    from ...core.config import ModelConfig

    model_dir = fetch_meta(*hub_id)
    first, last = parse_layer_range(args.layers) if args.layers else (0, ModelConfig.load(model_dir).num_hidden_layers - 1)
    ensure_layers(model_dir, first, last)
    print(model_dir)
    return 0


def cmd_import_gguf(args) -> int:
    from ..gguf_import import import_gguf

    print(import_gguf(args.file, args.out, progress=sys.stderr.isatty(), dequantize=args.dequantize,
                      mlx_lm=args.mlx_lm))
    return 0


def cmd_quantize(args) -> int:
    from ..quantize import quantize_dir

    print(quantize_dir(args.model_dir, args.out, args.bits, args.group_size, progress=sys.stderr.isatty()))
    return 0


def cmd_plan(args) -> int:
    """Exit 0 when the plan fits; 2, with the shortfall and the bit width that would fit, when not."""
    from ...core.config import ModelConfig
    from ..memory_plan import Device, format_plan, plan_memory

    from ...core.weights import checkpoint_dtype

    model_dir = resolve_model_dir(args.model)
    cfg = ModelConfig.load(model_dir)
    measured, kv_dtype = None, "bfloat16"
    if args.devices:
        devices = [Device.parse(x) for x in args.devices.split(",") if x.strip()]
    else:
        from transport.auth import Auth
        from transport.client import health_reports

        from ...compose.specs import parse_stages_spec

        addresses = [a for a, _ in parse_stages_spec(args.stages)]
        reports = health_reports(addresses, Auth.load(args.auth, "coordinator"), 10.0, kind="ping")
        for r in reports:
            if isinstance(r, Exception):
                raise UserError(str(r))
        devices = [Device(r.address, r.backend, r.device, r.free_memory, None) for r in reports]
        measured = [r.ms_per_layer for r in reports] if all(r.ms_per_layer for r in reports) else None
        # a daemon without a model says `auto` until its layers load: the checkpoint's dtype stands in
        kv_dtype = next((r.dtype for r in reports if r.dtype in DTYPES), None) or checkpoint_dtype(model_dir)
    p = plan_memory(cfg, devices, bits=args.bits, context=args.context, concurrency=args.concurrency,
                    measured_ms=measured, kv_dtype=kv_dtype)
    print(json.dumps(p.to_json()) if args.json else format_plan(p))
    if not p.fits:
        short = max(p.stages, key=lambda s: -s.free_bytes)
        at = f"; at {p.fits_at} bits it fits" if p.fits_at else "; no bit width fits these devices"
        raise UserError(f"does not fit: {short.name} is short by {-short.free_bytes / 1e9:.2f} GB{at}")
    return 0


COMMANDS = {"fetch": cmd_fetch, "import-gguf": cmd_import_gguf, "quantize": cmd_quantize, "plan": cmd_plan}
