"""Speculative decoding: drafts verified several tokens a pass. Outputs are token-identical with
and without it (greedy; and seeded sampling, which draws the same random stream position by
position), on torch, MLX and an MLX + torch daemon pair, for tiny models of several families and
the real one; under a schema; in a batch where only some sequences draft. A stage drops the
rejected positions from its KV cache; prefix-cache hits after speculation give the same tokens."""

from __future__ import annotations

import numpy as np
import pytest

from engine.api import Generator, SamplingParams, SpeculativeConfig, connect_pipeline, load_stage, local_pipeline
from engine.app.procs import start_stage, stop_stages
from engine.core.stage import SeqChunk, StageBatch
from engine.api import UserError
from engine.serving.speculative import Drafter, lookup, parse_speculative

CODE = ("def area(width, height):\n    return width * height\n\n\n"
        "def perimeter(width, height):\n    return 2 * (width + height)\n")
EDIT = [{"role": "user", "content": f"Rename width to w and height to h in this code:\n\n{CODE}"}]
SPEC = SpeculativeConfig("ngram", num_draft_tokens=4)


def test_lookup_takes_the_latest_longest_match_and_the_drafter_backs_off():
    seq = np.array([7, 1, 2, 3, 9, 1, 2, 3, 4, 5, 1, 2, 3])
    assert lookup(seq, seq, 3, 1, 3, skip_last=True) == ([4, 5, 1], 8)  # the latest earlier "1 2 3"
    assert lookup(np.array([5, 6]), np.array([5, 6]), 3, 1, 2, skip_last=True) == ([], 0)
    # a prediction is read in step with the output: the match ending nearest its cursor
    assert lookup(np.array([1, 2, 3]), seq, 2, 1, 3, skip_last=False, cursor=5) == ([9, 1], 4)
    d = Drafter(SPEC)
    d.verified(4, 4)
    assert d.k == 4  # capped at num_draft_tokens
    d.verified(4, 1)
    assert d.k == 2
    d.verified(2, 0)
    d.verified(1, 0)  # two misses in a row: no drafts for a few steps
    assert [d.propose([1, 2, 1, 2], [1], 8) for _ in range(4)] == [[]] * 4 and d.propose([1, 2, 1, 2], [1], 8)


def test_the_command_lines_speculative_options():
    assert parse_speculative("ngram", None) == SpeculativeConfig("ngram", 8)
    assert parse_speculative("ngram", 8).num_draft_tokens == 8 and parse_speculative(None, None) is None
    assert parse_speculative("draft:smollm2-q4", 4) == SpeculativeConfig("draft", 4, draft_model="smollm2-q4")
    for spec, k, why in (("draft:", None, "names the draft model"), ("eagle", None, "one of ngram"),
                         ("ngram", 0, r"\[1, 32\]"), (None, 4, "needs --speculative")):
        with pytest.raises(UserError, match=why):
            parse_speculative(spec, k)


def _stage(backend: str, model_dir):
    """An in-process stage of all 4 layers, or (backend "daemon") a torch stage daemon's, driven over
    the wire and read through its status (`RemoteStage`); and what stops it."""
    if backend != "daemon":
        stage = load_stage(backend, model_dir, 0, 3)
        return stage, stage.close
    from engine.core.identity import config_hash
    from transport.client import Client, RemoteStage

    proc, address = start_stage("torch", model_dir, "float32", extra=["--layers", "0-3"])
    client = Client(30)
    return RemoteStage(client, address, identity={"config": config_hash(model_dir)}), lambda: (
        client.close(), stop_stages([proc]))


