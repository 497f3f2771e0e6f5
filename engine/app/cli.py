"""The `hetpipe` command line: it parses, then calls the API. Bad input: one line on stderr and
exit code 2, never a traceback; a stage that fails: one line and exit code 1."""

from __future__ import annotations

import argparse
import functools
import json
import sys

from ..core.errors import StageFailure, UserError
from ..core.partition import parse_layer_range
from ..core.shapes import SHAPES
from ..core.tensors import AUTO, DTYPES, check_dtype

EXIT_USAGE = 2
BENCH_SUITES = ("serving", "prefix", "backends", "pipeline", "delivery", "hostile", "tools", "spec")


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


def _add_pipeline(p: argparse.ArgumentParser, required: bool) -> None:
    """Where the stages are, and the options of both kinds of pipeline."""
    p.add_argument("--model", default=None, help="model directory (default: the fetched smollm2)")
    where = p.add_mutually_exclusive_group(required=required)
    where.add_argument("--local", metavar="SPEC",
                       help="in-process stages: mlx:0-14,torch:15-29, or backends alone (torch, mlx,torch)")
    where.add_argument("--stages", metavar="ADDR[=FIRST-LAST],...",
                       help="stage daemons in pipeline order; without ranges a planner splits by measured speed")
    p.add_argument("--dtype", default=AUTO, help=f"with --local: auto (the default: the checkpoint's own dtype where "
                   f"the device computes it natively, else float32) or one of {', '.join(DTYPES)}")
    p.add_argument("--device", default=None, help="with --local: torch: cuda, mps or cpu; mlx: gpu or cpu")
    p.add_argument("--compile", action="store_true",
                   help="with --local: torch.compile torch stages (faster decode; compiled once, then cached)")
    p.add_argument("--kv-tokens", type=int, default=None,
                   help="with --local: KV cache tokens per stage (default: the memory left after the weights, "
                        "less 10%% of the device's)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for a stage's answer")
    p.add_argument("--auth", default=None, metavar="DIR",
                   help="CURVE keys from `hetpipe keys init` (encrypted, allow-listed)")
    p.add_argument("--standby", action="append", default=[], metavar="ADDR",
                   help="a spare stage daemon that takes over a lost stage's layers (repeatable)")
    # the engine's options
    p.add_argument("--inflight", type=int, default=None,
                   help="micro-batches in flight across remote stages (1: no overlap; default: one per stage)")
    p.add_argument("--max-seqs", type=int, default=256, help="sequences running at once")
    p.add_argument("--max-queue", type=int, default=1024, help="requests waiting beyond that; more are refused")
    p.add_argument("--max-batch-tokens", type=int, default=512, help="tokens per micro-batch (prefill chunk size)")
    p.add_argument("--recovery-timeout", type=float, default=30.0,
                   help="seconds for a lost stage (or a standby) to come back and load before requests fail")
    p.add_argument("--speculative", default=None, metavar="ngram|draft:MODEL",
                   help="speculative decoding: drafts verified several tokens a pass, from prompt lookup (ngram) or a "
                        "smaller model of the same vocabulary (draft:MODEL); greedy outputs are unchanged, sampled "
                        "ones keep their distribution")
    p.add_argument("--num-draft-tokens", type=int, default=None, metavar="K",
                   help="with --speculative: draft tokens per step, at most (default 8; adapts per sequence)")
    p.add_argument("--draft-stages", default=None, metavar="ADDR",
                   help="with --speculative draft:MODEL: the stage daemon that runs the draft model (all its layers); "
                        "by default it runs in this process")
    p.add_argument("--no-prefix-cache", dest="prefix_cache", action="store_false",
                   help="prefill every prompt in full (by default the KV blocks of shared prompt prefixes are reused)")


