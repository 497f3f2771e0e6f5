"""hetpipe's own CPU kernels (`backends/torch_stage/native.py`) against torch on the same inputs.

They run where the CPU has AVX512-BF16 or AVX2 with FMA; elsewhere these tests skip. A missing
compiler or ninja, or a build that fails, is a failure here, not a skip: setup must provide them.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
from backends.torch_stage import native  # noqa: E402
from backends.torch_stage import ops  # noqa: E402
from backends.torch_stage.models.llama import SMALL_ROWS, small_matmul  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def kernels():
    why = native.load()
    if why in ("not an x86-64 Linux machine", "the CPU has neither AVX512-BF16 nor AVX2 with FMA"):
        pytest.skip(why)
    assert why is None, why


def fp32_reference(x, w):
    """The product summed in float32 and rounded once to bf16, as the kernel (and oneDNN) do."""
    return (x.float() @ w.float().t()).bfloat16()


def randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).bfloat16()


@pytest.mark.parametrize("m", [1, 2, 3, 5, 6, 8, 9, 13, 16])  # every register blocking of either variant
@pytest.mark.parametrize("n,k", [(1, 32), (13, 1536), (7, 80), (960, 576), (49152, 576)])
def test_small_matmul_matches_float32_sums(kernels, m, n, k):
    """Every output, whole blocks of weight rows and the rows left over, within summation order
    (one bf16 ulp) of a float32 sum; oneDNN on the same inputs for scale. fp32: within float32
    rounding of a float64 sum (k = 80 leaves a remainder past the unrolled vector loop)."""
    x, w = randn(m, k, seed=m), randn(n, k, seed=n * 7 + k)
    y = small_matmul(x, w)
    assert y.shape == (m, n) and y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), fp32_reference(x, w).float(), rtol=2**-7, atol=1e-3)
    assert (y == torch.nn.functional.linear(x, w)).float().mean() > 0.99  # oneDNN sums in another order
    y = small_matmul(x.float(), w.float())
    torch.testing.assert_close(y, (x.double() @ w.double().t()).float(), rtol=1e-5, atol=1e-4)


def test_small_matmul_reads_strided_inputs(kernels):
    x = randn(3, 1152, seed=1)[:, ::2]  # (3, 576), stride 2
    w = randn(576, 960, seed=2).t()  # (960, 576), transposed
    assert not x.is_contiguous() and not w.is_contiguous()
    torch.testing.assert_close(small_matmul(x, w).float(), fp32_reference(x, w).float(), rtol=2**-7, atol=1e-3)


@pytest.mark.parametrize("dtype,m,k", [(torch.float16, 1, 64), (torch.float16, 3, 64), (torch.bfloat16, 1, 36),
                                       (torch.bfloat16, SMALL_ROWS + 1, 64), (torch.float32, 2, 36),
                                       (torch.float32, SMALL_ROWS + 1, 64)])
def test_small_matmul_leaves_other_cases_to_torch(kernels, dtype, m, k):
    """fp16, more than 16 rows, or a row length the vector loop cannot step through: torch's own
    result exactly (torch.mv for one row, F.linear otherwise)."""
    x, w = randn(m, k, seed=3).to(dtype), randn(24, k, seed=4).to(dtype)
    ref = torch.mv(w, x[0])[None] if m == 1 else torch.nn.functional.linear(x, w)
    assert torch.equal(small_matmul(x, w), ref)


def test_small_matmul_refuses_mismatched_shapes(kernels):
    with pytest.raises(RuntimeError, match="x \\(M, K\\)"):
        small_matmul(torch.ones(2, 64, dtype=torch.bfloat16), torch.ones(8, 32, dtype=torch.bfloat16))


def test_a_bf16_cpu_stage_runs_them(kernels, tiny_dirs):
    from engine.compose.stages import load_stage

    assert load_stage("torch", tiny_dirs["llama"], 0, 3, dtype="bfloat16").kernels == native.running() != ""
    assert load_stage("torch", tiny_dirs["llama"], 0, 3, dtype="float32").kernels == native.running()


STAGE_RUN = """
import sys, numpy as np
sys.path.insert(0, {root!r})
from engine.compose.stages import load_stage
from engine.core.stage import SeqChunk, StageBatch
from engine.core.sampling import SamplingParams
st = load_stage("torch", {model!r}, 0, 3, dtype="bfloat16")
(tok,) = st.forward(StageBatch([SeqChunk(0, 0, np.array([5, 17, 33], np.int32), SamplingParams())])).tokens
print("kernels=" + st.kernels, "token=" + str(tok.token_id))
"""


def run_stage(tiny_dirs, home, **env):
    code = STAGE_RUN.format(root=str(ROOT), model=str(tiny_dirs["llama"]))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "HETPIPE_HOME": str(home), **env})
    assert r.returncode == 0, r.stderr
    return r


def test_a_build_left_half_done_does_not_hang_the_next(kernels, tiny_dirs, tmp_path):
    """torch's build lock file, left behind by a build killed midway (here: after compiling, before
    linking), is cleared under our own lock (which dies with its process) rather than waited on
    forever; the next build links what was compiled."""
    build = tmp_path / native.build_dir().relative_to(native.hetpipe_home())
    build.mkdir(parents=True)
    for done in [*native.build_dir().glob("*.o"), *native.build_dir().glob(".ninja_*")]:
        shutil.copy2(done, build / done.name)
    (build / "lock").touch()
    r = run_stage(tiny_dirs, tmp_path)
    assert f"kernels={native.running()}" in r.stdout
    assert "building" in r.stderr and any(build.glob("*.so"))


def test_a_failed_build_or_unwritable_cache_falls_back_to_torch(kernels, tiny_dirs, tmp_path):
    ok = run_stage(tiny_dirs, tmp_path / "a", HETPIPE_NATIVE="0")
    failed = run_stage(tiny_dirs, tmp_path / "b", CXX="false")
    assert "kernels= " in failed.stdout and "did not build" in failed.stderr
    assert failed.stderr.count("\n") <= 3  # a line, not a compiler log
    assert ok.stdout.split()[-1] == failed.stdout.split()[-1]  # the same token, from torch.mv
    (tmp_path / "c").write_text("a file where the cache directory should be")
    unwritable = run_stage(tiny_dirs, tmp_path / "c")
    assert "kernels= " in unwritable.stdout and "did not build" in unwritable.stderr
    assert unwritable.stdout.split()[-1] == ok.stdout.split()[-1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 3, 40])
def test_fused_rms_norm_equals_its_torch_definition(kernels, dtype, rows):
    x = (torch.randn(rows, 576, generator=torch.Generator().manual_seed(rows)) * 3).to(dtype)
    w = torch.randn(576, generator=torch.Generator().manual_seed(7)).to(dtype)
    got, want = ops.rms_norm(x, w, 1e-5), ops._rms_norm(x, w, 1e-5)
    assert got.dtype == dtype and got.shape == x.shape
    # fp32: summation order; bf16/fp16: a rounding tie now and then (one ulp)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2**-7, atol=2e-2)
    torch.testing.assert_close(got, want, **tol)
    assert ops.rms_norm(x[:, ::2], w[::2], 1e-5).shape == (rows, 288)  # strided rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv", [(9, 3), (4, 4)])
def test_decode_attention_reads_the_paged_cache_as_sdpa_would(kernels, dtype, heads, kv):
    g = torch.Generator().manual_seed(heads)
    keys, values = (torch.randn(200, kv, 64, generator=g).to(dtype) for _ in range(2))
    lengths = torch.tensor([5, 37, 1])
    slots = torch.zeros(3, 37, dtype=torch.int64)
    for b, n in enumerate(lengths.tolist()):
        slots[b, :n] = torch.randperm(200, generator=g)[:n]  # scattered, as blocks of a paged cache are
    q = torch.randn(3, heads + kv, 64, generator=g).to(dtype)[:, :heads]  # a strided view, as in the model
    got = ops.decode_attention(q, keys, values, slots, lengths, 0.125)
    want = ops._decode_attention(q.float(), keys.float(), values.float(), slots, lengths, 0.125)
    assert got.dtype == dtype and got.shape == (3, heads, 64)
    torch.testing.assert_close(got.float(), want, rtol=1e-5 if dtype == torch.float32 else 2**-7,
                               atol=1e-5 if dtype == torch.float32 else 1e-2)


AVX2_CHECK = """
import sys; sys.path.insert(0, {root!r})
import torch
from backends.torch_stage import native
assert native.load() is None and native.running().startswith("avx2"), native.running()
from backends.torch_stage.ops import small_matmul
g = torch.Generator().manual_seed(0)
for m in range(1, 17):
    for n, k in ((13, 1536), (7, 80), (960, 576)):
        x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)
        exact = x.double() @ w.double().t()
        torch.testing.assert_close(small_matmul(x, w), exact.float(), rtol=1e-5, atol=1e-4)
        xb, wb = x.bfloat16(), w.bfloat16()
        torch.testing.assert_close(small_matmul(xb, wb).float(), (xb.float() @ wb.float().t()).bfloat16().float(),
                                   rtol=2**-7, atol=1e-3)