@pytest.mark.parametrize("backend", ["torch", "mlx", "daemon"])
def test_a_stage_keeps_only_the_taken_positions(tiny_dirs, backend):
    """A draft's rows are sampled in turn; the next chunk, starting past the taken drafts, drops the
    rest from the stage's cache (as its status reports, over the wire for a daemon); what follows
    equals plain decoding's."""

    stage, stop = _stage(backend, tiny_dirs["llama"])
    greedy = SamplingParams()

    prompt = list(b"abcabc")
    first = stage.forward(StageBatch([SeqChunk(2, 0, np.asarray(prompt, np.int32), greedy)])).tokens[0].token_id
    truth = [first]
    for _ in range(6):  # plain decoding, one token a step
        r = stage.forward(StageBatch([SeqChunk(2, len(prompt) + len(truth) - 1, np.asarray(truth[-1:], np.int32),
                                               greedy)]))
        truth.append(r.tokens[0].token_id)
    stage.release([2])
    stage.forward(StageBatch([SeqChunk(3, 0, np.asarray(prompt, np.int32), greedy)]))
    drafts = [truth[1], truth[2], (truth[3] + 1) % 256]  # two right, then a wrong one
    r = stage.forward(StageBatch([SeqChunk(3, len(prompt), np.asarray([first, *drafts], np.int32), greedy,
                                           draft=3)]))
    assert [t.token_id for t in r.tokens] == truth[1:4]  # the two drafts taken, then the model's own third
    assert stage.kv_tokens_used() == len(prompt) + 4
    r = stage.forward(StageBatch([SeqChunk(3, len(prompt) + 3, np.asarray([truth[3]], np.int32), greedy)]))
    assert stage.kv_tokens_used() == len(prompt) + 4  # the rejected draft's position dropped, the new one kept
    assert r.tokens[0].token_id == truth[4]
    with pytest.raises(UserError, match="offset"):  # only the last chunk's drafts may be dropped
        stage.forward(StageBatch([SeqChunk(3, len(prompt), np.asarray([1], np.int32), greedy)]))
    stop()


@pytest.mark.parametrize("variant", ["llama", "qwen2", "mistral-window", "gemma2", "qwen3_moe"])
@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_tiny_models_decode_the_same_tokens_with_drafts(tiny_dirs, variant, backend):
    """Greedy with prompt lookup; sampled (top-2, so drafts are sometimes taken) with the greedy
    answer as a prediction: the same tokens as without drafts, seed for seed."""
    d = tiny_dirs[variant]
    with Generator(d, local_pipeline(d, backend, dtype="float32"), speculative=SPEC, prefix_cache=False) as gen:
        a = gen.generate("abcabcabc", max_tokens=40, ignore_eos=True)  # prompt lookup: hits if the output loops
        b = gen.generate("abcabcabc", max_tokens=40, ignore_eos=True, speculate=False)
        assert a.token_ids == b.token_ids and b.speculative is None and a.speculative is not None
        wrong = [t if i % 7 else (t + 1) % 256 for i, t in enumerate(b.token_ids)]  # every 7th token rejected
        a = gen.generate("abcabcabc", max_tokens=40, ignore_eos=True, prediction=wrong)
        assert a.token_ids == b.token_ids and a.speculative["accepted"] >= 20
        taken = 0
        for seed in range(4):
            sampling = SamplingParams(temperature=0.8, top_k=2, seed=seed)
            a = gen.generate("abcabcabc", max_tokens=24, ignore_eos=True, sampling=sampling, prediction=b.token_ids)
            c = gen.generate("abcabcabc", max_tokens=24, ignore_eos=True, sampling=sampling, speculate=False)
            assert a.token_ids == c.token_ids
            taken += a.speculative["accepted"]
        assert taken > 0


@pytest.mark.parametrize("spec", ["torch", "mlx"])
def test_the_real_model_edits_code_with_ngram_drafts(real_model, spec):
    with Generator(real_model, local_pipeline(real_model, spec, dtype="float32"), speculative=SPEC) as gen:
        ids = gen.prompt_ids(EDIT, chat=True)
        a = gen.generate(ids, max_tokens=64, ignore_eos=True)
        b = gen.generate(ids, max_tokens=64, ignore_eos=True, speculate=False)
        assert a.token_ids == b.token_ids
        assert a.speculative["accepted"] >= 16, a.speculative  # the edit repeats most of the code
        # the same prompt again, now from the prefix cache, with its answer's blocks partly cached
        turn2 = ids + a.token_ids + gen.prompt_ids("Thanks.")
        assert gen.generate(turn2, max_tokens=16).token_ids == gen.generate(turn2, max_tokens=16,
                                                                              speculate=False).token_ids
        schema = {"type": "object", "properties": {"code": {"type": "string", "maxLength": 200}}, "required": ["code"]}
        a = gen.generate(ids, max_tokens=80, json_schema=schema)
        b = gen.generate(ids, max_tokens=80, json_schema=schema, speculate=False)
        assert a.token_ids == b.token_ids