def _add_generate(sub) -> None:
    gen = sub.add_parser("generate", help="generate text through a pipeline of stages")
    gen.add_argument("prompt", nargs="?", default=None)
    gen.add_argument("--prompt-ids", default=None, metavar="ID,ID,...",
                     help="raw token ids in place of PROMPT (no tokenizer, no chat template)")
    gen.add_argument("--ignore-eos", action="store_true", help="generate --max-tokens tokens whatever is sampled")
    _add_pipeline(gen, required=True)
    gen.add_argument("--chat", action="store_true", help="wrap the prompt as a user turn of the chat template")
    gen.add_argument("--json", action="store_true", help="print one JSON line instead of streaming text")
    _add_sampling(gen)


def _add_serve(sub) -> None:
    sv = sub.add_parser("serve", help="serve the OpenAI HTTP API (and a web page) over a pipeline")
    _add_pipeline(sv, required=True)
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on")
    sv.add_argument("--port", type=int, default=8000, help="port (0: any free port; the line printed says which)")
    key = sv.add_mutually_exclusive_group()
    key.add_argument("--api-key", default=None, help="clients must send `Authorization: Bearer KEY`")
    key.add_argument("--api-key-file", default=None, metavar="F", help="the API key, read from a file")
    sv.add_argument("--served-model-name", default=None, metavar="NAME",
                    help="the model id clients ask for (default: the model directory's name)")
    sv.add_argument("--cors-origin", action="append", default=[], metavar="O",
                    help="an origin whose pages may call the API (repeatable)")
    sv.add_argument("--insecure", action="store_true", help="allow a non-loopback --host without an API key")
    sv.add_argument("--max-request-bytes", type=int, default=8 << 20, metavar="N",
                    help="the largest request body (a larger one is refused with 413 before it is read)")
    sv.add_argument("--read-timeout", type=float, default=30.0, metavar="S",
                    help="seconds for a request's headers, and then its body, to arrive (slower: closed, or 408)")


def _add_stage(sub) -> None:
    st = sub.add_parser("stage", help="serve a stage daemon over ZeroMQ")
    st.add_argument("--backend", required=True, help="mlx or torch")
    st.add_argument("--model", default=None, help="this machine's copy of the model (a directory, a .gguf file or a "
                    "Hub id); without it, the coordinator sends its layers' weights")
    st.add_argument("--listen", default="tcp://127.0.0.1:5555", help="address to bind (port 0: any free port)")
    st.add_argument("--device", default=None)
    st.add_argument("--dtype", default=AUTO, help=f"auto (the default: the checkpoint's own dtype where the device "
                    f"computes it natively, else float32) or one of {', '.join(DTYPES)}")
    st.add_argument("--threads", type=int, default=None, help="CPU threads for the backend")
    st.add_argument("--layers", default=None, metavar="FIRST-LAST", help="load these layers at start")
    st.add_argument("--kv-tokens", type=int, default=None,
                    help="KV cache budget in tokens, all sequences together (default: the memory left after the "
                         "weights, less 10%% of the device's)")
    st.add_argument("--max-seqs", type=int, default=None, help="live sequences at once (default: no limit)")
    st.add_argument("--max-call-tokens", type=int, default=8192, help="tokens in one forward call")
    st.add_argument("--auth", default=None, metavar="DIR", help="accept only clients whose keys DIR/allowed holds")
    st.add_argument("--peers", default=None, metavar="ADDR,...",
                    help="next-stage addresses this daemon may pass hidden rows to besides the one its coordinator "
                         "assigns with the layers")
    st.add_argument("--insecure", action="store_true",
                    help="allow listening on a non-loopback address without --auth")
    st.add_argument("--compile", action="store_true",
                    help="torch: torch.compile the layers (faster decode; compiled once, then cached)")


BENCH_DESCRIPTION = (
    "hetpipe bench [serving] --local|--stages ...: throughput and latency with N concurrent clients. hetpipe bench "
    "prefix: turn-2 TTFT with and without the prefix cache. hetpipe bench backends: prefill/decode speed of each "
    "backend and dtype on one layer range. hetpipe bench pipeline: one split in-process vs over ZeroMQ, torch+torch "
    "vs mlx+torch. The last two write JSON, Markdown and PNG under --out. hetpipe bench delivery: weights sent to a "
    "daemon without --model against a raw ZeroMQ transfer. hetpipe bench hostile --url URL: malformed, extreme and "
    "slow requests against a running server. hetpipe bench tools: decode time per token of a required call of 8 "
    "tools, against the same request without. hetpipe bench spec: one stream with and without speculative decoding.")


