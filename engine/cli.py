"""The `hetpipe` command line. Bad input: one line on stderr and exit code 2, never a traceback."""

from __future__ import annotations

import argparse
import json
import os
import sys

from .errors import StageFailure, UserError
from .stage import DTYPES

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors: one line, exit 2
        raise UserError(f"{self.prog}: {message}")


def _add_sampling(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (the default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--logprobs", type=int, default=1, help="top log-probabilities per token (N > 1 adds `top`)")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def _add_engine(p: argparse.ArgumentParser) -> None:
    p.add_argument("--inflight", type=int, default=None,
                   help="micro-batches in flight across remote stages (1: no overlap; default: one per stage)")
    p.add_argument("--max-seqs", type=int, default=256, help="sequences running at once")
    p.add_argument("--max-queue", type=int, default=1024, help="requests waiting beyond that; more are refused")
    p.add_argument("--max-batch-tokens", type=int, default=512, help="tokens per micro-batch (prefill chunk size)")


def _add_remote(p: argparse.ArgumentParser) -> None:
    p.add_argument("--auth", default=None, metavar="DIR",
                   help="CURVE keys from `hetpipe keys init` (encrypted, allow-listed)")
    p.add_argument("--recovery-timeout", type=float, default=30.0,
                   help="seconds to wait for a lost stage (or a standby) to come back before failing requests")
    p.add_argument("--standby", action="append", default=[], metavar="ADDR",
                   help="a spare stage daemon that takes over a lost stage's layers (repeatable)")


def _add_compile(p: argparse.ArgumentParser) -> None:
    p.add_argument("--compile", action="store_true",
                   help="with --local: torch.compile torch stages (faster decode; minutes to compile)")


def _engine_opts(args) -> dict:
    for name in ("max_seqs", "max_queue", "max_batch_tokens"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1")
    return dict(inflight=args.inflight, max_seqs=args.max_seqs, max_queue=args.max_queue,
                max_batch_tokens=args.max_batch_tokens)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="hetpipe", description="Run one LLM split across MLX and PyTorch stages.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    f = sub.add_parser("fetch", help="download and import a known model (default: smollm2)")
    f.add_argument("name", nargs="?", default="smollm2")
    f.add_argument("--out", default=None, help="directory (default: ~/.cache/hetpipe/models/NAME)")

    g = sub.add_parser("import-gguf", help="import a Llama-family GGUF into a Hugging Face layout directory")
    g.add_argument("file")
    g.add_argument("--out", required=True)

    gen = sub.add_parser("generate", help="generate text through a pipeline of stages")
    gen.add_argument("prompt")
    gen.add_argument("--model", default=None, help="model directory (default: the fetched smollm2)")
    where = gen.add_mutually_exclusive_group(required=True)
    where.add_argument("--local", metavar="SPEC",
                       help="in-process stages: mlx:0-14,torch:15-29, or backends alone (torch, mlx,torch)")
    where.add_argument("--stages", metavar="ADDR[=FIRST-LAST],...",
                       help="stage daemons in pipeline order; without ranges a planner splits by measured speed")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt as a user turn of the chat template")
    gen.add_argument("--dtype", default="float32", help=f"one of {', '.join(DTYPES)}")
    gen.add_argument("--device", default=None, help="torch: cuda, mps or cpu; mlx: gpu or cpu (default: best)")
    gen.add_argument("--json", action="store_true", help="print one JSON line instead of streaming text")
    gen.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for a stage's answer")
    _add_sampling(gen)
    _add_engine(gen)
    _add_remote(gen)
    _add_compile(gen)

    st = sub.add_parser("stage", help="serve a stage daemon over ZeroMQ")
    st.add_argument("--backend", required=True, help="mlx or torch")
    st.add_argument("--model", default=None, help="this machine's copy of the model directory")
    st.add_argument("--listen", default="tcp://127.0.0.1:5555", help="address to bind (port 0: any free port)")
    st.add_argument("--device", default=None)
    st.add_argument("--dtype", default="float32", help=f"one of {', '.join(DTYPES)}")
    st.add_argument("--threads", type=int, default=None, help="CPU threads for the backend")
    st.add_argument("--layers", default=None, metavar="FIRST-LAST", help="load these layers at start")
    st.add_argument("--kv-tokens", type=int, default=None,
                    help="KV cache budget in tokens, all sequences together (default: half the free memory)")
    st.add_argument("--max-seqs", type=int, default=None, help="live sequences at once (default: no limit)")
    st.add_argument("--max-call-tokens", type=int, default=8192, help="tokens in one forward call")
    st.add_argument("--auth", default=None, metavar="DIR", help="accept only clients whose keys DIR/allowed holds")
    st.add_argument("--insecure", action="store_true",
                    help="allow listening on a non-loopback address without --auth")
    st.add_argument("--compile", action="store_true",
                    help="torch: torch.compile the layers (faster decode; minutes to compile on a small CPU)")

    b = sub.add_parser("bench", help="serving under load (default), per-backend speed, or pipeline overhead",
                       description="hetpipe bench [serving] --local|--stages ...: throughput and latency with N "
                       "concurrent clients. hetpipe bench backends: prefill/decode speed of each backend and "
                       "dtype on one layer range. hetpipe bench pipeline: one split in-process vs over ZeroMQ, "
                       "torch+torch vs mlx+torch. The last two write JSON, Markdown and PNG under --out.")
    b.add_argument("suite", nargs="?", default="serving", choices=["serving", "backends", "pipeline"])
    b.add_argument("--model", default=None, help="model directory (default: the fetched smollm2)")
    where = b.add_mutually_exclusive_group()
    where.add_argument("--local", metavar="SPEC", help="in-process stages, as for generate")
    where.add_argument("--stages", metavar="ADDR[=FIRST-LAST],...", help="stage daemons, as for generate")
    b.add_argument("--concurrency", type=int, default=1, help="clients, each keeping one request going")
    b.add_argument("--requests", type=int, default=None, help="requests in all (default: 4 per client)")
    b.add_argument("--max-tokens", type=int, default=64, help="tokens generated per request (EOS ignored)")
    b.add_argument("--prompt-len", type=int, default=32, help="prompt tokens per request")
    _add_engine(b)
    b.add_argument("--dtype", default="float32", help=f"one of {', '.join(DTYPES)}")
    b.add_argument("--device", default=None)
    b.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for a stage's answer")
    b.add_argument("--json", action="store_true", help="print one JSON line")
    _add_remote(b)
    _add_compile(b)
    b.add_argument("--out", default="bench-results", help="backends/pipeline: where JSON, Markdown and PNG go")
    b.add_argument("--layers", default=None, metavar="FIRST-LAST", help="backends: layer range (default: all)")
    b.add_argument("--dtypes", default="float32,bfloat16", help="backends: dtypes to time")
    b.add_argument("--split", type=int, default=None, help="pipeline: last layer of the first stage (default: half)")
    b.add_argument("--rounds", type=int, default=3, help="pipeline: alternating rounds")

    h = sub.add_parser("health", help="check each stage daemon with a real one-token forward")
    h.add_argument("--stages", required=True, metavar="ADDR,...")
    h.add_argument("--auth", default=None, metavar="DIR")
    h.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for each stage")
    h.add_argument("--json", action="store_true", help="print one JSON line")

    k = sub.add_parser("keys", help="CURVE keys for authenticated, encrypted links")
    ksub = k.add_subparsers(dest="keys_command", required=True, parser_class=_Parser)
    ki = ksub.add_parser("init", help="write a daemon keypair, a coordinator keypair and an allow-list")
    ki.add_argument("--dir", required=True)
    ki.add_argument("--force", action="store_true", help="replace existing keys")

    demo = sub.add_parser("demo", help="fetch SmolLM2, start an MLX and a torch stage daemon, chat through them")
    demo.add_argument("prompt", nargs="?", default="Explain in two sentences why the sky is blue.")
    demo.add_argument("--max-tokens", type=int, default=96)
    demo.add_argument("--dtype", default="float32")
    return p


def _model_dir(arg: str | None) -> str:
    from .fetch import default_model_dir

    if arg:
        return arg
    d = default_model_dir()
    if not d.is_dir():
        raise UserError("no --model given and the default model is not fetched (run `hetpipe fetch smollm2`)")
    return str(d)


def cmd_fetch(args) -> int:
    from .fetch import fetch

    print(fetch(args.name, args.out, progress=sys.stderr.isatty()))
    return 0


def cmd_import_gguf(args) -> int:
    from .gguf_import import import_gguf

    print(import_gguf(args.file, args.out, progress=sys.stderr.isatty()))
    return 0


def local_pipeline(model_dir: str, spec: str, dtype: str, device: str | None, compile: bool = False):
    from .config import ModelConfig
    from .partition import parse_local_spec
    from .pipeline import Pipeline
    from .stage import import_backends, load_stage

    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    cfg = ModelConfig.load(model_dir)
    specs = parse_local_spec(spec, cfg.num_hidden_layers)
    if device and len({s.backend for s in specs}) > 1:
        raise UserError("--device applies to one backend; with mixed backends leave it out")
    if len({s.backend for s in specs}) > 1:
        # two thread pools in one process: torch's OpenMP workers must sleep, not spin, while
        # MLX/OpenBLAS runs (measured: 2x faster mixed decode on 2 cores). Read when torch loads.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        # and OpenBLAS's workers stop spinning after ~2^4 cycles instead of ~2^28 (read at its load)
        os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")
    import_backends({s.backend for s in specs})
    return Pipeline([load_stage(s.backend, model_dir, s.first, s.last, device=device, dtype=dtype, compile=compile)
                     for s in specs])


def remote_pipeline(model_dir: str, spec: str, timeout: float, auth_dir: str | None = None, standby=(),
                    recovery_timeout: float = 30.0):
    from transport.auth import Auth
    from transport.client import connect_pipeline

    from .config import ModelConfig

    if recovery_timeout < 0:
        raise UserError("--recovery-timeout must be >= 0")
    cfg = ModelConfig.load(model_dir)
    return connect_pipeline(model_dir, spec, cfg.num_hidden_layers, timeout, log=lambda m: print(m, file=sys.stderr),
                            auth=Auth.load(auth_dir, "coordinator"), standby=standby,
                            recovery_timeout_s=recovery_timeout)


def cmd_stage(args) -> int:
    import signal

    from transport.daemon import StageDaemon

    from .partition import StageSpec

    layers = _layer_range(args.layers) if args.layers else None
    StageSpec(args.backend, *(layers or (0, 0)))  # validates the backend name
    if args.dtype not in DTYPES:
        raise UserError(f"unknown dtype {args.dtype!r}; choose from {', '.join(DTYPES)}")
    for name in ("kv_tokens", "max_seqs", "max_call_tokens"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1")
    daemon = StageDaemon(args.backend, _model_dir(args.model), args.listen, device=args.device, dtype=args.dtype,
                         threads=args.threads, layers=layers, kv_tokens=args.kv_tokens, max_seqs=args.max_seqs,
                         max_call_tokens=args.max_call_tokens, auth_dir=args.auth, insecure=args.insecure,
                         compile=args.compile)

    def stop(signum, frame):  # finish what is live, take nothing new; a second signal exits at once
        daemon.drain()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    daemon.serve()
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(args.prompt, args.max_tokens, args.dtype)


def _pipeline(args, model_dir: str):
    if args.local:
        return local_pipeline(model_dir, args.local, args.dtype, args.device, args.compile)
    return remote_pipeline(model_dir, args.stages, args.timeout, args.auth, args.standby, args.recovery_timeout)


def cmd_bench(args) -> int:
    if args.suite != "serving":
        return cmd_bench_suite(args)
    from .bench import KEYS, format_serving, run_serving
    from .generate import Generator

    if not (args.local or args.stages):
        raise UserError("bench: give --local SPEC or --stages ADDR,... (or a suite: backends, pipeline)")
    model_dir = _model_dir(args.model)
    opts = _engine_opts(args)
    gen = Generator(model_dir, _pipeline(args, model_dir), **opts)
    try:
        r = run_serving(gen, concurrency=args.concurrency, requests=args.requests or 4 * max(args.concurrency, 1),
                        max_tokens=args.max_tokens, prompt_len=args.prompt_len)
    finally:
        gen.close()
    if args.json:
        print(json.dumps({**{k: r[k] for k in KEYS}, **{k: v for k, v in r.items() if k not in KEYS}}))
    else:
        print(format_serving(r))
    return 0


def cmd_health(args) -> int:
    from transport.auth import Auth
    from transport.client import parse_stages_spec
    from transport.health import health

    addresses = [a for a, _ in parse_stages_spec(args.stages)]
    report = health(addresses, Auth.load(args.auth, "coordinator"), args.timeout)
    if args.json:
        print(json.dumps(report))
    else:
        for r in report:
            if r["state"] == "down":
                print(f"{r['address']}: down ({r['error']})")
                continue
            layers = "none" if r["layers"] is None else f"{r['layers'][0]}-{r['layers'][1]}"
            fwd = "" if r["forward_ms"] is None else f", one-token forward {r['forward_ms']:.1f} ms"
            print(f"{r['address']}: {r['state']} {r['backend']} {r['device']} {r['dtype']} layers {layers}, "
                  f"{r['live_sequences']} live sequences, KV {r['kv_tokens_used']}/{r['kv_tokens']} tokens{fwd}")
    return 0 if all(r["state"] == "ok" for r in report) else 1


def cmd_keys(args) -> int:
    from transport.auth import init_keys

    d = init_keys(args.dir, args.force)
    print(f"wrote {d}/stage.key(_secret), {d}/coordinator.key(_secret) and {d}/allowed/; "
          "copy the directory to each machine and pass --auth DIR")
    return 0


def cmd_bench_suite(args) -> int:
    from pathlib import Path

    from . import bench_suites as S
    from .config import ModelConfig

    model_dir = _model_dir(args.model)
    log = (lambda m: print(m, file=sys.stderr)) if args.json else print
    out = Path(args.out)
    if args.suite == "backends":
        layers = _layer_range(args.layers) if args.layers else None
        dtypes = [d for d in args.dtypes.split(",") if d]
        for d in dtypes:
            if d not in DTYPES:
                raise UserError(f"unknown dtype {d!r}; choose from {', '.join(DTYPES)}")
        data = S.run_backends(model_dir, layers, dtypes, args.prompt_len, args.max_tokens, log)
        paths = S.write_outputs(out, "backends", data, S.backends_table(data), S.backends_plot)
    else:
        n = ModelConfig.load(model_dir).num_hidden_layers
        if args.rounds < 1:
            raise UserError("--rounds must be at least 1")
        data = S.run_pipeline(model_dir, (n // 2 - 1) if args.split is None else args.split, args.dtype,
                              args.rounds, args.max_tokens, log)
        paths = S.write_outputs(out, "pipeline", data, S.pipeline_table(data), S.pipeline_plot)
    if args.json:
        print(json.dumps(data))
    else:
        print(paths[1].read_text())
        print("wrote " + ", ".join(map(str, paths)))
    return 0


def _layer_range(text: str) -> tuple[int, int]:
    try:
        a, _, b = text.partition("-")
        return int(a), int(b or a)
    except ValueError:
        raise UserError(f"bad layer range {text!r} (want FIRST-LAST)") from None


def cmd_generate(args) -> int:
    from .generate import Generator
    from .sampling import SamplingParams

    model_dir = _model_dir(args.model)
    sampling = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                              repetition_penalty=args.repetition_penalty, seed=args.seed, logprobs=args.logprobs)
    gen = Generator(model_dir, _pipeline(args, model_dir), **_engine_opts(args))
    opts = dict(chat=args.chat, max_tokens=args.max_tokens, sampling=sampling, stop=args.stop)
    if args.json:
        print(json.dumps(gen.generate(args.prompt, **opts).to_json()))
        return 0
    for piece in gen.stream(args.prompt, **opts):
        sys.stdout.write(piece.text)
        sys.stdout.flush()
    t = gen.last_timing
    sys.stdout.write("\n")
    print(f"[{t.tokens} tokens, ttft {t.ttft_ms:.0f} ms, {t.decode_tokens_per_s:.1f} tokens/s]", file=sys.stderr)
    return 0


COMMANDS = {"fetch": cmd_fetch, "import-gguf": cmd_import_gguf, "generate": cmd_generate, "stage": cmd_stage,
            "bench": cmd_bench, "health": cmd_health, "keys": cmd_keys, "demo": cmd_demo}


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return COMMANDS[args.command](args)
    except UserError as e:
        print(f"hetpipe: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except StageFailure as e:
        print(f"hetpipe: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("hetpipe: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


def entry() -> None:
    """The `hetpipe` program: on tcmalloc where the system has it (see `allocator`), then `main`."""
    from . import allocator

    allocator.reexec()
    sys.exit(main())


if __name__ == "__main__":
    entry()