def test_a_batch_where_some_draft_and_some_do_not(real_model):
    with Generator(real_model, local_pipeline(real_model, "torch", dtype="float32"), speculative=SPEC) as gen:
        ids = gen.prompt_ids(EDIT, chat=True)
        other = gen.prompt_ids("Write a short poem about the sea.")
        solo = [gen.generate(p, max_tokens=40, ignore_eos=True, speculate=False).token_ids for p in (ids, other)]
        streams = [gen.stream(ids, max_tokens=40, ignore_eos=True), gen.stream(other, max_tokens=40, ignore_eos=True,
                                                                                speculate=False),
                   gen.stream(ids, max_tokens=40, ignore_eos=True, sampling=SamplingParams(temperature=0.7, seed=2))]
        got = [[c.token_id for c in s] for s in streams]
        sampled = gen.generate(ids, max_tokens=40, ignore_eos=True, speculate=False,
                               sampling=SamplingParams(temperature=0.7, seed=2)).token_ids
        assert got == [solo[0], solo[1], sampled]
        assert streams[0].request.speculative["accepted"] > 0 and streams[1].request.speculative is None


def test_an_mlx_and_torch_daemon_pair_decodes_the_same_tokens(real_model):
    (a, addr_a), (b, addr_b) = start_stage("mlx", real_model, "float32"), start_stage("torch", real_model, "float32")
    try:
        with Generator(real_model, connect_pipeline(real_model, f"{addr_a}=0-14,{addr_b}=15-29"),
                       speculative=SPEC) as gen:
            ids = gen.prompt_ids(EDIT, chat=True)
            fast = gen.generate(ids, max_tokens=48, ignore_eos=True)
            slow = gen.generate(ids, max_tokens=48, ignore_eos=True, speculate=False)
            schema = {"type": "object", "properties": {"code": {"type": "string", "maxLength": 120}}}
            shaped = [gen.generate(ids, max_tokens=60, json_schema=schema, speculate=s).token_ids
                      for s in (True, False)]
            assert shaped[0] == shaped[1] and gen.engine.accepted > fast.speculative["accepted"]  # masks per position
            assert all(not s for s in _live(gen))  # every stage let go of every sequence
    finally:
        stop_stages([a, b])
    assert fast.token_ids == slow.token_ids and fast.speculative["accepted"] > 8


def _live(gen) -> list:
    return [s.live_sequences() for s in gen.pipeline.stages]


def test_sampled_tokens_keep_the_models_distribution(tiny_dirs):
    """Temperature 0.8, different seeds each way: the first 3 tokens' joint distribution with drafts
    equals the one without (a chi-square test over 2 x 1500 samples; the run is seeded). The drafts
    are the greedy answer, as a prediction: taken about half the time, rejected the rest."""
    from scipy.stats import chi2_contingency

    d = tiny_dirs["llama"]
    with Generator(d, local_pipeline(d, "torch", dtype="float32"), prefix_cache=False) as gen:
        greedy = gen.generate("abcabcabc", max_tokens=3, ignore_eos=True).token_ids

        def draws(drafts: list[int] | None, seeds: range) -> list[tuple]:
            out = []  # top-2 at 0.8 on a tiny random model: 8 outcomes, each often enough to test
            for at in range(0, len(seeds), 500):
                streams = [gen.stream("abcabcabc", max_tokens=3, ignore_eos=True, prediction=drafts,
                                      sampling=SamplingParams(temperature=0.8, top_k=2, seed=s))
                           for s in seeds[at : at + 500]]
                out += [tuple(c.token_id for c in s) for s in streams]
            return out

        with_drafts, without = draws(greedy, range(1500)), draws(None, range(10_000, 11_500))
        assert gen.engine.accepted > 100  # the drafts (the greedy answer) were taken often
    kinds = sorted(set(with_drafts) | set(without))
    table = np.array([[xs.count(k) for k in kinds] for xs in (with_drafts, without)])
    common = table.sum(0) >= 10  # rare outcomes pooled, so every expected count is large enough
    table = np.column_stack([table[:, common], table[:, ~common].sum(1)]) if (~common).any() else table[:, common]
    assert table.shape[1] >= 3
    assert chi2_contingency(table).pvalue > 1e-3


