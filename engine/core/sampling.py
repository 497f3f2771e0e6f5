"""Sampling in plain numpy: the last stage uses it whatever its backend.

Order of logit processing: repetition penalty (transformers' rule, over prompt and output),
presence and frequency penalties (OpenAI's, over the output only), logit bias, the allowed-token
mask of structured output, then temperature, top-k, top-p, min-p. Log-probabilities are those of the model's own distribution (log-softmax of the raw
logits), as vLLM and llama.cpp report them.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import numpy as np

from .errors import UserError


# Bounds every path checks (the server, the Python API, a daemon reading the wire): each value fits
# what msgpack and numpy carry and keeps the sampler's arithmetic finite
MAX_TOKEN_ID = 2**31 - 1  # token ids and top-k travel as int32 rows
MAX_SEED = 2**63 - 1
MAX_LOGIT_BIAS = 1024  # entries in one request's logit bias (OpenAI's own limit is 300)
MIN_TEMPERATURE = 1e-5  # below it a temperature is greedy (vLLM's rule): logits / 1e-320 are inf
PENALTY_RANGE = (0.01, 100.0)  # a repetition penalty outside it overflows or zeroes the logits it touches
MAX_LOGPROBS = 20
MAX_STOP_IDS = 64  # end tokens min_tokens may hold back


@dataclass(slots=True)
class SamplingParams:
    temperature: float = 0.0  # 0: greedy (so is anything below MIN_TEMPERATURE)
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    min_p: float = 0.0  # 0: off
    repetition_penalty: float = 1.0  # 1: off
    presence_penalty: float = 0.0  # OpenAI's: subtracted once from every token the output holds
    frequency_penalty: float = 0.0  # OpenAI's: subtracted per occurrence in the output
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias in [-100, 100]) added to the logits
    seed: int | None = None
    logprobs: int = 1  # how many top log-probabilities to report (1: the chosen token only)
    output_from: int = 0  # where the output starts in the sequence (the prompt's length): the penalties' window
    min_tokens: int = 0  # until this many tokens are out, `stop_ids` are never sampled (vLLM's min_tokens)
    stop_ids: tuple[int, ...] = ()  # the end tokens min_tokens holds back (the engine fills in the model's EOS)
    # the logit bias as (ids, values) arrays, made once: added to every sampled row
    _bias: tuple[np.ndarray, np.ndarray] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
            if not _is_real(getattr(self, name)) or not math.isfinite(getattr(self, name)):
                raise UserError(f"{name.replace('_', ' ')} must be a finite number")
        for name, top in (("top_k", MAX_TOKEN_ID), ("logprobs", MAX_LOGPROBS), ("output_from", MAX_TOKEN_ID),
                          ("min_tokens", MAX_TOKEN_ID)):
            if not _is_int(getattr(self, name)) or not 0 <= getattr(self, name) <= top:
                raise UserError(f"{name.replace('_', '-')} must be an integer in [0, {top}]")
        if self.temperature < 0:
            raise UserError("temperature must be >= 0")
        if self.temperature < MIN_TEMPERATURE:
            self.temperature = 0.0
        if not 0 < self.top_p <= 1:
            raise UserError("top-p must be in (0, 1]")
        if not 0 <= self.min_p <= 1:
            raise UserError("min-p must be in [0, 1]")
        if not PENALTY_RANGE[0] <= self.repetition_penalty <= PENALTY_RANGE[1]:
            raise UserError(f"repetition penalty must be in [{PENALTY_RANGE[0]}, {PENALTY_RANGE[1]:g}]")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise UserError(f"{name.replace('_', ' ')} must be in [-2, 2]")
        if self.seed is not None and not (_is_int(self.seed) and 0 <= self.seed <= MAX_SEED):
            raise UserError("seed must be an integer in [0, 2**63 - 1]")
        if not (isinstance(self.stop_ids, (tuple, list)) and len(self.stop_ids) <= MAX_STOP_IDS
                and all(_is_int(t) and 0 <= t <= MAX_TOKEN_ID for t in self.stop_ids)):
            raise UserError(f"stop ids: at most {MAX_STOP_IDS} token ids")
        self.stop_ids = tuple(self.stop_ids)
        if len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise UserError(f"logit bias has {len(self.logit_bias)} entries; at most {MAX_LOGIT_BIAS}")
        bias = []
        for entry in self.logit_bias:
            t, b = entry if isinstance(entry, (tuple, list)) and len(entry) == 2 else (None, None)
            if not (_is_int(t) and 0 <= t <= MAX_TOKEN_ID and _is_real(b) and -100.0 <= b <= 100.0):
                raise UserError(f"logit bias {str(entry)[:40]}: token ids are integers >= 0 and biases in [-100, 100]")
            bias.append((int(t), float(b)))
        self.logit_bias = tuple(bias)
        if bias:
            self._bias = (np.array([t for t, _ in bias], np.int64), np.array([b for _, b in bias], np.float64))

    def copy_with(self, *, seed: int | None | object = ..., output_from: int | object = ...,
                  stop_ids: tuple[int, ...] | object = ...) -> SamplingParams:
        """A copy with another seed, penalties' window or held-back end tokens, the rest not checked
        again (a thousand-entry logit bias costs half a millisecond to check) and shared, not copied."""
        p = copy.copy(self)
        if stop_ids is not ...:
            p.stop_ids = SamplingParams(stop_ids=stop_ids).stop_ids
        if seed is not ...:
            if seed is not None and not (_is_int(seed) and 0 <= seed <= MAX_SEED):
                raise UserError("seed must be an integer in [0, 2**63 - 1]")
            p.seed = seed
        if output_from is not ...:
            if not _is_int(output_from) or not 0 <= output_from <= MAX_TOKEN_ID:
                raise UserError(f"output_from must be an integer in [0, {MAX_TOKEN_ID}]")
            p.output_from = output_from
        return p

    @property
    def uses_history(self) -> bool:
        """Whether sampling reads the tokens seen so far (penalties)."""
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    def holds_back(self, generated: int) -> bool:
        """Whether the end tokens are held back for a token sampled after `generated` others."""
        return generated < self.min_tokens and bool(self.stop_ids)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _is_real(x) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def logsumexp(logits: np.ndarray) -> float:
    """log(sum(exp(logits))) of one row: the exponentials in float32, their sum in float64 (a
    quarter of `log_softmax`'s float64 pass, paid per sampled token)."""
    m = logits.max()
    return float(m) + float(np.log(np.exp(logits - m).sum(dtype=np.float64)))


def apply_repetition_penalty(logits: np.ndarray, seen: np.ndarray, penalty: float) -> np.ndarray:
    """transformers' rule: positive logits of seen tokens are divided by the penalty, negative multiplied."""
    if penalty == 1.0 or len(seen) == 0:
        return logits
    out = logits.copy()
    vals = out[seen]
    out[seen] = np.where(vals > 0, vals / penalty, vals * penalty)
    return out


def apply_output_penalties(logits: np.ndarray, output: np.ndarray, p: SamplingParams) -> np.ndarray:
    """OpenAI's presence and frequency penalties over the output tokens (vLLM's reading of them)."""
    if (p.presence_penalty == 0.0 and p.frequency_penalty == 0.0) or len(output) == 0:
        return logits
    ids, counts = np.unique(output, return_counts=True)
    out = logits.copy()
    out[ids] -= p.frequency_penalty * counts + p.presence_penalty
    return out


def apply_logit_bias(logits: np.ndarray, p: SamplingParams) -> np.ndarray:
    """The logits with `p.logit_bias` added (ids past the row's end are ignored; each id once)."""
    if p._bias is None:
        return logits
    ids, values = p._bias
    keep = ids < logits.size
    out = logits.copy()
    np.add.at(out, ids[keep], values[keep].astype(out.dtype))
    return out


def apply_allowed(logits: np.ndarray, allowed: np.ndarray | None) -> np.ndarray:
    """Tokens outside `allowed` (a bitmask of int32 words, bit i of word w = token 32w + i, as
    llguidance writes it) to -inf."""
    if allowed is None:
        return logits
    bits = np.unpackbits(np.ascontiguousarray(allowed, dtype="<i4").view(np.uint8), bitorder="little")
    keep = np.zeros(logits.size, dtype=bool)
    n = min(logits.size, bits.size)
    keep[:n] = bits[:n].astype(bool)
    return np.where(keep, logits, -np.inf).astype(logits.dtype, copy=False)


def filter_logits(logits: np.ndarray, p: SamplingParams) -> np.ndarray:
    """Temperature, top-k, top-p, min-p: returns logits with removed tokens at -inf."""
    x = logits.astype(np.float64) / p.temperature
    if p.top_k and p.top_k < x.size:
        kth = np.partition(x, -p.top_k)[-p.top_k]
        x = np.where(x < kth, -np.inf, x)
    if p.top_p < 1.0:
        order = np.argsort(-x, kind="stable")
        probs = np.exp(x[order] - x[order[0]])
        probs /= probs.sum()
        # keep the smallest prefix whose mass reaches top_p (at least one token)
        cut = int(np.searchsorted(np.cumsum(probs), p.top_p)) + 1
        x[order[cut:]] = -np.inf
    if p.min_p > 0.0:
        probs = np.exp(x - x.max())
        x = np.where(probs < p.min_p * probs.max(), -np.inf, x)
    return x


def sample_token(logits: np.ndarray, p: SamplingParams, rng: np.random.Generator, history: np.ndarray,
                 allowed: np.ndarray | None = None) -> int:
    """One token id from one row of logits (V,). `history`: the sequence's tokens so far, in order
    (read only when a penalty is on); `allowed`: structured output's bitmask, or None."""
    if p.repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, np.unique(history), p.repetition_penalty)
    logits = apply_output_penalties(logits, history[p.output_from:], p)
    logits = apply_logit_bias(logits, p)
    if allowed is not None:
        logits = apply_allowed(logits, allowed)
        if not np.isfinite(logits).any():
            raise ValueError("the allowed-token mask allows no token")
    if p.greedy:
        return int(np.argmax(logits))
    x = filter_logits(logits, p)
    x -= x.max()
    return draw(np.exp(x, out=x), rng.random())


