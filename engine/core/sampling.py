"""Sampling in plain numpy: the last stage uses it whatever its backend.

Order of logit processing: repetition penalty (transformers' rule, over prompt and output),
presence and frequency penalties (OpenAI's, over the output only), logit bias, the allowed-token
mask of structured output, then temperature, top-k, top-p, min-p. Log-probabilities are those of the model's own distribution (log-softmax of the raw
logits), as vLLM and llama.cpp report them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import UserError


@dataclass(slots=True)
class SamplingParams:
    temperature: float = 0.0  # 0: greedy
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

    def __post_init__(self):
        if self.temperature < 0:
            raise UserError("temperature must be >= 0")
        if self.top_k < 0:
            raise UserError("top-k must be >= 0")
        if not 0 < self.top_p <= 1:
            raise UserError("top-p must be in (0, 1]")
        if not 0 <= self.min_p <= 1:
            raise UserError("min-p must be in [0, 1]")
        if self.repetition_penalty <= 0:
            raise UserError("repetition penalty must be > 0")
        if not 0 <= self.logprobs <= 20:
            raise UserError("logprobs must be between 0 and 20")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise UserError(f"{name.replace('_', ' ')} must be in [-2, 2]")
        self.logit_bias = tuple((int(t), float(b)) for t, b in self.logit_bias)
        for t, b in self.logit_bias:
            if t < 0 or not -100.0 <= b <= 100.0:
                raise UserError(f"logit bias {{{t}: {b}}}: token ids are >= 0 and biases in [-100, 100]")
        if self.output_from < 0:
            raise UserError("output_from must be >= 0")

    @property
    def uses_history(self) -> bool:
        """Whether sampling reads the tokens seen so far (penalties)."""
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def logsumexp(logits: np.ndarray) -> float:
    """log(sum(exp(logits))) of one row: the exponentials in float32, their sum in float64 (over a
    49k vocabulary 0.11 ms against 0.43 for `log_softmax`'s float64 pass, per sampled token)."""
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


def apply_logit_bias(logits: np.ndarray, bias: tuple[tuple[int, float], ...]) -> np.ndarray:
    if not bias:
        return logits
    out = logits.copy()
    for t, b in bias:
        if t < out.size:
            out[t] += b
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
    logits = apply_logit_bias(logits, p.logit_bias)
    if allowed is not None:
        logits = apply_allowed(logits, allowed)
        if not np.isfinite(logits).any():
            raise ValueError("the allowed-token mask allows no token")
    if p.greedy:
        return int(np.argmax(logits))
    x = filter_logits(logits, p)
    probs = np.exp(x - x.max())
    cdf = np.cumsum(probs)
    return int(min(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"), x.size - 1))


def top_logprobs(logprobs: np.ndarray, n: int, lse: float = 0.0) -> list[tuple[int, float]]:
    """The n most likely (token id, logprob) pairs, most likely first. Given raw logits, pass
    their `logsumexp` as `lse`."""
    if n <= 0:
        return []
    idx = np.argpartition(-logprobs, n - 1)[:n]
    idx = idx[np.argsort(-logprobs[idx], kind="stable")]
    return [(int(i), float(logprobs[i]) - lse) for i in idx]
