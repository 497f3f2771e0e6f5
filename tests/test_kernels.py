"""hetpipe's own CPU kernels (`backends/torch_stage/native.py`) against torch on the same inputs.

They run where the CPU has AVX512-BF16; elsewhere these tests skip. A missing compiler or ninja,
or a build that fails, is a failure here, not a skip: setup must provide them.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
from backends.torch_stage import native  # noqa: E402
from backends.torch_stage.models.llama import row_matvec  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def kernels():
    why = native.load()
    if why in ("not an x86-64 Linux machine", "the CPU lacks AVX512-BF16"):
        pytest.skip(why)
    assert why is None, why


def fp32_reference(x, w):
    """The product summed in float32 and rounded once to bf16, as the kernel (and oneDNN) do."""
    return (w.float() @ x[0].float())[None].bfloat16()


@pytest.mark.parametrize("n,k", [(1, 32), (7, 64), (8, 576), (13, 1536), (960, 576), (3072, 576), (49152, 576)])
def test_row_matvec_matches_float32_sums(kernels, n, k):
    """Every output row, whole blocks of 8 rows and the rows left over, within summation order
    (one bf16 ulp) of a float32 sum; the same inputs through torch.mv for scale."""
    g = torch.Generator().manual_seed(n * 7 + k)
    x = torch.randn(1, k, generator=g).bfloat16()
    w = torch.randn(n, k, generator=g).bfloat16()
    y = row_matvec(x, w)
    assert y.shape == (1, n) and y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), fp32_reference(x, w).float(), rtol=2**-7, atol=1e-3)
    assert (y == torch.mv(w, x[0])[None]).float().mean() > 0.99  # oneDNN sums in another order


def test_row_matvec_reads_strided_inputs(kernels):
    g = torch.Generator().manual_seed(1)
    big = torch.randn(1, 1152, generator=g).bfloat16()
    x = big[:, ::2]  # (1, 576), stride 2
    w = torch.randn(576, 960, generator=g).bfloat16().t()  # (960, 576), transposed
    assert not x.is_contiguous() and not w.is_contiguous()
    torch.testing.assert_close(row_matvec(x, w).float(), fp32_reference(x, w).float(), rtol=2**-7, atol=1e-3)


@pytest.mark.parametrize("dtype,k", [(torch.float16, 64), (torch.bfloat16, 40)])
def test_row_matvec_leaves_other_cases_to_torch(kernels, dtype, k):
    """fp16, or a row length the 32-wide loop cannot step through: torch.mv's result exactly."""
    g = torch.Generator().manual_seed(2)
    x, w = torch.randn(1, k, generator=g).to(dtype), torch.randn(24, k, generator=g).to(dtype)
    assert torch.equal(row_matvec(x, w), torch.mv(w, x[0])[None])


def test_row_matvec_refuses_more_than_one_row(kernels):
    with pytest.raises(RuntimeError, match="x \\(1, K\\)"):
        row_matvec(torch.ones(2, 64, dtype=torch.bfloat16), torch.ones(8, 64, dtype=torch.bfloat16))


def test_a_bf16_cpu_stage_runs_them(kernels, tiny_dirs):
    from engine.stage import load_stage

    assert load_stage("torch", tiny_dirs["llama"], 0, 3, dtype="bfloat16").kernels == native.KERNELS
    assert load_stage("torch", tiny_dirs["llama"], 0, 3, dtype="float32").kernels == ""


STAGE_RUN = """
import sys, numpy as np
sys.path.insert(0, {root!r})
from engine.stage import load_stage, SeqChunk, StageBatch
from engine.sampling import SamplingParams
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
    """torch's build lock file, left behind by a build killed midway, is cleared under our own
    lock (which dies with its process) rather than waited on forever."""
    build = tmp_path / "kernels" / f"torch-{torch.__version__}"
    build.mkdir(parents=True)
    (build / "lock").touch()
    r = run_stage(tiny_dirs, tmp_path)
    assert f"kernels={native.KERNELS}" in r.stdout
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
