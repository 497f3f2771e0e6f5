"""OpenAI's two generation endpoints over a `Generator`: a request becomes choices (one engine
request each), and the choices' chunks become OpenAI's response bodies and stream chunks.

`n` choices of one prompt share it (prompt tokens counted once); a seeded request gives choice i
the seed `seed + i`, so each choice differs and every run repeats.

`plan_chat` and `plan_completion` do the request's own work (template, tokenizer, grammar) and run
on a worker thread; a prompt is checked against the context from its length before it is
tokenized. `start` only submits, on the event loop.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from ...core.errors import UserError
from ...core.sampling import SamplingParams
from ...serving.generator import Generator
from ...serving.output import GenerationChunk
from ...serving.structured import Constraint
from . import tools as T
from .guard import ParamError
from .schemas import MAX_CHOICES, ChatRequest, CompletionRequest, Message, ResponseFormat


@dataclass(slots=True)
class Choice:
    """One engine request: a prompt, how to sample it, and what came of it."""

    index: int
    prompt_ids: list[int]
    sampling: SamplingParams
    max_tokens: int
    echo: str = ""  # /v1/completions with echo: the prompt's text, put before the output
    chunks: list[GenerationChunk] = field(default_factory=list)
    cached_tokens: Callable[[], int] = lambda: 0  # its prompt tokens the prefix cache served (known once it runs)
    constraint: Constraint | None = None  # structured output's grammar state, made ahead
    score_prompt: int | None = None  # echo with logprobs: the prompt's log-probabilities, with this many alternatives
    prompt_scores: list | None = None  # what came of that (the first chunk carries it)
    generate: bool = True  # max_tokens 0: one token is sampled (the prefill's own) and not returned
    prediction: list[int] | None = None  # Predicted Outputs: token ids drafted from
    speculative: Callable[[], dict | None] = lambda: None  # its draft tokens sent and taken (known once it runs)

    @property
    def text(self) -> str:
        return self.echo + "".join(c.text for c in self.chunks)

    @property
    def finish_reason(self) -> str | None:
        if not self.generate:
            return "length" if self.prompt_scores is not None or not self.score_prompt else None
        return self.chunks[-1].finish_reason if self.chunks else None


@dataclass(slots=True)
class Plan:
    """A request, checked and tokenized: its choices and what they share."""

    kind: str  # "chat" or "completion"
    model: str
    choices: list[Choice]
    prompt_tokens: int
    stop: list[str]
    ignore_eos: bool
    top_logprobs: int | None  # None: no logprobs; else how many alternatives per token
    stream: bool
    include_usage: bool
    continuous_usage: bool = False  # every chunk carries the usage so far (vLLM's continuous_usage_stats)
    tools: list | None = None  # chat with tools taking part: the request's tools (`tools.py`)
    tool_format: str = ""  # the layout of calls in the text (`tools.template_format`)
    parallel_tool_calls: bool = True
    forced_call: bool = False  # a call is required: the text is one from its first token
    predicted: bool = False  # a prediction was given: the usage reports its tokens taken and not
    id: str = field(default_factory=lambda: secrets.token_hex(12))
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def object(self) -> str:
        return "chat.completion" if self.kind == "chat" else "text_completion"


def template_messages(messages: list[Message]) -> list[dict]:
    """Messages as the chat template reads them (a developer message is a system one)."""
    out = []
    for m in messages:
        entry = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
        if m.name is not None:
            entry["name"] = m.name
        out.append(entry)
    return out


def plan_chat(req: ChatRequest, gen: Generator, model: str) -> Plan:
    fmt = T.template_format(gen.tokenizer.chat_template)
    if req.tool_choice is not None and not req.tools:
        raise ParamError("tool_choice needs tools", "tool_choice")
    if req.tools or any(m.tool_calls or m.role == "tool" for m in req.messages):
        messages, tool_defs = T.render(req, fmt)
    else:
        T.check_messages(req.messages)
        messages, tool_defs = template_messages(req.messages), None
    _fits(gen, sum(gen.tokenizer.at_least_tokens(m["content"] or "") for m in messages), "messages")
    ids = gen.tokenizer.apply_chat_template(messages, tools=tool_defs)
    if req.max_tokens is not None and req.max_completion_tokens is not None and \
            req.max_tokens != req.max_completion_tokens:
        raise ParamError("max_tokens and max_completion_tokens disagree; give one", "max_completion_tokens")
    max_tokens = req.max_completion_tokens or req.max_tokens
    if req.top_logprobs is not None and not req.logprobs:
        raise ParamError("top_logprobs needs logprobs: true", "top_logprobs")
    top = (req.top_logprobs or 0) if req.logprobs else None
    forced = T.forced(req)
    if forced and req.response_format is not None and req.response_format.type != "text":
        raise ParamError("a required tool call and a response_format cannot both shape the output", "tool_choice")
    plan = _plan("chat", req, gen, model, [(ids, "")], max_tokens, top, req.response_format)
    if req.prediction is not None:
        plan.predicted = True
        for c in plan.choices:
            c.prediction = gen.tokenizer.encode(req.prediction.text(), add_special_tokens=False)
    if T.active(req):
        plan.tools, plan.tool_format, plan.parallel_tool_calls = list(req.tools), fmt, req.parallel_tool_calls
    plan.forced_call = bool(forced)
    # a required call is constrained from the first token; under `auto` (and no response_format)
    # text is free and a call is constrained from its opening marker on (a lazy grammar)
    lazy = not forced and T.active(req) and plan.choices[0].constraint is None
    if forced or lazy:
        special = {m: i for m in T.MARKERS if (i := gen.tokenizer.special_id(m)) is not None}
        try:
            first = gen.grammar_constraint(T.call_grammar(forced or list(req.tools), fmt, req.parallel_tool_calls,
                                                          lazy=lazy, special=special))
        except UserError as e:
            raise ParamError(str(e), "tools") from None
        for i, c in enumerate(plan.choices):
            c.constraint = first if i == 0 else first.copy()
    return plan


def chat_message(plan: Plan, c: Choice) -> tuple[dict, str | None]:
    """A chat choice's message and finish reason: with tools, the calls parsed out of its text."""
    if plan.tools is None or c.finish_reason is None:
        return {"role": "assistant", "content": c.text}, c.finish_reason
    content, calls = T.parse(c.text, plan.tool_format, plan.tools)
    if not calls:
        return {"role": "assistant", "content": c.text}, c.finish_reason
    if not plan.parallel_tool_calls:
        calls = calls[:1]
    return {"role": "assistant", "content": content, "tool_calls": [x.to_json() for x in calls]}, "tool_calls"


