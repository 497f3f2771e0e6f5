"""`hetpipe bench SUITE`: serving under load, the prefix cache, each backend's speed, the pipeline's
overhead, weight delivery, hostile requests, tool calls and speculative decoding."""

from __future__ import annotations

import argparse
import json
import sys

from ...core.errors import UserError
from ...core.partition import parse_layer_range
from ...core.shapes import SHAPES
from ...core.tensors import AUTO, DTYPES, check_dtype
from .common import Parser, add_pipeline, count, generator, resolve_model_dir

SUITES = ("serving", "prefix", "backends", "pipeline", "delivery", "hostile", "tools", "spec")


BENCH_DESCRIPTION = (
    "hetpipe bench [serving] --local|--stages ...: throughput and latency with N concurrent clients. hetpipe bench "
    "prefix: turn-2 TTFT with and without the prefix cache. hetpipe bench backends: prefill/decode speed of each "
    "backend and dtype on one layer range. hetpipe bench pipeline: one split in-process vs over ZeroMQ, torch+torch "
    "vs mlx+torch. The last two write JSON, Markdown and PNG under --out. hetpipe bench delivery: weights sent to a "
    "daemon without --model against a raw ZeroMQ transfer. hetpipe bench hostile --url URL: malformed, extreme and "
    "slow requests against a running server. hetpipe bench tools: decode time per token of a required call of 8 "
    "tools, against the same request without. hetpipe bench spec: one stream with and without speculative decoding.")


def add_parsers(sub) -> None:
    b = sub.add_parser("bench", help="serving under load, per-backend speed, or pipeline overhead",
                       description=BENCH_DESCRIPTION)
    suites = b.add_subparsers(dest="suite", required=True, parser_class=Parser)
    s = suites.add_parser("serving", help="throughput and latency with concurrent clients (the default)")
    add_pipeline(s, required=False)
    s.add_argument("--url", default=None, help="load a running `hetpipe serve` at URL instead (same keys)")
    s.add_argument("--api-key", default=None, help="with --url: the server's API key")
    s.add_argument("--concurrency", type=count, default=1, help="clients, each keeping one request going")
    s.add_argument("--requests", type=count, default=None, help="requests in all (default: 4 per client)")
    s.add_argument("--max-tokens", type=count, default=64, help="tokens generated per request (EOS ignored)")
    s.add_argument("--prompt-len", type=count, default=32, help="prompt tokens per request")
    s.add_argument("--json", action="store_true", help="print one JSON line")
    x = suites.add_parser("prefix", help="turn 2 of a chat: time to first token with and without the prefix cache")
    add_pipeline(x, required=True)
    x.add_argument("--history", type=int, default=800, help="tokens of shared history (the system message)")
    x.add_argument("--rounds", type=count, default=4, help="chats timed with the cache, and as many without")
    x.add_argument("--max-tokens", type=count, default=16, help="tokens of turn 1's answer")
    x.add_argument("--json", action="store_true", help="print one JSON line")
    k = suites.add_parser("backends", help="prefill and decode speed of each backend and dtype")
    k.add_argument("--model", default=None, help="model directory (default: the fetched smollm2)")
    k.add_argument("--shape", default=None, choices=sorted(SHAPES),
                   help="instead of a model: random weights at these widths, made in memory, a few layers and the head")
    k.add_argument("--layers", default=None, metavar="FIRST-LAST|N",
                   help="layer range (default: all); with --shape, how many layers (default 2)")
    k.add_argument("--dtypes", default="float32,bfloat16", help="dtypes to time")
    k.add_argument("--backends", default=None, metavar="mlx,torch", help="backends to time (default: every one here)")
    k.add_argument("--quant", default="4:32,8:32", metavar="BITS:GROUP,...",
                   help="also time the model quantized at these schemes ('' for none; made once, kept)")
    k.add_argument("--prompt-len", type=count, default=32, help="prompt tokens of the prefill timed")
    k.add_argument("--max-tokens", type=count, default=64, help="tokens decoded per run")
    k.add_argument("--out", default="bench-results", help="where backends.json, .md and .png go")
    k.add_argument("--json", action="store_true", help="print the rows as JSON")
    pl = suites.add_parser("pipeline", help="one split in-process and over ZeroMQ, torch+torch and mlx+torch")
    pl.add_argument("--model", default=None, help="model directory (default: the fetched smollm2)")
    pl.add_argument("--split", type=int, default=None, help="last layer of the first stage (default: half)")
    pl.add_argument("--dtype", default=AUTO, help=f"auto or one of {', '.join(DTYPES)}")
    pl.add_argument("--rounds", type=count, default=3, help="alternating rounds")
    pl.add_argument("--max-tokens", type=count, default=64, help="tokens decoded per run")
    pl.add_argument("--out", default="bench-results", help="where pipeline.json, .md and .png go")
    pl.add_argument("--json", action="store_true", help="print the result as JSON")
    dl = suites.add_parser("delivery", help="weights over the LAN to a daemon without --model, against raw ZeroMQ")
    dl.add_argument("--model", default=None, help="model directory (default: the fetched smollm2)")
    dl.add_argument("--layers", default=None, metavar="FIRST-LAST", help="layer range delivered (default: all)")
    dl.add_argument("--backend", default="torch", choices=("torch", "mlx"), help="the receiving daemon's backend")
    dl.add_argument("--rounds", type=count, default=3, help="rounds, each a fresh daemon and a raw transfer")
    dl.add_argument("--json", action="store_true", help="print one JSON line")
    ho = suites.add_parser("hostile", help="malformed, extreme and slow requests against a running server")
    ho.add_argument("--url", required=True, help="the running `hetpipe serve`")
    ho.add_argument("--api-key", default=None, help="the server's API key")
    ho.add_argument("--pid", type=int, default=None, help="the server's process id: report its RSS before and after")
    ho.add_argument("--mutated", type=int, default=2000, help="mutated request bodies to send")
    ho.add_argument("--no-framing", dest="framing", action="store_false",
                    help="skip the raw-socket cases (two of them wait out the server's read timeout)")
    ho.add_argument("--skip", action="append", default=[], metavar="TEXT",
                    help="leave out the named cases whose names contain TEXT (repeatable)")
    ho.add_argument("--json", action="store_true", help="print one JSON line")
    _add_bench_more(suites)


