"""Both backends against transformers' own model classes on tiny random checkpoints.

Each model_type: no cache, with cache (chunked prefill), decode steps, a ragged batch of 2,
hidden states at a stage boundary, and a pipeline split across the two backends.
"""

import numpy as np
import pytest

from engine.compose.stages import load_stage
from engine.core.errors import UserError
from engine.core.pipeline import run_stages
from engine.core.sampling import SamplingParams
from engine.core.stage import SeqChunk, Stage, StageBatch
from reference import hf_hidden, hf_logprobs, hf_model
from tiny import VARIANTS

BACKENDS = ["mlx", "torch"]
MODELS = [*VARIANTS, "sharded"]
P5 = SamplingParams(logprobs=5)
IDS_A = [5, 17, 33, 9, 100, 7, 3, 250, 64, 12, 8]
IDS_B = [200, 1, 42]
TOL = 2e-4
BF16_TOL = 0.05  # bf16 rounding: a fused kernel may round intermediates at other points


def check_token(tok, ref_row):
    """Sampled (greedy) token and its top-5 log-probabilities equal the reference row."""
    assert tok.token_id == int(np.argmax(ref_row))
    assert abs(tok.logprob - ref_row[tok.token_id]) < TOL
    ref_top = np.argsort(-ref_row)[:5]
    assert [t for t, _ in tok.top] == ref_top.tolist()
    np.testing.assert_allclose([lp for _, lp in tok.top], ref_row[ref_top], atol=TOL)


@pytest.fixture(scope="module")
def refs(tiny_dirs):
    return {name: hf_model(tiny_dirs["llama" if name == "sharded" else name]) for name in MODELS}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("model", MODELS)
def test_no_cache_cache_decode_and_ragged_batch(tiny_dirs, refs, backend, model):
    stage = load_stage(backend, tiny_dirs[model], 0, 3)
    ref_a = hf_logprobs(refs[model], IDS_A)
    ref_b = hf_logprobs(refs[model], IDS_B)

    # without cache: the whole prompt in one call
    (tok,) = stage.forward(StageBatch([SeqChunk(0, 0, np.array(IDS_A, np.int32), P5)])).tokens
    check_token(tok, ref_a[-1])
    stage.release([0])
    assert stage.live_sequences() == []

    # with cache: prefill 4, then a chunk of 4 (offset 4), then decode steps one token at a time
    stage.forward(StageBatch([SeqChunk(1, 0, np.array(IDS_A[:4], np.int32), None)]))
    (tok,) = stage.forward(StageBatch([SeqChunk(1, 4, np.array(IDS_A[4:8], np.int32), P5)])).tokens
    check_token(tok, ref_a[7])
    for pos in range(8, len(IDS_A)):
        (tok,) = stage.forward(StageBatch([SeqChunk(1, pos, np.array([IDS_A[pos]], np.int32), P5)])).tokens
        check_token(tok, ref_a[pos])

    # ragged batch of 2: prompts of 6 and 2 tokens in one call, then one decode step of both
    out = stage.forward(StageBatch([SeqChunk(2, 0, np.array(IDS_A[:6], np.int32), P5),
                                    SeqChunk(3, 0, np.array(IDS_B[:2], np.int32), P5)])).tokens
    check_token(out[0], ref_a[5])
    check_token(out[1], ref_b[1])
    out = stage.forward(StageBatch([SeqChunk(2, 6, np.array([IDS_A[6]], np.int32), P5),
                                    SeqChunk(3, 2, np.array([IDS_B[2]], np.int32), P5)])).tokens
    check_token(out[0], ref_a[6])
    check_token(out[1], ref_b[2])
    assert stage.live_sequences() == [1, 2, 3]
    stage.release([1, 2, 3])
    assert stage.live_sequences() == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_hidden_at_stage_boundary(tiny_dirs, refs, backend):
    stage = load_stage(backend, tiny_dirs["qwen2"], 0, 1)
    out = stage.forward(StageBatch([SeqChunk(0, 0, np.array(IDS_A, np.int32))]))
    assert out.tokens == [] and out.hidden.dtype == "float32"
    np.testing.assert_allclose(out.hidden.data, hf_hidden(refs["qwen2"], IDS_A, 2), atol=1e-4)


