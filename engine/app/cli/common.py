"""What the commands share: the parser that errs in one line, the pipeline and sampling options,
the model directory `--model` names, and the Generator those options build. The engine's
defaults are `EngineConfig`'s own."""

from __future__ import annotations

import argparse
import sys

from ...core.errors import UserError
from ...core.tensors import AUTO, DTYPES, check_dtype
from ...serving.engine import EngineConfig

EXIT_USAGE = 2
ENGINE = EngineConfig()  # the engine's defaults, shown by --help and passed on unchanged


def count(text: str) -> int:
    """An argparse type: an integer of at least 1."""
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be an integer of at least 1, not {text!r}")
    return n


class Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors: one line, exit 2
        raise UserError(f"{self.prog}: {message}")


def add_sampling(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (the default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--logprobs", type=int, default=1, help="top log-probabilities per token (N > 1 adds `top`)")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def add_pipeline(p: argparse.ArgumentParser, required: bool) -> None:
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
    p.add_argument("--kv-tokens", type=count, default=None,
                   help="with --local: KV cache tokens per stage (default: the memory left after the weights, "
                        "less 10%% of the device's)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for a stage's answer")
    p.add_argument("--auth", default=None, metavar="DIR",
                   help="CURVE keys from `hetpipe keys init` (encrypted, allow-listed)")
    p.add_argument("--standby", action="append", default=[], metavar="ADDR",
                   help="a spare stage daemon that takes over a lost stage's layers (repeatable)")
    # the engine's options
    p.add_argument("--inflight", type=count, default=ENGINE.inflight,
                   help="micro-batches in flight across remote stages (1: no overlap; default: one per stage)")
    p.add_argument("--max-seqs", type=count, default=ENGINE.max_seqs, help="sequences running at once")
    p.add_argument("--max-queue", type=count, default=ENGINE.max_queue, help="requests waiting beyond that; more are refused")
    p.add_argument("--max-batch-tokens", type=count, default=ENGINE.max_batch_tokens, help="tokens per micro-batch (prefill chunk size)")
    p.add_argument("--recovery-timeout", type=float, default=ENGINE.recovery_timeout_s,
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


def resolve_model_dir(arg: str | None) -> str:
    """The directory `--model` names (a directory, a .gguf file imported once, or a Hub id's snapshot:
    `fetch.resolve_model`); without it, the fetched smollm2."""
    from ..fetch import default_model_dir, resolve_model

    if arg:
        return str(resolve_model(arg))
    d = default_model_dir()
    if not d.is_dir():
        raise UserError("no --model given and the default model is not fetched (run `hetpipe fetch smollm2`)")
    return str(d)


def generator(args):
    """The pipeline the options ask for, in a Generator that owns it."""
    from ...api import Generator, connect_pipeline, local_pipeline

    from ...serving.speculative import parse_speculative

    speculative = parse_speculative(args.speculative, args.num_draft_tokens)
    if args.draft_stages and (speculative is None or speculative.method != "draft"):
        raise UserError("--draft-stages names where a draft model runs: it goes with --speculative draft:MODEL")
    model_dir = resolve_model_dir(args.model)
    if args.local:
        pipeline = local_pipeline(model_dir, args.local, check_dtype(args.dtype, allow_auto=True), args.device,
                                  compile=args.compile, kv_tokens=args.kv_tokens)
    else:
        if args.kv_tokens is not None:
            raise UserError("--kv-tokens applies to --local stages; a stage daemon takes its own (hetpipe stage --kv-tokens)")
        pipeline = connect_pipeline(model_dir, args.stages, timeout_s=args.timeout, auth_dir=args.auth,
                                    standby=args.standby, log=lambda m: print(m, file=sys.stderr))
    if speculative is not None and speculative.method == "draft":
        speculative = draft_model(speculative, model_dir, pipeline, args)
    return Generator(model_dir, pipeline, inflight=args.inflight, max_seqs=args.max_seqs, max_queue=args.max_queue,
                     max_batch_tokens=args.max_batch_tokens, recovery_timeout_s=args.recovery_timeout,
                     prefix_cache=args.prefix_cache, speculative=speculative)


def draft_model(speculative, model_dir, pipeline, args):
    """`--speculative draft:MODEL`: the draft model on one stage of its own, its KV budget its own:
    the daemon `--draft-stages` names, else in this process (torch where it is installed, else
    MLX). The target's vocabulary is checked."""
    import dataclasses
    import importlib.util

    from ...api import connect_pipeline, local_pipeline
    from ...core.config import ModelConfig
    from ...serving.draft_model import DraftModel

    try:
        draft_dir = resolve_model_dir(speculative.draft_model)
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
