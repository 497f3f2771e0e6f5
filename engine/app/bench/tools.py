"""`hetpipe bench tools`: what a required tool call's grammar costs per decoded token.

One stream at a time on one pipeline. Each round runs, in turn:
- `tools`: a chat request with 8 tools and `tool_choice: required`, its prompt rendered with the
  tools and decoding constrained by their call grammar (as the server does it) until the call ends;
- `same prompt`: that prompt again, unconstrained, for as many tokens (the mask's own cost);
- `no tools`: the request without tools (its shorter prompt), for as many tokens.
Decode time per token is (last token - first token) / (tokens - 1). Reported: each kind's median
over the rounds and the ratios of `tools` to the other two.
"""

from __future__ import annotations

import statistics

from ...core.errors import UserError
from ...serving.generator import Generator
from ..server import tools as T
from ..server.schemas import ChatRequest

ASK = [{"role": "user", "content": "Find recent papers on pipeline-parallel speculative decoding and summarize them."}]
TOOL_NAMES = ("search_papers", "search_web", "get_weather", "read_file", "write_file", "run_sql", "send_email",
              "create_event")


def tools_request() -> ChatRequest:
    """8 tools whose calls run to tens of tokens: a long free-text argument and two bounded ones."""
    params = {"type": "object", "additionalProperties": False, "required": ["query", "limit", "order"],
              "properties": {"query": {"type": "string", "minLength": 60, "maxLength": 200},
                             "limit": {"type": "integer", "minimum": 1, "maximum": 50},
                             "order": {"enum": ["newest", "oldest", "relevance"]}}}
    tools = [{"type": "function", "function": {"name": n, "description": f"{n.replace('_', ' ')} for the user",
                                               "parameters": params}} for n in TOOL_NAMES]
    return ChatRequest.model_validate({"messages": ASK, "tools": tools, "tool_choice": "required",
                                       "parallel_tool_calls": False})


def _per_token_ms(gen: Generator, ids: list[int], max_tokens: int, constraint=None) -> tuple[float, int]:
    s = gen.stream(ids, max_tokens=max_tokens, ignore_eos=constraint is None, constraint=constraint)
    for _ in s:
        pass
    t = s.timing
    if t.tokens < 3:
        raise UserError("bench tools: the call ended after fewer than 3 tokens; nothing to time")
    return (t.last - t.first) * 1000 / (t.tokens - 1), t.tokens


def run_tools(gen: Generator, *, rounds: int) -> dict:
    if rounds < 1:
        raise UserError("bench tools: --rounds at least 1")
    req = tools_request()
    fmt = T.template_format(gen.tokenizer.chat_template)
    messages, tool_defs = T.render(req, fmt)
    with_tools = gen.tokenizer.apply_chat_template(messages, tools=tool_defs)
    without = gen.tokenizer.apply_chat_template(ASK)
    grammar = T.call_grammar(T.forced(req), fmt, parallel=False)
    gen.grammar_constraint(grammar)  # compiled once, as a server's cache keeps it
    _per_token_ms(gen, without, 8)  # first calls pay one-time costs
    kinds: dict[str, list[float]] = {"tools": [], "same prompt": [], "no tools": []}
    tokens = []
    for _ in range(rounds):
        ms, n = _per_token_ms(gen, with_tools, 512, gen.grammar_constraint(grammar))
        kinds["tools"].append(ms)
        tokens.append(n)
        kinds["same prompt"].append(_per_token_ms(gen, with_tools, n)[0])
        kinds["no tools"].append(_per_token_ms(gen, without, n)[0])
    med = {k: statistics.median(v) for k, v in kinds.items()}
    return {"ratio_vs_no_tools": med["tools"] / med["no tools"],
            "ratio_vs_same_prompt": med["tools"] / med["same prompt"],
            "ms_per_token": med, "ms_per_token_rounds": kinds, "call_tokens": tokens, "tools": len(TOOL_NAMES),
            "prompt_tokens": {"tools": len(with_tools), "no tools": len(without)}, "tool_format": fmt,
            "rounds": rounds, "stages": gen.pipeline.describe()}


def format_tools(r: dict) -> str:
    m = r["ms_per_token"]
    return (f"decode ms per token, median of {r['rounds']} rounds ({r['tools']} tools, required, a call of "
            f"{statistics.median(r['call_tokens']):.0f} tokens; prompts {r['prompt_tokens']['tools']} and "
            f"{r['prompt_tokens']['no tools']} tokens): with the call grammar {m['tools']:.2f}, same prompt "
            f"unconstrained {m['same prompt']:.2f}, no tools {m['no tools']:.2f}; ratio to no tools "
            f"{r['ratio_vs_no_tools']:.3f}, to the same prompt {r['ratio_vs_same_prompt']:.3f}")
