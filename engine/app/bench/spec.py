"""`hetpipe bench spec`: one stream with and without speculative decoding, on the same pipeline.

Three kinds of prompt: editing a given piece of code (the answer repeats most of it), summarizing a
given text, and free chat; and free chat again whose drafts never hit (a prediction of unrelated
text, drafted every step it is not backed off: what speculation costs when it is wrong). Each
round runs every kind both ways, greedy, for the same number of tokens (end tokens ignored), the
order of the two alternating between rounds. Reported per kind:
decode tokens/s both ways (median over rounds) and their ratio, the share of draft tokens taken,
and the mean number taken per verified draft. With `--link-delay-ms` (daemons on loopback only),
every link to and between the stages runs through a relay that holds each byte that long
(`relay.py`).
"""

from __future__ import annotations

import statistics

from ...core.errors import UserError
from ...serving.generator import Generator

CODE = '''def load_config(path):
    with open(path) as f:
        data = json.load(f)
    if "name" not in data:
        raise ValueError("config has no name")
    data.setdefault("retries", 3)
    data.setdefault("timeout", 30)
    return data


def save_config(path, data):
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
'''
TEXT = ("The lighthouse on the northern cape was built in 1871 after three ships were lost on the reef in a "
        "single winter. Its first keeper, a retired sailor named Thomas Hale, kept a log for thirty years: the "
        "weather, the ships that passed, the repairs to the lamp. When the light was automated in 1962 the log "
        "went to the town museum, where it is still read by historians of the coast and by the families of the "
        "sailors it names.")
PROMPTS = {
    "code edit": [{"role": "user", "content": f"Rename the variable data to cfg in this code, and show the whole "
                                              f"code:\n\n{CODE}"}],
    "summary": [{"role": "user", "content": f"Summarize this text in a few sentences:\n\n{TEXT}"}],
    "free chat": [{"role": "user", "content": "What should I pack for a week of hiking in the mountains?"}],
}


# drafts that never hit: a prediction of text the answer has nothing to do with
MISS = "Quarterly revenue rose 4% on strong demand for industrial pumps, offset by currency effects. " * 4


def _run(gen: Generator, ids: list[int], max_tokens: int, speculate: bool, prediction=None) -> dict:
    s = gen.stream(ids, max_tokens=max_tokens, ignore_eos=True, speculate=speculate,
                   prediction=prediction if speculate else None)
    for _ in s:
        pass
    t = s.timing
    d = s.request.drafter
    return {"tokens_per_s": (t.tokens - 1) / (t.last - t.first), "drafted": d.drafted if speculate else 0,
            "accepted": d.accepted if speculate else 0, "verified": d.steps if speculate else 0}


def run_spec(gen: Generator, *, rounds: int, max_tokens: int, link_delay_ms: float) -> dict:
    if rounds < 1 or max_tokens < 8:
        raise UserError("bench spec: --rounds at least 1, --max-tokens at least 8")
    if gen.engine.config.speculative is None:
        raise UserError("bench spec needs --speculative (ngram)")
    _run(gen, gen.prompt_ids("Hello", chat=True), 4, True)  # first calls pay one-time costs
    kinds = {}
    miss = gen.tokenizer.encode(MISS, add_special_tokens=False)
    for name, messages, prediction in [(n, m, None) for n, m in PROMPTS.items()] + \
            [("never hits", PROMPTS["free chat"], miss)]:
        ids = gen.prompt_ids(messages, chat=True)
        on, off, drafted, accepted, verified = [], [], 0, 0, 0
        for r in range(rounds):
            for speculate in (True, False) if r % 2 == 0 else (False, True):
                x = _run(gen, ids, max_tokens, speculate, prediction)
                (on if speculate else off).append(x["tokens_per_s"])
                drafted, accepted, verified = drafted + x["drafted"], accepted + x["accepted"], verified + x["verified"]
        kinds[name] = {"tokens_per_s_spec": statistics.median(on), "tokens_per_s_plain": statistics.median(off),
                       "ratio": statistics.median(on) / statistics.median(off),
                       "acceptance": accepted / drafted if drafted else 0.0,
                       "mean_accepted": accepted / verified if verified else 0.0,
                       "drafted": drafted, "accepted": accepted, "prompt_tokens": len(ids)}
    spec = gen.engine.config.speculative
    return {"kinds": kinds, "rounds": rounds, "max_tokens": max_tokens, "link_delay_ms": link_delay_ms,
            "method": spec.method if spec.draft_model is None else f"draft:{spec.draft_model}",
            "num_draft_tokens": spec.num_draft_tokens, "stages": gen.pipeline.describe()}


def format_spec(r: dict) -> str:
    lines = [f"{r['method']} drafts of up to {r['num_draft_tokens']} tokens, {r['max_tokens']} tokens greedy, "
             f"median of {r['rounds']} rounds, link delay {r['link_delay_ms']:g} ms:",
             "| prompt | tokens/s with | without | ratio | drafts taken | mean taken per draft |",
             "|---|---|---|---|---|---|"]
    for name, k in r["kinds"].items():
        lines.append(f"| {name} | {k['tokens_per_s_spec']:.1f} | {k['tokens_per_s_plain']:.1f} | {k['ratio']:.2f} | "
                     f"{k['acceptance']:.0%} ({k['accepted']}/{k['drafted']}) | {k['mean_accepted']:.2f} |")
    return "\n".join(lines)
