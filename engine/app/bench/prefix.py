"""`hetpipe bench prefix`: what the prefix cache saves on turn 2 of a chat.

Each round is a two-turn chat whose system message is a shared history of about H tokens (its own
text each round, so rounds share nothing). Turn 1 is answered; turn 2 resends the history, turn 1's
question and answer, and a new question. Its time to first token is timed with the prefix cache
and, on a second pipeline of the same kind built in the same process, without it; rounds alternate
between the two, so both see the machine in the same state. Reported: both TTFTs per round, their
median ratio, and the prompt tokens the cache served.
"""

from __future__ import annotations

import statistics

from ...core.errors import UserError
from ...serving.generator import Generator
from .serving import TEXT

QUESTIONS = ("Summarize that in one sentence.", "Now say which part matters most, and why.")


def history_text(gen: Generator, round_id: str, tokens: int) -> str:
    """About `tokens` tokens of text, opening with `round_id` (no two rounds share a first block)."""
    words = f"Notes for session {round_id}. " + TEXT * (tokens // 150 + 2)
    ids = gen.tokenizer.encode(words)[:tokens]
    return gen.tokenizer.decode(ids)


def turn2_ttft(gen: Generator, history: str, max_tokens: int) -> tuple[float, int, int]:
    """(turn 2's TTFT in ms, its prompt tokens, of which cached) for one chat."""
    messages = [{"role": "system", "content": history}, {"role": "user", "content": QUESTIONS[0]}]
    answer = gen.generate(messages, chat=True, max_tokens=max_tokens, ignore_eos=True).text
    messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": QUESTIONS[1]}]
    ids = gen.tokenizer.apply_chat_template(messages)
    s = gen.stream(ids, max_tokens=1)
    for _ in s:
        pass
    return s.timing.ttft_ms, len(ids), s.request.cached_tokens


def run_prefix(cached: Generator, uncached: Generator, *, history: int, rounds: int, max_tokens: int) -> dict:
    if history < 32 or rounds < 1 or max_tokens < 1:
        raise UserError("bench prefix: --history at least 32, --rounds and --max-tokens at least 1")
    turn2_ttft(cached, history_text(cached, "warm-a", 64), 2)  # first calls pay one-time costs
    turn2_ttft(uncached, history_text(uncached, "warm-b", 64), 2)
    on, off, prompt, served = [], [], 0, []
    for r in range(rounds):
        for gen, out in ((cached, on), (uncached, off)) if r % 2 == 0 else ((uncached, off), (cached, on)):
            ms, prompt, n = turn2_ttft(gen, history_text(gen, f"{r}-{id(out)}", history), max_tokens)
            out.append(ms)
            if gen is cached:
                served.append(n)
    return {
        "ttft_ratio": statistics.median(a / b for a, b in zip(on, off)),
        "ttft_ms_cached": on,
        "ttft_ms_uncached": off,
        "turn2_prompt_tokens": prompt,
        "cached_tokens": served,
        "history_tokens": history,
        "rounds": rounds,
        "max_tokens": max_tokens,
        "stages": cached.pipeline.describe(),
    }


def format_prefix(r: dict) -> str:
    per = ", ".join(f"{a:.0f}/{b:.0f}" for a, b in zip(r["ttft_ms_cached"], r["ttft_ms_uncached"]))
    return (f"turn 2 of a chat with {r['history_tokens']} tokens of history ({r['turn2_prompt_tokens']} prompt "
            f"tokens, {statistics.median(r['cached_tokens']):.0f} of them cached): TTFT with/without the prefix "
            f"cache {per} ms; median ratio {r['ttft_ratio']:.3f}")