def plan_completion(req: CompletionRequest, gen: Generator, model: str) -> Plan:
    p = req.prompt
    if isinstance(p, str):
        prompts = [p]
    elif not p:
        raise ParamError("prompt is empty", "prompt")
    elif isinstance(p[0], int):
        prompts = [p]
    else:
        prompts = list(p)
    if req.max_tokens == 0 and req.stream:
        raise ParamError("max_tokens 0 has no tokens to stream: give stream: false", "stream")
    if req.echo and req.logprobs is not None and req.stream:
        raise ParamError("echo with logprobs is not streamed (the prompt's log-probabilities come whole): "
                         "give stream: false", "stream")
    if len(prompts) * req.n > MAX_CHOICES:
        raise ParamError(f"{len(prompts)} prompts x n={req.n} make {len(prompts) * req.n} choices; at most "
                         f"{MAX_CHOICES} in one request", "prompt")
    entries = []
    for item in prompts:
        if isinstance(item, str):
            _fits(gen, gen.tokenizer.at_least_tokens(item), "prompt")
            ids = gen.tokenizer.encode(item)
            text = item
        else:
            ids = list(item)
            _fits(gen, len(ids), "prompt")
            if any(not 0 <= i < gen.cfg.vocab_size for i in ids):
                raise ParamError(f"prompt token ids must be in 0..{gen.cfg.vocab_size - 1}", "prompt")
            text = gen.tokenizer.decode(ids)
        if not ids:
            raise ParamError("prompt is empty", "prompt")
        entries.append((ids, text if req.echo else ""))
    plan = _plan("completion", req, gen, model, entries, req.max_tokens or None, req.logprobs, req.response_format)
    for c in plan.choices:
        c.generate = req.max_tokens != 0
        if req.echo and req.logprobs is not None:
            c.score_prompt = req.logprobs
        if not c.generate:
            c.max_tokens = 1
    return plan


def _fits(gen: Generator, at_least: int, param: str) -> None:
    """Refuse a prompt of at least `at_least` tokens past the context, before tokenizing it."""
    context = gen.cfg.max_position_embeddings
    if at_least >= context:
        raise ParamError(f"this model's maximum context length is {context} tokens; the prompt is at least "
                         f"{at_least} tokens", param, code="context_length_exceeded")


