"""The numpy sampler against brute-force definitions and transformers' logits processors."""

import numpy as np
import pytest

from engine.core.errors import UserError
from engine.core.sampling import (SamplingParams, apply_repetition_penalty, filter_logits, log_softmax, sample_token,
                             top_logprobs)

RNG = np.random.default_rng(0)
LOGITS = RNG.normal(0, 3, size=64).astype(np.float32)


def kept(x):
    return set(np.flatnonzero(np.isfinite(x)).tolist())


def test_greedy_is_argmax():
    assert sample_token(LOGITS, SamplingParams(), np.random.default_rng(), np.zeros(0, int)) == int(LOGITS.argmax())


def test_top_k_keeps_the_k_largest():
    assert kept(filter_logits(LOGITS, SamplingParams(temperature=1, top_k=5))) == set(np.argsort(-LOGITS)[:5])


def test_top_p_keeps_smallest_prefix_reaching_p():
    p = np.exp(log_softmax(LOGITS))
    order = np.argsort(-p)
    n = int(np.argmax(np.cumsum(p[order]) >= 0.8)) + 1
    assert kept(filter_logits(LOGITS, SamplingParams(temperature=1, top_p=0.8))) == set(order[:n].tolist())


def test_min_p_drops_tokens_below_fraction_of_best():
    p = np.exp(log_softmax(LOGITS))
    expect = set(np.flatnonzero(p >= 0.1 * p.max()).tolist())
    assert kept(filter_logits(LOGITS, SamplingParams(temperature=1, min_p=0.1))) == expect


def test_processors_match_transformers():
    torch = pytest.importorskip("torch")
    from transformers import (MinPLogitsWarper, RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                              TopKLogitsWarper, TopPLogitsWarper)

    seen = np.array([3, 7, 11, 40])
    ids = torch.tensor([seen.tolist()])
    x = torch.tensor(LOGITS)[None].double()
    ref = RepetitionPenaltyLogitsProcessor(1.3)(ids, x.clone())
    np.testing.assert_allclose(apply_repetition_penalty(LOGITS.astype(np.float64), seen, 1.3), ref[0].numpy())
    for warper, params in [
        (TopKLogitsWarper(7), SamplingParams(temperature=0.7, top_k=7)),
        (TopPLogitsWarper(0.9), SamplingParams(temperature=0.7, top_p=0.9)),
        (MinPLogitsWarper(0.05), SamplingParams(temperature=0.7, min_p=0.05)),
    ]:
        ref = warper(ids, TemperatureLogitsWarper(0.7)(ids, x.clone()))[0].numpy()
        assert kept(filter_logits(LOGITS, params)) == kept(np.where(np.isneginf(ref), -np.inf, ref))


def test_sampling_follows_the_distribution_and_seed():
    p = SamplingParams(temperature=1.0, seed=3)
    draws = [sample_token(LOGITS, p, np.random.default_rng(i), np.zeros(0, int)) for i in range(4000)]
    freq = np.bincount(draws, minlength=64) / len(draws)
    np.testing.assert_allclose(freq, np.exp(log_softmax(LOGITS)), atol=0.03)
    a = [sample_token(LOGITS, p, np.random.default_rng(5), np.zeros(0, int)) for _ in range(5)]
    assert len(set(a)) == 1


def test_top_logprobs_sorted_and_normalized():
    lp = log_softmax(LOGITS)
    top = top_logprobs(lp, 4)
    assert [t for t, _ in top] == np.argsort(-lp)[:4].tolist()
    assert abs(np.exp(lp).sum() - 1) < 1e-9


@pytest.mark.parametrize("kw", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-2),
                                dict(min_p=2), dict(repetition_penalty=0), dict(logprobs=50)])
def test_bad_params_are_user_errors(kw):
    with pytest.raises(UserError):
        SamplingParams(**kw)