def _add_bench(sub) -> None:
    b = sub.add_parser("bench", help="serving under load, per-backend speed, or pipeline overhead",
                       description=BENCH_DESCRIPTION)
    suites = b.add_subparsers(dest="suite", required=True, parser_class=_Parser)
    s = suites.add_parser("serving", help="throughput and latency with concurrent clients (the default)")
    _add_pipeline(s, required=False)
    s.add_argument("--url", default=None, help="load a running `hetpipe serve` at URL instead (same keys)")
    s.add_argument("--api-key", default=None, help="with --url: the server's API key")
    s.add_argument("--concurrency", type=int, default=1, help="clients, each keeping one request going")
    s.add_argument("--requests", type=int, default=None, help="requests in all (default: 4 per client)")
    s.add_argument("--max-tokens", type=int, default=64, help="tokens generated per request (EOS ignored)")
    s.add_argument("--prompt-len", type=int, default=32, help="prompt tokens per request")
    s.add_argument("--json", action="store_true", help="print one JSON line")
    x = suites.add_parser("prefix", help="turn 2 of a chat: time to first token with and without the prefix cache")
    _add_pipeline(x, required=True)
    x.add_argument("--history", type=int, default=800, help="tokens of shared history (the system message)")
    x.add_argument("--rounds", type=int, default=4, help="chats timed with the cache, and as many without")
    x.add_argument("--max-tokens", type=int, default=16, help="tokens of turn 1's answer")
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
    k.add_argument("--prompt-len", type=int, default=32, help="prompt tokens of the prefill timed")
    k.add_argument("--max-tokens", type=int, default=64, help="tokens decoded per run")
    k.add_argument("--out", default="bench-results", help="where backends.json, .md and .png go")
    k.add_argument("--json", action="store_true", help="print the rows as JSON")
    pl = suites.add_parser("pipeline", help="one split in-process and over ZeroMQ, torch+torch and mlx+torch")
    pl.add_argument("--model", default=None, help="model directory (default: the fetched smollm2)")
    pl.add_argument("--split", type=int, default=None, help="last layer of the first stage (default: half)")
    pl.add_argument("--dtype", default=AUTO, help=f"auto or one of {', '.join(DTYPES)}")
    pl.add_argument("--rounds", type=int, default=3, help="alternating rounds")
    pl.add_argument("--max-tokens", type=int, default=64, help="tokens decoded per run")
    pl.add_argument("--out", default="bench-results", help="where pipeline.json, .md and .png go")
    pl.add_argument("--json", action="store_true", help="print the result as JSON")
    dl = suites.add_parser("delivery", help="weights over the LAN to a daemon without --model, against raw ZeroMQ")
    dl.add_argument("--model", default=None, help="model directory (default: the fetched smollm2)")
    dl.add_argument("--layers", default=None, metavar="FIRST-LAST", help="layer range delivered (default: all)")
    dl.add_argument("--backend", default="torch", choices=("torch", "mlx"), help="the receiving daemon's backend")
    dl.add_argument("--rounds", type=int, default=3, help="rounds, each a fresh daemon and a raw transfer")
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
    _add_pipeline(sp, required=True)
    sp.add_argument("--rounds", type=int, default=3, help="rounds, each every prompt both ways")
    sp.add_argument("--max-tokens", type=int, default=128, help="tokens per run (end tokens ignored)")
    sp.add_argument("--link-delay-ms", type=float, default=0.0,
                    help="with --stages on loopback: hold every byte to and between the stages this long (a relay)")
    sp.add_argument("--json", action="store_true", help="print one JSON line")
    tl = suites.add_parser("tools", help="decode time per token of a required call of 8 tools, against none")
    _add_pipeline(tl, required=True)
    tl.add_argument("--rounds", type=int, default=5, help="rounds, each a call and two unconstrained runs")
    tl.add_argument("--json", action="store_true", help="print one JSON line")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="hetpipe", description="Run one LLM split across MLX and PyTorch stages.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
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
    q = sub.add_parser("quantize", help="quantize a float checkpoint directory (MLX affine; mlx-lm loads it)")
    q.add_argument("model_dir", metavar="DIR")
    q.add_argument("--out", required=True, metavar="DIR2")
    q.add_argument("--bits", type=int, default=4, choices=(4, 8))
    q.add_argument("--group-size", type=int, default=64, choices=(32, 64, 128))
    _add_generate(sub)
    _add_stage(sub)
    _add_serve(sub)
    _add_bench(sub)
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
    pn.add_argument("--context", type=int, default=None, help="tokens per sequence (default: the model's context)")
    pn.add_argument("--concurrency", type=int, default=1, help="sequences at once")
    pn.add_argument("--json", action="store_true", help="print one JSON line")
    st = sub.add_parser("selftest", help="does this machine compute what transformers computes? (every backend "
                                         "and device here)")
    st.add_argument("--backend", default=None, choices=("mlx", "torch"), help="only this backend")
    st.add_argument("--device", default=None, help="only this device (torch: cpu, cuda, mps; mlx: cpu, gpu)")
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
    demo.add_argument("--dtype", default=AUTO)
    return p