def test_a_draft_model_drafts_and_the_output_is_unchanged(tiny_dirs):
    """A smaller model of the same vocabulary drafts greedily on its own in-process stage (its own
    KV cache, rolled back to what the target took); the target's output is the same, greedy and
    seeded; a draft model of another vocabulary is refused; the command line loads one."""
    import json
    import subprocess
    import sys

    from engine.serving.draft_model import DraftModel

    target, small = tiny_dirs["llama"], tiny_dirs["qwen2"]
    draft = DraftModel(local_pipeline(small, "torch", dtype="float32"), small, 256)
    spec = SpeculativeConfig("draft", 4, draft_model=str(small), draft=draft)
    with Generator(target, local_pipeline(target, "torch", dtype="float32"), speculative=spec) as gen:
        for sampling in (None, SamplingParams(temperature=0.8, top_k=2, seed=3)):
            a = gen.generate("abcabcabc", max_tokens=32, ignore_eos=True, sampling=sampling)
            b = gen.generate("abcabcabc", max_tokens=32, ignore_eos=True, sampling=sampling, speculate=False)
            assert a.token_ids == b.token_ids and a.speculative["drafted"] >= 8
        assert draft.fed == {}  # each finished sequence let go of in the draft's cache
    other = local_pipeline(small, "torch", dtype="float32")
    with pytest.raises(UserError, match="vocabulary"):
        DraftModel(other, small, 49152)
    other.close()
    out = subprocess.run([sys.executable, "-m", "engine.app.cli", "generate", "--model", str(target), "--local",
                          "torch", "--speculative", f"draft:{small}", "--max-tokens", "12", "--ignore-eos", "--json",
                          "abcabc"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["speculative"]["drafted"] > 0


def test_a_draft_model_on_a_stage_daemon_of_its_own(tiny_dirs):
    """`--draft-stages`: the draft model on a daemon holding all its layers (one DRAFT message a
    step); the output equals plain decoding's, the daemon lets go of every sequence, a lost draft
    daemon only stops the drafting, and the command line takes it (and refuses it without a draft
    model)."""
    import json
    import subprocess
    import sys

    from engine.serving.draft_model import DraftModel

    target, small = tiny_dirs["llama"], tiny_dirs["qwen2"]
    proc, address = start_stage("torch", small, "float32")
    try:
        draft_pipe = connect_pipeline(small, address)
        remote, local = DraftModel(draft_pipe, small, 256), DraftModel(local_pipeline(small, "torch"), small, 256)
        for tokens in ([5, 6, 7, 8], [5, 6, 7, 8, 9, 10], [5, 6, 1, 2]):  # fed on, then rolled back to 2 tokens
            assert remote.propose(1, tokens, 4) == local.propose(1, tokens, 4)
        remote.release(1)
        local.close()
        spec = SpeculativeConfig("draft", 4, draft_model=str(small), draft=remote)
        with Generator(target, local_pipeline(target, "torch", dtype="float32"), speculative=spec) as gen:
            a = gen.generate("abcabcabc", max_tokens=32, ignore_eos=True)
            b = gen.generate("abcabcabc", max_tokens=32, ignore_eos=True, speculate=False)
            assert a.token_ids == b.token_ids and a.speculative["drafted"] >= 8
            assert draft_pipe.stages[0].live_sequences() == []  # the Generator closes the draft model with it
            stop_stages([proc])  # the draft daemon lost: decoding goes on without drafts, unchanged
            c = gen.generate("abcabcabc", max_tokens=32, ignore_eos=True)
            assert c.token_ids == b.token_ids and remote.failed
        proc, address = start_stage("torch", small, "float32")  # a fresh one for the command line
        cmd = [sys.executable, "-m", "engine.app.cli", "generate", "--model", str(target), "--local", "torch",
               "--max-tokens", "12", "--ignore-eos", "--json", "abcabc", "--draft-stages", address]
        out = subprocess.run(cmd + ["--speculative", f"draft:{small}"], capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["speculative"]["drafted"] > 0
        out = subprocess.run(cmd + ["--speculative", "ngram"], capture_output=True, text=True, timeout=300)
        assert out.returncode == 2 and "--draft-stages" in out.stderr and "Traceback" not in out.stderr
    finally:
        stop_stages([proc])


def test_drafts_stay_within_the_batch_token_budget(tiny_dirs):
    """Every micro-batch, drafts included, holds at most `max_batch_tokens` tokens; outputs unchanged."""
    d = tiny_dirs["llama"]
    with Generator(d, local_pipeline(d, "torch", dtype="float32"), max_batch_tokens=6) as gen:
        plain = gen.generate("abcabcabc", max_tokens=24, ignore_eos=True).token_ids
        sizes, submit = [], gen.pipeline.submit
        gen.pipeline.submit = lambda tag, batch: (sizes.append(sum(len(s.token_ids) for s in batch.seqs)),
                                                  submit(tag, batch))[1]
        streams = [gen.stream("abcabcabc", max_tokens=24, ignore_eos=True, prediction=plain) for _ in range(3)]
        assert [[c.token_id for c in s] for s in streams] == [plain] * 3
        assert max(sizes) <= 6 and gen.engine.accepted > 0