def _plan(kind, req, gen: Generator, model: str, prompts: list[tuple[list[int], str]], max_tokens: int | None,
          top: int | None, fmt: ResponseFormat | None) -> Plan:
    context = gen.cfg.max_position_embeddings
    room = min(context, gen.pipeline.kv_tokens())  # what one request may hold: the default max_tokens fills it
    for ids, _ in prompts:
        asked = len(ids) + (max_tokens or 1)
        if asked > context:
            what = f"{len(ids)} in the prompt" + (f", {max_tokens} in the completion" if max_tokens else "")
            raise ParamError(f"this model's maximum context length is {context} tokens; the request asks for "
                             f"{asked} ({what})", "messages" if kind == "chat" else "prompt",
                             code="context_length_exceeded")
    bias = []
    for key, value in (req.logit_bias or {}).items():  # keys are decimal token ids (the schema checks)
        if int(key) >= gen.cfg.vocab_size:
            raise ParamError(f"logit_bias names token {key}; token ids are in 0..{gen.cfg.vocab_size - 1}",
                             "logit_bias")
        bias.append((int(key), value))
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if max_tokens is not None and req.min_tokens > max_tokens:
        raise ParamError(f"min_tokens ({req.min_tokens}) is more than max_tokens ({max_tokens})", "min_tokens")
    options = req.stream_options
    if options and options.continuous_usage_stats and not options.include_usage:
        raise ParamError("continuous_usage_stats needs include_usage: true", "stream_options.continuous_usage_stats")
    schema = _json_schema(fmt)
    try:
        first = None if schema is None else gen.constraint(schema)
    except UserError as e:
        raise ParamError(str(e), "response_format") from None
    try:
        sampling = SamplingParams(
            temperature=req.temperature, top_k=max(req.top_k, 0), top_p=req.top_p, min_p=req.min_p,
            repetition_penalty=req.repetition_penalty, presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty, logit_bias=tuple(bias), seed=req.seed, min_tokens=req.min_tokens,
            # 1 means "the chosen token only" to the stages: ask one more, keep what was asked
            logprobs=max(top or 0, 2) if top else 1)
    except UserError as e:
        raise ParamError(str(e), None) from None
    choices = []
    for p_index, (ids, echo) in enumerate(prompts):
        for j in range(req.n):
            i = p_index * req.n + j
            choice_sampling = sampling if req.seed is None else sampling.copy_with(seed=req.seed + j)
            constraint = None if first is None else first if i == 0 else first.copy()
            choices.append(Choice(i, ids, choice_sampling, max_tokens or max(room - len(ids), 1), echo,
                                  constraint=constraint))
    return Plan(kind, model, choices, sum(len(ids) for ids, _ in prompts), stop, req.ignore_eos,
                top, req.stream, bool(options and options.include_usage),
                bool(options and options.continuous_usage_stats))


def _json_schema(fmt: ResponseFormat | None) -> dict | bool | None:
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return True
    if fmt.json_schema is None:
        raise ParamError("response_format json_schema needs its json_schema", "response_format")
    return fmt.json_schema.schema_


# -- running ------------------------------------------------------------------------------------

def start(plan: Plan, gen: Generator) -> list:
    """Submit every choice now (bad input and a full queue raise here, before any response)."""
    streams = []
    try:
        for c in plan.choices:
            streams.append(gen.astream(c.prompt_ids, max_tokens=c.max_tokens, sampling=c.sampling, stop=plan.stop,
                                       ignore_eos=plan.ignore_eos, constraint=c.constraint,
                                       prompt_logprobs=c.score_prompt, prediction=c.prediction))
            c.cached_tokens = lambda req=streams[-1].request: req.cached_tokens
            c.speculative = lambda req=streams[-1].request: req.speculative
    except BaseException:
        for s in streams:
            s.close()
        raise
    return streams


async def merged(plan: Plan, streams: list) -> AsyncIterator[tuple[Choice, GenerationChunk]]:
    """Every choice's chunks as they come, as (choice, chunk); each choice also keeps its own."""
    q: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(choice: Choice, stream):
        try:
            async for chunk in stream:
                await q.put((choice, chunk))
            await q.put((choice, done))
        except BaseException as e:
            await q.put((choice, e))

    tasks = [asyncio.ensure_future(pump(c, s)) for c, s in zip(plan.choices, streams)]
    try:
        left = len(tasks)
        while left:
            choice, item = await q.get()
            if item is done:
                left -= 1
                continue
            if isinstance(item, BaseException):
                raise item
            if item.prompt_logprobs is not None:
                choice.prompt_scores = item.prompt_logprobs
            if not choice.generate:
                continue  # max_tokens 0: the token sampled with the prefill is not the client's
            choice.chunks.append(item)
            yield choice, item
    finally:
        for t, s in zip(tasks, streams):
            t.cancel()
            s.close()  # a choice not finished is cancelled on every stage


def usage(plan: Plan) -> dict:
    completion = sum(len(c.chunks) for c in plan.choices)
    cached: dict[int, int] = {}  # per prompt (the n choices of one share it): what the cache served it
    for c in plan.choices:
        cached[id(c.prompt_ids)] = max(cached.get(id(c.prompt_ids), 0), c.cached_tokens())
    out = {"prompt_tokens": plan.prompt_tokens, "completion_tokens": completion,
           "total_tokens": plan.prompt_tokens + completion,
           "prompt_tokens_details": {"cached_tokens": sum(cached.values())}}
    if plan.predicted:  # OpenAI's Predicted Outputs: draft tokens the answer took, and those it did not
        drafts = [c.speculative() or {"drafted": 0, "accepted": 0} for c in plan.choices]
        taken = sum(d["accepted"] for d in drafts)
        out["completion_tokens_details"] = {"accepted_prediction_tokens": taken,
                                            "rejected_prediction_tokens": sum(d["drafted"] for d in drafts) - taken}
    return out