def parse_args(argv: list[str]) -> argparse.Namespace:
    # `hetpipe bench --local ...` (no suite named) is `hetpipe bench serving ...`, as it always was
    if len(argv) >= 2 and argv[0] == "bench" and argv[1] not in BENCH_SUITES and argv[1] not in ("-h", "--help"):
        argv = ["bench", "serving", *argv[1:]]
    return build_parser().parse_args(argv)


def _model_dir(arg: str | None) -> str:
    """The directory `--model` names (a directory, a .gguf file imported once, or a Hub id's snapshot:
    `fetch.resolve_model`); without it, the fetched smollm2."""
    from .fetch import default_model_dir, resolve_model

    if arg:
        return str(resolve_model(arg))
    d = default_model_dir()
    if not d.is_dir():
        raise UserError("no --model given and the default model is not fetched (run `hetpipe fetch smollm2`)")
    return str(d)


def _at_least_1(args, *names: str) -> None:
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1")


def _generator(args):
    """The pipeline the options ask for, in a Generator that owns it."""
    from ..api import Generator, connect_pipeline, local_pipeline

    from ..serving.speculative import parse_speculative

    _at_least_1(args, "inflight", "max_seqs", "max_queue", "max_batch_tokens", "kv_tokens")
    if args.recovery_timeout < 0:
        raise UserError("--recovery-timeout must be >= 0")
    speculative = parse_speculative(args.speculative, args.num_draft_tokens)
    if args.draft_stages and (speculative is None or speculative.method != "draft"):
        raise UserError("--draft-stages names where a draft model runs: it goes with --speculative draft:MODEL")
    model_dir = _model_dir(args.model)
    if args.local:
        pipeline = local_pipeline(model_dir, args.local, check_dtype(args.dtype, allow_auto=True), args.device,
                                  compile=args.compile, kv_tokens=args.kv_tokens)
    else:
        if args.kv_tokens is not None:
            raise UserError("--kv-tokens applies to --local stages; a stage daemon takes its own (hetpipe stage --kv-tokens)")
        pipeline = connect_pipeline(model_dir, args.stages, timeout_s=args.timeout, auth_dir=args.auth,
                                    standby=args.standby, log=lambda m: print(m, file=sys.stderr))
    if speculative is not None and speculative.method == "draft":
        speculative = _draft_model(speculative, model_dir, pipeline, args)
    return Generator(model_dir, pipeline, inflight=args.inflight, max_seqs=args.max_seqs, max_queue=args.max_queue,
                     max_batch_tokens=args.max_batch_tokens, recovery_timeout_s=args.recovery_timeout,
                     prefix_cache=args.prefix_cache, speculative=speculative)