from backends.torch_stage.ops import _qmatmul_rows8, interleave8, qmatmul_rows8
for bits in (4, 8):  # vpmaddubsw on 8-bit codes: q = 0 (|q - 128| = 128) against negative x included
    codes = torch.randint(0, 256, (64, 256 * bits // 8), dtype=torch.uint8, generator=g)
    codes[:, ::7] = 0
    s = (torch.rand(8, 8, 256 // 32, generator=g) * 0.01).transpose(1, 2).contiguous()
    for m in range(1, 9):
        x = torch.randn(m, 256, generator=g)
        for b in (None, torch.randn(s.shape, generator=g)):
            args = (x, interleave8(codes), s, b, 32, bits)
            torch.testing.assert_close(qmatmul_rows8(*args), _qmatmul_rows8(*args), rtol=1e-5, atol=1e-4)
from backends.torch_stage.ops import _qmatmul_rows8_q6k, q6_planes, qmatmul_rows8_q6k
low, high = q6_planes(torch.randint(0, 64, (64, 512), dtype=torch.uint8, generator=g))
sc = torch.randint(-128, 128, (8, 32, 8), dtype=torch.int8, generator=g)
d = (torch.rand(8, 2, 8, generator=g) * 1e-3).half()
for m in range(1, 9):
    args = (torch.randn(m, 512, generator=g), low, high, sc, d)
    torch.testing.assert_close(qmatmul_rows8_q6k(*args), _qmatmul_rows8_q6k(*args), rtol=1e-5, atol=1e-4)
print("ok")
"""


def test_the_avx2_variant_where_avx512_runs_too(kernels, tmp_path):
    """HETPIPE_KERNELS=avx2 builds the Zen 3 variant on this machine: every row count it blocks, and
    its 8-bit-activation products (vpmaddubsw where AVX512-VNNI has vpdpbusd)."""
    if native.variant() is None or not native.running().startswith("avx512"):
        pytest.skip("the AVX2 variant is the one the other tests check here")
    r = subprocess.run([sys.executable, "-c", AVX2_CHECK.format(root=str(ROOT))], capture_output=True, text=True,
                       timeout=300, env={**os.environ, "HETPIPE_HOME": str(tmp_path), "HETPIPE_KERNELS": "avx2"})
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]
