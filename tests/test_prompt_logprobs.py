"""Prompt log-probabilities: the last stage scores every prompt token given those before it, chunk
by chunk, and the scores come back as sampled tokens do. Checked against transformers on the same
weights (float32), across a chunked prefill, through an MLX + torch daemon pair against the same
split in-process, and with the prefix cache holding the prompt already."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from engine.api import Generator, connect_pipeline, local_pipeline
from engine.app.procs import start_stage, stop_stages

TEXT = ("The lighthouse keeper wrote in his log each night: the weather, the ships that passed, "
        "and the number of gulls on the rail. On the third of March he wrote only one word.")


@pytest.fixture(scope="module")
def reference(real_model):
    """Per prompt position: transformers' log-probabilities of the whole vocabulary (float64)."""
    with Generator(real_model, None) as tok:
        ids = tok.prompt_ids(TEXT)
    model = AutoModelForCausalLM.from_pretrained(real_model, dtype=torch.float32).eval()
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1).numpy()
    return ids, lp


def check(scores: list[dict], ids: list[int], lp: np.ndarray, k: int, atol: float = 1e-4) -> None:
    assert [s["token_id"] for s in scores] == ids
    assert scores[0]["logprob"] is None and scores[0]["top"] == []
    for i in range(1, len(ids)):
        row = lp[i - 1]
        assert abs(scores[i]["logprob"] - row[ids[i]]) < atol, i
        best = np.argsort(-row, kind="stable")[:k]
        assert [t["token_id"] for t in scores[i]["top"]] == best.tolist(), i
        np.testing.assert_allclose([t["logprob"] for t in scores[i]["top"]], row[best], atol=atol)


def test_scores_equal_transformers_across_prefill_chunks(real_model, reference):
    ids, lp = reference
    assert len(ids) > 32
    # 16-token micro-batches: the prompt is prefilled in chunks, each scored with the row before it
    with Generator(real_model, local_pipeline(real_model, "torch:0-14,torch:15-29", dtype="float32"),
                   max_batch_tokens=16) as gen:
        r = gen.generate(ids, max_tokens=2, prompt_logprobs=3, ignore_eos=True)
        check(r.prompt_logprobs, ids, lp, 3)
        plain = gen.generate(ids, max_tokens=2, ignore_eos=True)
        assert plain.prompt_logprobs is None and plain.token_ids == r.token_ids
        # the prompt is in the prefix cache now; a scored request still computes (and scores) all of it
        again = gen.generate(ids, max_tokens=2, prompt_logprobs=0, ignore_eos=True)
        assert again.cached_tokens == 0
        assert [s["logprob"] for s in again.prompt_logprobs] == [s["logprob"] for s in r.prompt_logprobs]
        assert all(s["top"] == [] for s in again.prompt_logprobs)


def test_an_mlx_and_torch_daemon_pair_scores_as_in_process(real_model, reference):
    ids, lp = reference
    (a, addr_a), (b, addr_b) = start_stage("mlx", real_model, "float32"), start_stage("torch", real_model, "float32")
    try:
        with Generator(real_model, connect_pipeline(real_model, f"{addr_a}=0-14,{addr_b}=15-29")) as gen:
            remote = gen.generate(ids, max_tokens=1, prompt_logprobs=2).prompt_logprobs
    finally:
        stop_stages([a, b])
    with Generator(real_model, local_pipeline(real_model, "mlx:0-14,torch:15-29", dtype="float32")) as gen:
        local = gen.generate(ids, max_tokens=1, prompt_logprobs=2).prompt_logprobs
    check(remote, ids, lp, 2)
    for x, y in zip(remote[1:], local[1:]):  # float32 sums, threaded otherwise in a daemon: not bit for bit
        assert abs(x["logprob"] - y["logprob"]) < 1e-4 and [t["token_id"] for t in x["top"]] == \
            [t["token_id"] for t in y["top"]]