def _draft_model(speculative, model_dir, pipeline, args):
    """`--speculative draft:MODEL`: the draft model on one stage of its own, its KV budget its own:
    the daemon `--draft-stages` names, else in this process (torch where it is installed, else
    MLX). The target's vocabulary is checked."""
    import dataclasses
    import importlib.util

    from ..api import connect_pipeline, local_pipeline
    from ..core.config import ModelConfig
    from ..serving.draft_model import DraftModel

    try:
        draft_dir = _model_dir(speculative.draft_model)
        if args.draft_stages:
            draft_pipe = connect_pipeline(draft_dir, args.draft_stages, timeout_s=args.timeout, auth_dir=args.auth,
                                          log=lambda m: print(m, file=sys.stderr))
        else:
            backend = "torch" if importlib.util.find_spec("torch") else "mlx"
            draft_pipe = local_pipeline(draft_dir, backend, check_dtype(args.dtype, allow_auto=True))
        try:
            draft = DraftModel(draft_pipe, draft_dir, ModelConfig.load(model_dir).vocab_size,
                               str(speculative.draft_model))
        except BaseException:
            draft_pipe.close()
            raise
    except BaseException:
        pipeline.close()
        raise
    return dataclasses.replace(speculative, draft=draft)


def _parse_quant(text: str) -> tuple[tuple[int, int], ...]:
    from ..core.quant import check_scheme

    out = []
    for item in filter(None, text.split(",")):
        bits, _, group = item.partition(":")
        if not (bits.isdigit() and group.isdigit()):
            raise UserError(f"--quant: expected BITS:GROUP (e.g. 4:32), got {item!r}")
        check_scheme(int(bits), int(group), "--quant")
        out.append((int(bits), int(group)))
    return tuple(out)


def cmd_fetch(args) -> int:
    from .fetch import KNOWN_MODELS, fetch
    from .hub import ensure_layers, fetch_meta, parse_hub_id

    hub_id = None if args.name in KNOWN_MODELS else parse_hub_id(args.name)
    if hub_id is None:
        if args.layers:
            raise UserError("--layers applies to a Hub id")
        print(fetch(args.name, args.out, progress=sys.stderr.isatty()))
        return 0
    if args.out:
        raise UserError("a Hub id is fetched into huggingface_hub's cache (HF_HOME); --out applies to known models")
    from ..core.config import ModelConfig

    model_dir = fetch_meta(*hub_id)
    first, last = parse_layer_range(args.layers) if args.layers else (0, ModelConfig.load(model_dir).num_hidden_layers - 1)
    ensure_layers(model_dir, first, last)
    print(model_dir)
    return 0


def cmd_import_gguf(args) -> int:
    from .gguf_import import import_gguf

    print(import_gguf(args.file, args.out, progress=sys.stderr.isatty(), dequantize=args.dequantize))
    return 0


def cmd_quantize(args) -> int:
    from .quantize import quantize_dir

    print(quantize_dir(args.model_dir, args.out, args.bits, args.group_size, progress=sys.stderr.isatty()))
    return 0


def _prompt(args) -> str | list[int]:
    """PROMPT, or the token ids of --prompt-ids (one of the two)."""
    if (args.prompt is None) == (args.prompt_ids is None):
        raise UserError("generate: give PROMPT or --prompt-ids, one of the two")
    if args.prompt_ids is None:
        return args.prompt
    if args.chat:
        raise UserError("generate: --chat applies a template to text; --prompt-ids are already tokens")
    try:
        ids = [int(x) for x in args.prompt_ids.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--prompt-ids: expected integers separated by commas, got {args.prompt_ids[:40]!r}") from None
    if not ids:
        raise UserError("--prompt-ids: no token ids given")
    return ids


def cmd_generate(args) -> int:
    from ..core.sampling import SamplingParams

    sampling = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                              repetition_penalty=args.repetition_penalty, seed=args.seed, logprobs=args.logprobs)
    prompt = _prompt(args)
    opts = dict(chat=args.chat, max_tokens=args.max_tokens, sampling=sampling, stop=args.stop,
                ignore_eos=args.ignore_eos)
    with _generator(args) as gen:
        if args.json:
            print(json.dumps(gen.generate(prompt, **opts).to_json()))
            return 0
        stream = gen.stream(prompt, **opts)
        for piece in stream:
            sys.stdout.write(piece.text)
            sys.stdout.flush()
        t = stream.timing
    sys.stdout.write("\n")
    print(f"[{t.tokens} tokens, ttft {t.ttft_ms:.0f} ms, {t.decode_tokens_per_s:.1f} tokens/s]", file=sys.stderr)
    return 0