@pytest.mark.parametrize("spec", [("mlx", "torch"), ("torch", "mlx"), ("torch", "torch"), ("mlx", "mlx")])
def test_split_pipeline_matches_reference(tiny_dirs, refs, spec):
    d = tiny_dirs["llama-tied"]
    stages = [load_stage(spec[0], d, 0, 1), load_stage(spec[1], d, 2, 3)]
    ref = hf_logprobs(refs["llama-tied"], IDS_A)
    (tok,) = run_stages(stages, StageBatch([SeqChunk(0, 0, np.array(IDS_A[:5], np.int32), P5)]))[0].tokens
    check_token(tok, ref[4])
    for pos in range(5, len(IDS_A)):
        (tok,) = run_stages(stages, StageBatch([SeqChunk(0, pos, np.array([IDS_A[pos]], np.int32), P5)]))[0].tokens
        check_token(tok, ref[pos])
    for s in stages:
        s.release([0])
    assert all(s.live_sequences() == [] for s in stages)


FAMILIES = ["mistral-window", "qwen3", "gemma2", "gemma3", "phi3", "mixtral", "qwen3_moe"]


@pytest.mark.parametrize("model", FAMILIES)
def test_each_family_split_across_both_backends_matches_reference(tiny_dirs, refs, model):
    """MLX layers 0-1, torch layers 2-3: a prefill, decode steps past the windows, and a ragged batch."""
    stages = [load_stage("mlx", tiny_dirs[model], 0, 1), load_stage("torch", tiny_dirs[model], 2, 3)]
    ref_a, ref_b = hf_logprobs(refs[model], IDS_A), hf_logprobs(refs[model], IDS_B)
    (tok,) = run_stages(stages, StageBatch([SeqChunk(0, 0, np.array(IDS_A[:3], np.int32), P5)]))[0].tokens
    check_token(tok, ref_a[2])
    for pos in range(3, len(IDS_A) - 1):
        (tok,) = run_stages(stages, StageBatch([SeqChunk(0, pos, np.array([IDS_A[pos]], np.int32), P5)]))[0].tokens
        check_token(tok, ref_a[pos])
    # the last step of one sequence beside the whole prompt of another
    out = run_stages(stages, StageBatch([SeqChunk(0, len(IDS_A) - 1, np.array(IDS_A[-1:], np.int32), P5),
                                         SeqChunk(1, 0, np.array(IDS_B, np.int32), P5)]))[0].tokens
    check_token(out[0], ref_a[-1])
    check_token(out[1], ref_b[-1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("model", FAMILIES)
def test_each_family_runs_in_bfloat16_near_its_float32_reference(tiny_dirs, refs, backend, model):
    """A 40-token prompt (a MoE's rows sorted by expert) and decode steps, in bfloat16: each token the
    stage picks is one transformers' float32 model rates within 0.1 of its best, at a log-probability
    within 0.1 of its own."""
    ids = [(7 * i + 3) % 256 for i in range(40)] + IDS_A
    ref = hf_logprobs(refs[model], ids)
    stage = load_stage(backend, tiny_dirs[model], 0, 3, dtype="bfloat16")
    (tok,) = stage.forward(StageBatch([SeqChunk(0, 0, np.array(ids[:40], np.int32), P5)])).tokens
    for pos in range(40, len(ids)):
        assert ref[pos - 1].max() - ref[pos - 1][tok.token_id] < 0.1
        assert abs(tok.logprob - ref[pos - 1][tok.token_id]) < 0.1
        (tok,) = stage.forward(StageBatch([SeqChunk(0, pos, np.array(ids[pos:pos + 1], np.int32), P5)])).tokens


@pytest.mark.parametrize("first,second", [("mlx", "torch"), ("torch", "mlx")])
def test_bfloat16_hidden_travels_as_bf16(tiny_dirs, refs, first, second):
    d = tiny_dirs["llama"]
    a = load_stage(first, d, 0, 1, dtype="bfloat16")
    b = load_stage(second, d, 2, 3, dtype="bfloat16")
    h = a.forward(StageBatch([SeqChunk(0, 0, np.array(IDS_A, np.int32))])).hidden
    assert h.dtype == "bfloat16" and h.data.dtype == np.uint16  # 2-byte words, never upcast
    np.testing.assert_allclose(h.to_float32(), hf_hidden(refs["llama"], IDS_A, 2), atol=0.05, rtol=0.05)
    (tok,) = b.forward(StageBatch([SeqChunk(0, 0, np.array(IDS_A, np.int32), P5)], h)).tokens
    ref = hf_logprobs(refs["llama"], IDS_A)[-1]
    assert abs(tok.logprob - ref[tok.token_id]) < 0.1


def test_both_backends_satisfy_the_stage_protocol(tiny_dirs):
    for backend in BACKENDS:
        assert isinstance(load_stage(backend, tiny_dirs["llama"], 0, 3), Stage)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_offsets_and_shapes_are_refused(tiny_dirs, backend):
    stage = load_stage(backend, tiny_dirs["llama"], 0, 3)
    with pytest.raises(UserError, match="offset"):
        stage.forward(StageBatch([SeqChunk(0, 3, np.array([1], np.int32), P5)]))
    stage.forward(StageBatch([SeqChunk(0, 0, np.array([1, 2], np.int32), P5)]))
    with pytest.raises(UserError, match="twice"):
        stage.forward(StageBatch([SeqChunk(0, 2, np.array([1], np.int32), P5)] * 2))
    assert stage.live_sequences() == [0]
    with pytest.raises(UserError, match="token ids"):
        stage.forward(StageBatch([SeqChunk(1, 0, np.array([1, 99999], np.int32), P5)]))
    later = load_stage(backend, tiny_dirs["llama"], 2, 3)
    with pytest.raises(UserError, match="hidden"):
        later.forward(StageBatch([SeqChunk(0, 0, np.array([1], np.int32), P5)]))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])  # bf16 decode rows take small_matmul
