"""`hetpipe generate`, `serve` and `demo`: text out of a pipeline, on the command line or over HTTP."""

from __future__ import annotations

import json
import sys

from ...core.errors import UserError
from ...core.tensors import AUTO, check_dtype
from .common import add_pipeline, add_sampling, generator, resolve_model_dir


def add_parsers(sub) -> None:
    gen = sub.add_parser("generate", help="generate text through a pipeline of stages")
    gen.add_argument("prompt", nargs="?", default=None)
    gen.add_argument("--prompt-ids", default=None, metavar="ID,ID,...",
                     help="raw token ids in place of PROMPT (no tokenizer, no chat template)")
    gen.add_argument("--ignore-eos", action="store_true", help="generate --max-tokens tokens whatever is sampled")
    add_pipeline(gen, required=True)
    gen.add_argument("--chat", action="store_true", help="wrap the prompt as a user turn of the chat template")
    gen.add_argument("--json", action="store_true", help="print one JSON line instead of streaming text")
    add_sampling(gen)
    sv = sub.add_parser("serve", help="serve the OpenAI HTTP API (and a web page) over a pipeline")
    add_pipeline(sv, required=True)
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
    demo = sub.add_parser("demo", help="fetch SmolLM2, start an MLX and a torch stage daemon, chat through them")
    demo.add_argument("prompt", nargs="?", default="Explain in two sentences why the sky is blue.")
    demo.add_argument("--max-tokens", type=int, default=96)
    demo.add_argument("--dtype", default=AUTO)


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
    from ...core.sampling import SamplingParams

    sampling = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                              repetition_penalty=args.repetition_penalty, seed=args.seed, logprobs=args.logprobs)
    prompt = _prompt(args)
    opts = dict(chat=args.chat, max_tokens=args.max_tokens, sampling=sampling, stop=args.stop,
                ignore_eos=args.ignore_eos)
    with generator(args) as gen:
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

    from ..server.guard import ServerLimits
    from ..server.run import check_exposure, read_api_key, serve

    if not 0 <= args.port < 65536:
        raise UserError("--port must be in 0..65535")
    api_key = read_api_key(args.api_key, args.api_key_file)
    check_exposure(args.host, api_key, args.insecure)
    limits = ServerLimits(args.max_request_bytes, args.read_timeout)
    from ...compose.hub import parse_hub_id

    hub_id = parse_hub_id(args.model) if args.model else None
    name = args.served_model_name or (hub_id[0] if hub_id else Path(resolve_model_dir(args.model)).resolve().name)
    with generator(args) as gen:
        print("stages: " + ", ".join(f"{d.get('address', d['backend'])}={d['layers'][0]}-{d['layers'][1]} "
                                     f"({d['backend']} on {d['device']} in {d['dtype']})"
                                     for d in gen.pipeline.describe()), file=sys.stderr, flush=True)
        serve(gen, host=args.host, port=args.port, model_name=name, api_key=api_key,
              cors_origins=tuple(args.cors_origin), limits=limits)
    return 0


def cmd_demo(args) -> int:
    from ..demo import run_demo

    return run_demo(args.prompt, args.max_tokens, check_dtype(args.dtype, allow_auto=True))


COMMANDS = {"generate": cmd_generate, "serve": cmd_serve, "demo": cmd_demo}