def cmd_serve(args) -> int:
    from pathlib import Path

    from .server.guard import ServerLimits
    from .server.run import check_exposure, read_api_key, serve

    if not 0 <= args.port < 65536:
        raise UserError("--port must be in 0..65535")
    api_key = read_api_key(args.api_key, args.api_key_file)
    check_exposure(args.host, api_key, args.insecure)
    limits = ServerLimits(args.max_request_bytes, args.read_timeout)
    from .hub import parse_hub_id

    hub_id = parse_hub_id(args.model) if args.model else None
    name = args.served_model_name or (hub_id[0] if hub_id else Path(_model_dir(args.model)).resolve().name)
    with _generator(args) as gen:
        print("stages: " + ", ".join(f"{d.get('address', d['backend'])}={d['layers'][0]}-{d['layers'][1]} "
                                     f"({d['backend']} on {d['device']} in {d['dtype']})"
                                     for d in gen.pipeline.describe()), file=sys.stderr, flush=True)
        serve(gen, host=args.host, port=args.port, model_name=name, api_key=api_key,
              cors_origins=tuple(args.cors_origin), limits=limits)
    return 0


def cmd_stage(args) -> int:
    import signal

    from transport.daemon import StageDaemon

    from .specs import check_address
    from .stages import check_backend, load_stage, resolve_dtype

    check_backend(args.backend)
    check_dtype(args.dtype, allow_auto=True)
    _at_least_1(args, "kv_tokens", "max_seqs", "max_call_tokens", "threads")
    layers = parse_layer_range(args.layers) if args.layers else None
    # without --model, the weights come from the coordinator (over the link it connects on)
    model_dir = _model_dir(args.model) if args.model else None
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
    from ..core.config import ModelConfig
    from ..core.layer_cost import calibration_layer
    from .hub import has_layers, source_of

    if source_of(model_dir) is None:
        return True
    cfg = ModelConfig.load(model_dir)
    layer, last = calibration_layer(cfg), cfg.num_hidden_layers - 1
    return has_layers(model_dir, layer, layer) and has_layers(model_dir, last, last)


def cmd_bench(args) -> int:
    stderr = lambda m: print(m, file=sys.stderr)  # noqa: E731
    if args.suite == "hostile":
        from .bench.hostile import format_hostile, run_hostile

        r = run_hostile(args.url, api_key=args.api_key, pid=args.pid, mutated=args.mutated, framing=args.framing,
                        skip=tuple(args.skip), log=stderr)
        print(json.dumps(r) if args.json else format_hostile(r))
    elif args.suite == "serving":
        _bench_serving(args, _model_dir(args.model))
    elif args.suite == "delivery":
        from .bench.delivery import format_delivery, run_delivery

        _at_least_1(args, "rounds")
        layers = parse_layer_range(args.layers) if args.layers else None
        r = run_delivery(_model_dir(args.model), layers, args.rounds, args.backend, log=stderr)
        print(json.dumps(r) if args.json else format_delivery(r))
    elif args.suite == "spec":
        _bench_spec(args)
    elif args.suite == "tools":
        from .bench.tools import format_tools, run_tools

        with _generator(args) as gen:
            r = run_tools(gen, rounds=args.rounds)
        print(json.dumps(r) if args.json else format_tools(r))
    elif args.suite == "prefix":
        from .bench.prefix import format_prefix, run_prefix

        if not args.prefix_cache:
            raise UserError("bench prefix times the prefix cache against none: --no-prefix-cache leaves nothing to time")
        uncached = argparse.Namespace(**{**vars(args), "prefix_cache": False})
        with _generator(args) as cached, _generator(uncached) as bare:
            r = run_prefix(cached, bare, history=args.history, rounds=args.rounds, max_tokens=args.max_tokens)
        print(json.dumps(r) if args.json else format_prefix(r))
    elif getattr(args, "shape", None):
        if args.model:
            raise UserError("--shape times random weights instead of a model: give one or the other")
        _bench_report(args, None)
    else:
        _bench_report(args, _model_dir(args.model))
    return 0