def _add_bench_more(suites) -> None:
    sp = suites.add_parser("spec", help="one stream with and without speculative decoding (code edit, summary, chat)")
    add_pipeline(sp, required=True)
    sp.add_argument("--rounds", type=count, default=3, help="rounds, each every prompt both ways")
    sp.add_argument("--max-tokens", type=count, default=128, help="tokens per run (end tokens ignored)")
    sp.add_argument("--link-delay-ms", type=float, default=0.0,
                    help="with --stages on loopback: hold every byte to and between the stages this long (a relay)")
    sp.add_argument("--json", action="store_true", help="print one JSON line")
    tl = suites.add_parser("tools", help="decode time per token of a required call of 8 tools, against none")
    add_pipeline(tl, required=True)
    tl.add_argument("--rounds", type=count, default=5, help="rounds, each a call and two unconstrained runs")
    tl.add_argument("--json", action="store_true", help="print one JSON line")


def cmd_bench(args) -> int:
    stderr = lambda m: print(m, file=sys.stderr)  # noqa: E731
    if args.suite == "hostile":
        from ..bench.hostile import format_hostile, run_hostile

        r = run_hostile(args.url, api_key=args.api_key, pid=args.pid, mutated=args.mutated, framing=args.framing,
                        skip=tuple(args.skip), log=stderr)
        print(json.dumps(r) if args.json else format_hostile(r))
    elif args.suite == "serving":
        _bench_serving(args, resolve_model_dir(args.model))
    elif args.suite == "delivery":
        from ..bench.delivery import format_delivery, run_delivery

        layers = parse_layer_range(args.layers) if args.layers else None
        r = run_delivery(resolve_model_dir(args.model), layers, args.rounds, args.backend, log=stderr)
        print(json.dumps(r) if args.json else format_delivery(r))
    elif args.suite == "spec":
        _bench_spec(args)
    elif args.suite == "tools":
        from ..bench.tools import format_tools, run_tools

        with generator(args) as gen:
            r = run_tools(gen, rounds=args.rounds)
        print(json.dumps(r) if args.json else format_tools(r))
    elif args.suite == "prefix":
        from ..bench.prefix import format_prefix, run_prefix

        if not args.prefix_cache:
            raise UserError("bench prefix times the prefix cache against none: --no-prefix-cache leaves nothing to time")
        uncached = argparse.Namespace(**{**vars(args), "prefix_cache": False})
        with generator(args) as cached, generator(uncached) as bare:
            r = run_prefix(cached, bare, history=args.history, rounds=args.rounds, max_tokens=args.max_tokens)
        print(json.dumps(r) if args.json else format_prefix(r))
    elif getattr(args, "shape", None):
        if args.model:
            raise UserError("--shape times random weights instead of a model: give one or the other")
        _bench_report(args, None)
    else:
        _bench_report(args, resolve_model_dir(args.model))
    return 0


