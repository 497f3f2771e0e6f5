"""lm-eval's `local-completions` model against `hetpipe serve`: a small multiple-choice task from a
local file (`tests/lm_eval_task/`), scored by echo + logprobs + max_tokens 0 requests, gives per
choice the log-likelihood transformers computes on the same weights (float32, within 1e-4) and the
same greedy flags, hence the same accuracy."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from engine.app.procs import start_server, stop_stages

TASK = Path(__file__).parent / "lm_eval_task"


@pytest.fixture(scope="module")
def server(real_model):
    proc, url = start_server(["--model", str(real_model), "--local", "torch", "--dtype", "float32", "--port", "0"])
    yield url
    stop_stages([proc])


def encode_pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's own split of a (context, continuation) pair into token ids (`TemplateLM._encode_pair`)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    return ctx, whole[len(ctx):]


def test_a_multiple_choice_task_scores_as_transformers(server, real_model, tmp_path):
    task = tmp_path / "task"
    task.mkdir()
    yaml = (TASK / "hetpipe_mc.yaml").read_text().replace("DATA", str(TASK / "mc.jsonl"))
    (task / "hetpipe_mc.yaml").write_text(yaml)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "ds")}
    args = (f"model=smollm2,base_url={server}/v1/completions,num_concurrent=1,max_retries=1,"
            f"tokenizer_backend=huggingface,tokenizer={real_model}")
    r = subprocess.run([sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args", args,
                        "--tasks", "hetpipe_mc", "--include_path", str(task), "--log_samples",
                        "--output_path", str(tmp_path / "out")], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    samples = [json.loads(line) for f in (tmp_path / "out").rglob("samples_hetpipe_mc_*.jsonl")
               for line in f.read_text().splitlines()]
    docs = [json.loads(line) for line in (TASK / "mc.jsonl").read_text().splitlines()]
    assert sorted(s["doc_id"] for s in samples) == list(range(len(docs)))

    tok = AutoTokenizer.from_pretrained(real_model)
    model = AutoModelForCausalLM.from_pretrained(real_model, dtype=torch.float32).eval()
    correct = 0
    for s in samples:
        doc = docs[s["doc_id"]]
        want = []
        for choice in doc["choices"]:
            ctx, cont = encode_pair(tok, doc["question"], " " + choice)
            with torch.no_grad():
                lp = torch.log_softmax(model(torch.tensor([ctx + cont])).logits[0].double(), -1)
            rows = lp[len(ctx) - 1 : len(ctx) + len(cont) - 1]
            greedy = bool((rows.argmax(-1) == torch.tensor(cont)).all())
            want.append((float(rows[range(len(cont)), cont].sum()), greedy))
        got = [(float(ll), greedy == "True") for ((ll, greedy),) in s["resps"]]
        for (ll, greedy), (ref, ref_greedy) in zip(got, want):
            assert abs(ll - ref) < 1e-4 and greedy == ref_greedy, (doc, got, want)
        correct += max(range(len(want)), key=lambda i: want[i][0]) == doc["answer"]
        assert s["acc"] == float(max(range(len(got)), key=lambda i: got[i][0]) == doc["answer"])
    results = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())["results"]["hetpipe_mc"]
    assert results["acc,none"] == pytest.approx(correct / len(docs))