def _relayed(spec: str, delay_ms: float, relays: list) -> str:
    """`--stages` with each address replaced by a relay's in front of it (`bench.relay`)."""
    from .bench.relay import start_relay

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
    from .bench.spec import format_spec, run_spec

    _at_least_1(args, "rounds", "max_tokens")
    relays = []
    try:
        if args.link_delay_ms:
            if not args.stages or args.link_delay_ms < 0:
                raise UserError("--link-delay-ms puts relays between stage daemons: give --stages (loopback) and a "
                                "delay of at least 0")
            args.stages = _relayed(args.stages, args.link_delay_ms, relays)
            if args.draft_stages:  # the draft model's daemon is across a link too
                args.draft_stages = _relayed(args.draft_stages, args.link_delay_ms, relays)
        with _generator(args) as gen:
            r = run_spec(gen, rounds=args.rounds, max_tokens=args.max_tokens, link_delay_ms=args.link_delay_ms)
    finally:
        for p in relays:
            p.kill()
    print(json.dumps(r) if args.json else format_spec(r))


def _bench_serving(args, model_dir) -> None:
    from .bench.serving import KEYS, format_serving, run_serving

    _at_least_1(args, "concurrency", "requests", "max_tokens", "prompt_len")
    if (args.url is not None) + (args.local is not None) + (args.stages is not None) != 1:
        raise UserError("bench serving: give one of --url, --local or --stages")
    requests = args.requests or 4 * args.concurrency
    if args.url is not None:
        from .bench.http import format_http, run_http

        r = run_http(args.url, model_dir, api_key=args.api_key, concurrency=args.concurrency, requests=requests,
                     max_tokens=args.max_tokens, prompt_len=args.prompt_len)
        print(json.dumps(r) if args.json else format_http(r))
        return
    with _generator(args) as gen:
        r = run_serving(gen, concurrency=args.concurrency, requests=requests, max_tokens=args.max_tokens,
                        prompt_len=args.prompt_len)
    print(json.dumps({**{k: r[k] for k in KEYS}, **{k: v for k, v in r.items() if k not in KEYS}})
          if args.json else format_serving(r))