DRAW_BLOCK = 1024  # `draw` sums the weights in blocks this wide, and runs a sum only within one block


def draw(weights: np.ndarray, u: float) -> int:
    """The index i where the running sum of `weights` (non-negative floats) first passes u times
    their total: a draw from the distribution they weigh, for u uniform in [0, 1). The running sum
    goes over the block sums, then within the one block the draw lands in: a fraction of a running
    sum over the whole vocabulary, which was the most of a sampled token's time."""
    n = weights.size
    full = n - n % DRAW_BLOCK
    sums = weights[:full].reshape(-1, DRAW_BLOCK).sum(axis=1)
    if full < n:
        sums = np.append(sums, weights[full:].sum())
    running = np.cumsum(sums)
    target = u * running[-1]
    b = min(int(np.searchsorted(running, target, side="right")), len(running) - 1)
    block = weights[b * DRAW_BLOCK : (b + 1) * DRAW_BLOCK]
    i = int(np.searchsorted(np.cumsum(block), target - (running[b - 1] if b else 0.0), side="right"))
    if i >= block.size:  # the block's running sum rounded below its own sum: its last weighted token
        i = int(np.flatnonzero(block)[-1])
    return b * DRAW_BLOCK + i


def top_logprobs(logprobs: np.ndarray, n: int, lse: float = 0.0) -> list[tuple[int, float]]:
    """The n most likely (token id, logprob) pairs, most likely first. Given raw logits, pass
    their `logsumexp` as `lse`."""
    if n <= 0:
        return []
    idx = np.argpartition(-logprobs, n - 1)[:n]
    idx = idx[np.argsort(-logprobs[idx], kind="stable")]
    return [(int(i), float(logprobs[i]) - lse) for i in idx]