def _relayed(spec: str, delay_ms: float, relays: list) -> str:
    """`--stages` with each address replaced by a relay's in front of it (`bench.relay`)."""
    from ..bench.relay import start_relay

    addrs = []
    for entry in spec.split(","):
        addr, eq, rng = entry.partition("=")
        try:
            proc, through = start_relay(addr, delay_ms)
        except ValueError as e:
            raise UserError(str(e)) from None
        relays.append(proc)
        addrs.append(through + eq + rng)
    return ",".join(addrs)


def _bench_spec(args) -> None:
    from ..bench.spec import format_spec, run_spec

    relays = []
    try:
        if args.link_delay_ms:
            if not args.stages or args.link_delay_ms < 0:
                raise UserError("--link-delay-ms puts relays between stage daemons: give --stages (loopback) and a "
                                "delay of at least 0")
            args.stages = _relayed(args.stages, args.link_delay_ms, relays)
            if args.draft_stages:  # the draft model's daemon is across a link too
                args.draft_stages = _relayed(args.draft_stages, args.link_delay_ms, relays)
        with generator(args) as gen:
            r = run_spec(gen, rounds=args.rounds, max_tokens=args.max_tokens, link_delay_ms=args.link_delay_ms)
    finally:
        for p in relays:
            p.kill()
    print(json.dumps(r) if args.json else format_spec(r))


def _bench_serving(args, model_dir) -> None:
    from ..bench.serving import KEYS, format_serving, run_serving

    if (args.url is not None) + (args.local is not None) + (args.stages is not None) != 1:
        raise UserError("bench serving: give one of --url, --local or --stages")
    requests = args.requests or 4 * args.concurrency
    if args.url is not None:
        from ..bench.http import format_http, run_http

        r = run_http(args.url, model_dir, api_key=args.api_key, concurrency=args.concurrency, requests=requests,
                     max_tokens=args.max_tokens, prompt_len=args.prompt_len)
        print(json.dumps(r) if args.json else format_http(r))
        return
    with generator(args) as gen:
        r = run_serving(gen, concurrency=args.concurrency, requests=requests, max_tokens=args.max_tokens,
                        prompt_len=args.prompt_len)
    print(json.dumps({**{k: r[k] for k in KEYS}, **{k: v for k, v in r.items() if k not in KEYS}})
          if args.json else format_serving(r))


def _bench_report(args, model_dir) -> None:
    """`bench backends` and `bench pipeline`: JSON, Markdown and PNG under --out."""
    from pathlib import Path

    from ..bench import report

    log = (lambda m: print(m, file=sys.stderr)) if args.json else print
    if args.suite == "backends":
        from ..bench import backends as B
        from ...compose.stages import check_backend

        dtypes = [check_dtype(d) for d in args.dtypes.split(",") if d]
        backends = [check_backend(b) for b in args.backends.split(",") if b] if args.backends else None
        if args.shape:
            n = args.layers or "2"
            if not n.isdigit():
                raise UserError("with --shape, --layers is how many layers (1 to 8)")
            data = B.run_backends(None, None, dtypes, args.prompt_len, args.max_tokens, log,
                                  quant=_parse_quant(args.quant), shape=args.shape, shape_layers=int(n),
                                  backends=backends)
        else:
            layers = parse_layer_range(args.layers) if args.layers else None
            data = B.run_backends(model_dir, layers, dtypes, args.prompt_len, args.max_tokens, log,
                                  quant=_parse_quant(args.quant), backends=backends)
        paths = report.write_outputs(Path(args.out), "backends", data, B.backends_table(data), B.backends_plot)
    else:
        from ...core.config import ModelConfig
        from ..bench import pipeline as PL

        n = ModelConfig.load(model_dir).num_hidden_layers
        data = PL.run_pipeline(model_dir, (n // 2 - 1) if args.split is None else args.split,
                               check_dtype(args.dtype, allow_auto=True), args.rounds, args.max_tokens, log)
        paths = report.write_outputs(Path(args.out), "pipeline", data, PL.pipeline_table(data), PL.pipeline_plot)
    if args.json:
        print(json.dumps(data))
    else:
        print(paths[1].read_text())
        print("wrote " + ", ".join(map(str, paths)))


def _parse_quant(text: str) -> tuple[tuple[int, int], ...]:
    from ...core.quant import check_scheme

    out = []
    for item in filter(None, text.split(",")):
        bits, _, group = item.partition(":")
        if not (bits.isdigit() and group.isdigit()):
            raise UserError(f"--quant: expected BITS:GROUP (e.g. 4:32), got {item!r}")
        check_scheme(int(bits), int(group), "--quant")
        out.append((int(bits), int(group)))
    return tuple(out)


COMMANDS = {"bench": cmd_bench}
