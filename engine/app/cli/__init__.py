"""The `hetpipe` command line: it parses, then calls the API. One module per command group:
`models` (fetch, import-gguf, quantize, plan), `run` (generate, serve, demo), `stages` (stage,
health, keys, selftest), `bench`; `common` holds the shared options and the Generator they build.
Bad input: one line on stderr and exit code 2, never a traceback; a stage that fails: one line and
exit code 1."""

from __future__ import annotations

import sys

from ...core.errors import HetpipeError, UserError
from . import bench, models, run, stages
from .common import EXIT_USAGE, Parser

GROUPS = (models, run, stages, bench)
COMMANDS = {name: cmd for group in GROUPS for name, cmd in group.COMMANDS.items()}


def build_parser() -> Parser:
    p = Parser(prog="hetpipe", description="Run one LLM split across MLX and PyTorch stages.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)
    for group in GROUPS:
        group.add_parsers(sub)
    return p


def parse_args(argv: list[str]):
    # `hetpipe bench --local ...` (no suite named) is `hetpipe bench serving ...`
    if len(argv) >= 2 and argv[0] == "bench" and argv[1] not in bench.SUITES and argv[1] not in ("-h", "--help"):
        argv = ["bench", "serving", *argv[1:]]
    return build_parser().parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
        return COMMANDS[args.command](args)
    except UserError as e:
        print(f"hetpipe: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except HetpipeError as e:  # a stage lost, full or failing
        print(f"hetpipe: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("hetpipe: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


def entry() -> None:
    """The `hetpipe` program: short spin-waits (see `threads`), on tcmalloc where the system has it
    (see `allocator`), then `main`, then `leave`."""
    from ...compose import allocator
    from .. import threads

    threads.apply()
    allocator.reexec()
    leave(main())


def leave(code: int) -> None:
    """Exit with `code` once the Python side is done (atexit run, output flushed), without running
    the C++ static destructors of torch, MLX, OpenMP and OpenBLAS: torn down at exit in no set order
    while their worker threads may still run, they aborted a process now and then after its work
    was done ("terminate called without an active exception"). Threads still alive here are idle
    workers (a server's thread pool, a library's); everything they hold is the process's, which
    ends anyway. Joining them first would wait forever on a pool nobody shut down."""
    import atexit
    import os

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe, a closed stream: nothing left to deliver
            pass
    os._exit(code)