def test_torch_compile_gives_the_same_tokens(tiny_dirs, dtype):
    """`--compile` (torch.compile, dynamic shapes) against the eager stage: prefill, decode, a batch
    (in bf16 the decode rows take `small_matmul`: one row, then two)."""
    eager = load_stage("torch", str(tiny_dirs["llama"]), 0, 3, dtype=dtype)
    compiled = load_stage("torch", str(tiny_dirs["llama"]), 0, 3, dtype=dtype, compile=True)
    for stage in (eager, compiled):
        outs = [stage.forward(StageBatch([SeqChunk(0, 0, np.array(IDS_A, np.int32), P5),
                                          SeqChunk(1, 0, np.array(IDS_B, np.int32), P5)])).tokens]
        for pos in range(4):  # decode steps of one sequence, then of both: cache lengths change
            both = pos >= 2
            seqs = [SeqChunk(0, len(IDS_A) + pos, np.array([outs[-1][0].token_id], np.int32), P5)]
            if both:
                seqs.append(SeqChunk(1, len(IDS_B) + pos - 2, np.array([outs[-1][1].token_id], np.int32), P5))
            toks = stage.forward(StageBatch(seqs)).tokens
            outs.append(toks if both else [toks[0], outs[-1][1]])  # sequence 1 keeps its token while it waits
        stage.result = outs
    for a, b in zip(eager.result, compiled.result):
        assert [t.token_id for t in a] == [t.token_id for t in b]
        np.testing.assert_allclose([t.logprob for t in a], [t.logprob for t in b],
                                   atol=TOL if dtype == "float32" else BF16_TOL)


def test_torch_cpu_weights_sit_in_huge_page_blocks(tiny_dirs):
    """Each layer's weights move into one 2 MiB-aligned block (the references above check their
    values); a tied head stays the embedding's own tensor, not a second copy."""
    import mmap

    from backends.torch_stage.stage import HUGE_PAGE

    if not hasattr(mmap, "MADV_HUGEPAGE"):
        pytest.skip("no transparent huge pages on this platform")
    model = load_stage("torch", tiny_dirs["llama-tied"], 0, 3).model
    assert model.embed.weight.data_ptr() == model.lm_head.weight.data_ptr()
    for layer in model.layers:
        ptrs = sorted(p.data_ptr() for p in layer.parameters())
        assert ptrs[0] % HUGE_PAGE == 0
        assert ptrs[-1] - ptrs[0] < sum(p.numel() * p.element_size() for p in layer.parameters()) + 64 * len(ptrs)