def _bench_report(args, model_dir) -> None:
    """`bench backends` and `bench pipeline`: JSON, Markdown and PNG under --out."""
    from pathlib import Path

    from .bench import report

    log = (lambda m: print(m, file=sys.stderr)) if args.json else print
    if args.suite == "backends":
        from .bench import backends as B
        from .stages import check_backend

        _at_least_1(args, "prompt_len", "max_tokens")
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
                                  quant=_parse_quant(args.quant))
        paths = report.write_outputs(Path(args.out), "backends", data, B.backends_table(data), B.backends_plot)
    else:
        from ..core.config import ModelConfig
        from .bench import pipeline as PL

        _at_least_1(args, "rounds", "max_tokens")
        n = ModelConfig.load(model_dir).num_hidden_layers
        data = PL.run_pipeline(model_dir, (n // 2 - 1) if args.split is None else args.split,
                               check_dtype(args.dtype, allow_auto=True), args.rounds, args.max_tokens, log)
        paths = report.write_outputs(Path(args.out), "pipeline", data, PL.pipeline_table(data), PL.pipeline_plot)
    if args.json:
        print(json.dumps(data))
    else:
        print(paths[1].read_text())
        print("wrote " + ", ".join(map(str, paths)))


def cmd_plan(args) -> int:
    """Exit 0 when the plan fits; 2, with the shortfall and the bit width that would fit, when not."""
    from ..core.config import ModelConfig
    from .memory_plan import Device, format_plan, plan_memory

    _at_least_1(args, "context", "concurrency")
    from ..core.weights import checkpoint_dtype

    model_dir = _model_dir(args.model)
    cfg = ModelConfig.load(model_dir)
    measured, kv_dtype = None, "bfloat16"
    if args.devices:
        devices = [Device.parse(x) for x in args.devices.split(",") if x.strip()]
    else:
        from transport.auth import Auth
        from transport.client import health_reports

        from .specs import parse_stages_spec

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


def cmd_selftest(args) -> int:
    """Exit 1 if any check fails."""
    from .selftest import run_selftest

    checks = run_selftest([args.backend] if args.backend else None, args.device, log=lambda m: print(m, flush=True))
    return 0 if all(c.ok for c in checks) else 1


def cmd_health(args) -> int:
    from transport.auth import Auth
    from transport.client import health_reports

    from .specs import parse_stages_spec

    addresses = [a for a, _ in parse_stages_spec(args.stages)]
    rows = []
    for address, r in zip(addresses, health_reports(addresses, Auth.load(args.auth, "coordinator"), args.timeout)):
        if isinstance(r, Exception):
            rows.append({"address": address, "state": "down", "error": str(r)})
            continue
        rows.append({"address": address, "state": "ok" if r.layers else "idle", "backend": r.backend,
                     "device": r.device, "dtype": r.dtype, "layers": list(r.layers) if r.layers else None,
                     "live_sequences": len(r.live_sequences), "kv_tokens_used": r.kv_tokens_used,
                     "kv_tokens_cached": r.kv_tokens_cached, "kv_tokens": r.kv_tokens, "forward_ms": r.forward_ms,
                     "draining": r.draining})
    if args.json:
        print(json.dumps(rows))
    for r in [] if args.json else rows:
        if r["state"] == "down":
            print(f"{r['address']}: down ({r['error']})")
            continue
        layers = "none" if r["layers"] is None else f"{r['layers'][0]}-{r['layers'][1]}"
        fwd = "" if r["forward_ms"] is None else f", one-token forward {r['forward_ms']:.1f} ms"
        print(f"{r['address']}: {r['state']} {r['backend']} {r['device']} {r['dtype']} layers {layers}, "
              f"{r['live_sequences']} live sequences, KV {r['kv_tokens_used']}/{r['kv_tokens']} tokens "
              f"(+{r['kv_tokens_cached']} cached, reclaimable){fwd}")
    return 0 if all(r["state"] == "ok" for r in rows) else 1


def cmd_keys(args) -> int:
    from pathlib import Path

    from transport.auth import init_keys

    if (Path(args.dir) / "stage.key_secret").exists() and not args.force:
        raise UserError(f"{args.dir} already holds keys (use --force to replace them)")
    d = init_keys(args.dir, force=True)
    print(f"wrote {d}/stage.key(_secret), {d}/coordinator.key(_secret) and {d}/allowed/; "
          "copy the directory to each machine and pass --auth DIR")
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(args.prompt, args.max_tokens, check_dtype(args.dtype, allow_auto=True))


COMMANDS = {"fetch": cmd_fetch, "import-gguf": cmd_import_gguf, "quantize": cmd_quantize, "generate": cmd_generate,
            "stage": cmd_stage, "serve": cmd_serve, "bench": cmd_bench, "plan": cmd_plan, "selftest": cmd_selftest, "health": cmd_health,
            "keys": cmd_keys, "demo": cmd_demo}


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
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
    """The `hetpipe` program: short spin-waits (see `threads`), on tcmalloc where the system has it
    (see `allocator`), then `main`."""
    from . import allocator, threads

    threads.apply()
    allocator.reexec()
    sys.exit(main())


if __name__ == "__main__":
    entry()