def test_logsumexp_gives_log_softmax_of_the_chosen_token():
    """The stage's log-probabilities: float32 exponentials summed in float64, against float64."""
    from engine.core.sampling import logsumexp

    row = (np.random.default_rng(3).standard_normal(49152) * 8).astype(np.float32)
    lp = log_softmax(row)
    assert abs(float(row[123]) - logsumexp(row) - lp[123]) < 1e-6
    got, want = top_logprobs(row, 5, logsumexp(row)), top_logprobs(lp, 5)
    assert [i for i, _ in got] == [i for i, _ in want]
    np.testing.assert_allclose([v for _, v in got], [v for _, v in want], atol=1e-6)


def test_openai_penalties_bias_and_mask_as_defined():
    """OpenAI's presence/frequency penalties count the output only (from `output_from`); logit bias
    adds; the allowed-token mask keeps exactly its bits, whatever the sampling."""
    from engine.core.sampling import apply_allowed

    history = np.array([5, 9, 9, 3, 3, 3], np.int64)  # prompt [5, 9], output [9, 3, 3, 3]
    p = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25, output_from=2, logit_bias=((7, 3.0),))
    want = LOGITS.astype(np.float64).copy()
    want[9] -= 0.5 + 0.25 * 1
    want[3] -= 0.5 + 0.25 * 3
    want[7] += 3.0
    assert sample_token(LOGITS, p, np.random.default_rng(), history) == int(np.argmax(want))
    allowed = np.zeros((LOGITS.size + 31) // 32, np.int32)
    for t in (4, 33 % LOGITS.size):
        allowed[t // 32] |= np.int32(1 << (t % 32)) if t % 32 < 31 else np.int32(-(2**31))
    kept = np.isfinite(apply_allowed(LOGITS, allowed))
    assert sorted(np.nonzero(kept)[0].tolist()) == sorted({4, 33 % LOGITS.size})
    hot = SamplingParams(temperature=1.5, top_k=3, seed=0)
    draws = {sample_token(LOGITS, hot, np.random.default_rng(i), history[:0], allowed) for i in range(50)}
    assert draws <= {4, 33 % LOGITS.size}
    with pytest.raises(ValueError, match="allows no token"):
        sample_token(LOGITS, p, np.random.default_rng(), history, np.zeros_like(allowed))


@pytest.mark.parametrize("kw", [dict(top_k=2**64), dict(top_k=2**31), dict(top_k=-1), dict(seed=2**63), dict(seed=-1),
                                dict(temperature=float("nan")), dict(temperature=float("inf")),
                                dict(top_p=float("nan")),
                                dict(repetition_penalty=1e-320), dict(repetition_penalty=1e300),
                                dict(logit_bias=((1, float("nan")),)), dict(logit_bias=((2**40, 1.0),)),
                                dict(logit_bias=((True, 1.0),)), dict(logit_bias=((1, 2, 3),)),
                                dict(logit_bias=tuple((i, 1.0) for i in range(1025))), dict(logprobs=21)])
def test_out_of_bounds_params_are_refused(kw):
    """Every bound the wire and the sampler need, checked where any path builds the params."""
    with pytest.raises(UserError):
        SamplingParams(**kw)


def test_underflowing_temperature_is_greedy():
    """logits / 1e-320 are inf: such a temperature samples as greedy, as vLLM treats one below 1e-5."""
    p = SamplingParams(temperature=1e-320, seed=1)
    assert p.greedy and sample_token(LOGITS, p, np.random.default_rng(), np.zeros(0, int)) == int(LOGITS.argmax())
    assert not SamplingParams(temperature=1e-4).greedy


def test_copy_with_shares_the_checked_bias_and_checks_what_changes():
    bias = tuple((i, 0.5) for i in range(1024))
    p = SamplingParams(temperature=1.0, logit_bias=bias, seed=3)
    q = p.copy_with(seed=4, output_from=9)
    assert (q.seed, q.output_from, p.seed, p.output_from) == (4, 9, 3, 0)
    assert q.logit_bias is p.logit_bias
    with pytest.raises(UserError):
        p.copy_with(seed=2**64)
    # the bias arrays add as the tuple says
    row = np.zeros(2048, np.float32)
    got = sample_token(row, SamplingParams(logit_bias=((5, 3.0), (7, 4.0))), np.random.default_rng(), np.zeros(0, int))
    assert got == 7
