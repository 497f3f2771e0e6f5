"""`hetpipe stage` (a stage daemon), `health`, `keys` and `selftest`: what runs on each machine."""

from __future__ import annotations

import functools
import json

from ...core.errors import UserError
from ...core.partition import parse_layer_range
from ...core.tensors import AUTO, DTYPES, check_dtype
from .common import Parser, count, resolve_model_dir


def add_parsers(sub) -> None:
    st = sub.add_parser("stage", help="serve a stage daemon over ZeroMQ")
    st.add_argument("--backend", required=True, help="mlx or torch")
    st.add_argument("--model", default=None, help="this machine's copy of the model (a directory, a .gguf file or a "
                    "Hub id); without it, the coordinator sends its layers' weights")
    st.add_argument("--listen", default="tcp://127.0.0.1:5555", help="address to bind (port 0: any free port)")
    st.add_argument("--device", default=None)
    st.add_argument("--dtype", default=AUTO, help=f"auto (the default: the checkpoint's own dtype, bf16 for a quantized "
                    f"one, where the device computes it natively, else float32) or one of {', '.join(DTYPES)}")
    st.add_argument("--threads", type=count, default=None, help="CPU threads for the backend")
    st.add_argument("--layers", default=None, metavar="FIRST-LAST", help="load these layers at start")
    st.add_argument("--kv-tokens", type=count, default=None,
                    help="KV cache budget in tokens, all sequences together (default: the memory left after the "
                         "weights, less 10%% of the device's)")
    st.add_argument("--max-seqs", type=count, default=None, help="live sequences at once (default: no limit)")
    st.add_argument("--max-call-tokens", type=count, default=8192, help="tokens in one forward call")
    st.add_argument("--auth", default=None, metavar="DIR", help="accept only clients whose keys DIR/allowed holds")
    st.add_argument("--peers", default=None, metavar="ADDR,...",
                    help="next-stage addresses this daemon may pass hidden rows to besides the one its coordinator "
                         "assigns with the layers")
    st.add_argument("--insecure", action="store_true",
                    help="allow listening on a non-loopback address without --auth")
    st.add_argument("--compile", action="store_true",
                    help="torch: torch.compile the layers (faster decode; compiled once, then cached)")
    sf = sub.add_parser("selftest", help="does this machine compute what transformers computes? (every backend "
                                         "and device here)")
    sf.add_argument("--backend", default=None, choices=("mlx", "torch"), help="only this backend")
    sf.add_argument("--device", default=None, help="only this device (torch: cpu, cuda, mps; mlx: cpu, gpu)")
    h = sub.add_parser("health", help="check each stage daemon with a real one-token forward")
    h.add_argument("--stages", required=True, metavar="ADDR,...")
    h.add_argument("--auth", default=None, metavar="DIR")
    h.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for each stage")
    h.add_argument("--json", action="store_true", help="print one JSON line")
    k = sub.add_parser("keys", help="CURVE keys for authenticated, encrypted links")
    ksub = k.add_subparsers(dest="keys_command", required=True, parser_class=Parser)
    ki = ksub.add_parser("init", help="write a daemon keypair, a coordinator keypair and an allow-list")
    ki.add_argument("--dir", required=True)
    ki.add_argument("--force", action="store_true", help="replace existing keys")


def cmd_stage(args) -> int:
    import signal

    from transport.daemon import StageDaemon

    from ...compose.specs import check_address
    from ...compose.stages import check_backend, load_stage, resolve_dtype

    check_backend(args.backend)
    check_dtype(args.dtype, allow_auto=True)
    layers = parse_layer_range(args.layers) if args.layers else None
    # without --model, the weights come from the coordinator (over the link it connects on)
    model_dir = resolve_model_dir(args.model) if args.model else None
    if model_dir is None and layers:
        raise UserError("--layers needs --model: a daemon without one is given its layers, and their weights, "
                        "by its coordinator")
    dtype = resolve_dtype(args.backend, model_dir, args.dtype, args.device) if model_dir else args.dtype
    common = dict(device=args.device, dtype=dtype, threads=args.threads)
    load = functools.partial(load_stage, args.backend, **common, kv_tokens=args.kv_tokens,
                             compile=args.compile, max_seqs=args.max_seqs, max_call_tokens=args.max_call_tokens)
    # calibration times eager layers even with --compile: a conservative plan, and no compile at start-up;
    # a Hub snapshot without the timed layers' files is not made to fetch them (the planner assumes the mean)
    probe = functools.partial(load_stage, args.backend, **common) if model_dir and _can_calibrate(model_dir) else None
    peers = tuple(check_address(a) for a in filter(None, (x.strip() for x in (args.peers or "").split(","))))
    daemon = StageDaemon(args.backend, dtype, model_dir, args.listen, load, probe=probe, layers=layers,
                         max_seqs=args.max_seqs, auth_dir=args.auth, insecure=args.insecure, peers=peers)

    def stop(signum, frame):  # finish what is live, take nothing new; a second signal exits at once
        daemon.drain()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    daemon.serve()
    return 0


def _can_calibrate(model_dir: str) -> bool:
    from ...core.config import ModelConfig
    from ...core.layer_cost import calibration_layer
    from ...compose.hub import has_layers, source_of

    if source_of(model_dir) is None:
        return True
    cfg = ModelConfig.load(model_dir)
    layer, last = calibration_layer(cfg), cfg.num_hidden_layers - 1
    return has_layers(model_dir, layer, layer) and has_layers(model_dir, last, last)


def cmd_selftest(args) -> int:
    """Exit 1 if any check fails."""
    from ..selftest import run_selftest

    checks = run_selftest([args.backend] if args.backend else None, args.device, log=lambda m: print(m, flush=True))
    return 0 if all(c.ok for c in checks) else 1


def cmd_health(args) -> int:
    from transport.auth import Auth
    from transport.client import health_reports

    from ...core.stage import StageStatus
    from ...compose.specs import parse_stages_spec

    addresses = [a for a, _ in parse_stages_spec(args.stages)]
    rows = [StageStatus(address, None, error=str(r)) if isinstance(r, Exception) else StageStatus(address, r)
            for address, r in zip(addresses, health_reports(addresses, Auth.load(args.auth, "coordinator"),
                                                            args.timeout))]
    if args.json:
        print(json.dumps([r.to_json() for r in rows]))
    for s in [] if args.json else rows:
        r = s.report
        if r is None:
            print(f"{s.address}: down ({s.error})")
            continue
        layers = "none" if r.layers is None else f"{r.layers[0]}-{r.layers[1]}"
        fwd = "" if r.forward_ms is None else f", one-token forward {r.forward_ms:.1f} ms"
        print(f"{s.address}: {s.state} {r.backend} {r.device} {r.dtype} layers {layers}, "
              f"{len(r.live_sequences)} live sequences, KV {r.kv_tokens_used}/{r.kv_tokens} tokens "
              f"(+{r.kv_tokens_cached} cached, reclaimable){fwd}")
    return 0 if all(s.state == "ok" for s in rows) else 1


def cmd_keys(args) -> int:
    from pathlib import Path

    from transport.auth import init_keys

    if (Path(args.dir) / "stage.key_secret").exists() and not args.force:
        raise UserError(f"{args.dir} already holds keys (use --force to replace them)")
    d = init_keys(args.dir, force=True)
    print(f"wrote {d}/stage.key(_secret), {d}/coordinator.key(_secret) and {d}/allowed/; "
          "copy the directory to each machine and pass --auth DIR")
    return 0


COMMANDS = {"stage": cmd_stage, "health": cmd_health, "keys": cmd_keys, "selftest": cmd_selftest}