# -- bodies -------------------------------------------------------------------------------------

def response_body(plan: Plan, gen: Generator) -> dict:
    choices = []
    for c in plan.choices:
        lp = logprobs_body(plan, gen, c.chunks, len(c.echo), c.prompt_scores)
        if plan.kind == "chat":
            message, finish = chat_message(plan, c)
            choices.append({"index": c.index, "message": message, "logprobs": lp, "finish_reason": finish})
        else:
            choices.append({"index": c.index, "text": c.text, "logprobs": lp, "finish_reason": c.finish_reason})
    return {"id": _id(plan), "object": plan.object, "created": plan.created, "model": plan.model,
            "choices": choices, "usage": usage(plan)}


def chunk_body(plan: Plan, choice: Choice, *, role: bool = False, text: str = "", logprobs: dict | None = None,
               finish: str | None = None) -> dict:
    """One stream chunk for one choice: the role first (chat; with echo, the prompt's text), then
    each token's text, then a chunk of its own with the finish reason."""
    if plan.kind == "chat":
        delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
        entry = {"index": choice.index, "delta": delta}
    else:
        entry = {"index": choice.index, "text": choice.echo if role else text}
    entry["logprobs"] = logprobs
    entry["finish_reason"] = finish
    body = {"id": _id(plan), "object": _chunk_object(plan), "created": plan.created, "model": plan.model,
            "choices": [entry]}
    if plan.continuous_usage:
        body["usage"] = usage(plan)
    elif plan.include_usage:
        body["usage"] = None
    return body


def tool_call_chunk(plan: Plan, choice: Choice, event: tuple) -> dict:
    """A stream chunk of one call event (`tools.StreamedCalls`), as OpenAI streams calls: the call's
    index, id and name first (empty arguments), then pieces of its arguments."""
    kind, index, x = event
    delta = ({"index": index, "id": x.id, "type": "function", "function": {"name": x.name, "arguments": ""}}
             if kind == "call" else {"index": index, "function": {"arguments": x}})
    body = chunk_body(plan, choice)
    body["choices"][0]["delta"] = {"tool_calls": [delta]}
    return body


def _chunk_object(plan: Plan) -> str:
    return "chat.completion.chunk" if plan.kind == "chat" else "text_completion"


def usage_body(plan: Plan) -> dict:
    return {"id": _id(plan), "object": _chunk_object(plan), "created": plan.created, "model": plan.model,
            "choices": [], "usage": usage(plan)}


def logprobs_body(plan: Plan, gen: Generator, chunks: list[GenerationChunk], offset: int = 0,
                  prompt: list | None = None) -> dict | None:
    """OpenAI's logprobs of `chunks` (text starting at `offset`); for completions with `prompt`
    scores (echo), the prompt's tokens come first, from offset 0, the first of them with nulls."""
    if plan.top_logprobs is None:
        return None
    tok = gen.tokenizer
    k = plan.top_logprobs
    if plan.kind == "chat":
        return {"content": [_token_entry(tok, c.token_id, c.logprob)
                            | {"top_logprobs": [_token_entry(tok, i, lp) for i, lp in c.top[:k]]} for c in chunks]}
    tokens = [tok.token_text(c.token_id) for c in chunks]
    offsets, at = [], offset
    for c in chunks:
        offsets.append(at)
        at += len(c.text)
    body = {"tokens": tokens, "token_logprobs": [c.logprob for c in chunks],
            "top_logprobs": [{tok.token_text(i): lp for i, lp in c.top[:k]} if k else None for c in chunks],
            "text_offset": offsets}
    if prompt is None:
        return body
    texts = [tok.token_text(t) for t, _, _ in prompt]
    starts = [0]
    for t in texts[:-1]:
        starts.append(starts[-1] + len(t))
    return {"tokens": texts + body["tokens"], "token_logprobs": [lp for _, lp, _ in prompt] + body["token_logprobs"],
            "top_logprobs": [{tok.token_text(i): v for i, v in top[:k]} if k and lp is not None else None
                             for _, lp, top in prompt] + body["top_logprobs"],
            "text_offset": starts + body["text_offset"]}


def _token_entry(tok, token_id: int, logprob: float) -> dict:
    text = tok.token_text(token_id)
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def _id(plan: Plan) -> str:
    return ("chatcmpl-" if plan.kind == "chat" else "cmpl-") + plan.id
