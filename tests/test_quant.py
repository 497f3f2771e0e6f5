"""Quantized checkpoints on both backends against the same model dequantized, in transformers.

MLX-layout directories (`hetpipe quantize`, 4 and 8 bits, groups 32 and 64) and GGUF block types
(written by gguf-py, imported with their quantization kept): greedy tokens identical to
transformers on the dequantized weights at fp32, log-probabilities within 1e-3.
"""

import json

import numpy as np
import pytest

from engine.app.gguf_import import import_gguf
from engine.app.quantize import dequantize_dir, quantize_dir
from engine.compose.stages import load_stage
from engine.core.pipeline import run_stages
from engine.core.quant import QuantTensor, pack, quantize, unpack
from engine.core.sampling import SamplingParams
from engine.core.stage import SeqChunk, StageBatch
from reference import hf_logprobs, hf_model
from tiny import make_tiny
from tiny_gguf import K_TINY, write_gguf

TOL = 1e-3
IDS = [5, 17, 33, 9, 100, 7, 3, 250, 64, 12, 8]
P5 = SamplingParams(logprobs=5)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_codes_pack_as_mlx_packs_them(bits):
    import backends.mlx_stage  # noqa: F401  (loads OpenBLAS before mlx, as every MLX stage does)
    import mlx.core as mx

    rng = np.random.default_rng(bits)
    w = rng.normal(size=(8, 128)).astype(np.float32)
    codes, scales, biases = mx.quantize(mx.array(w), group_size=32, bits=bits)
    t = QuantTensor(np.array(codes), *(TypedF32(np.array(a)) for a in (scales, biases)), bits, 32)
    np.testing.assert_allclose(t.dequantize(), np.array(mx.dequantize(codes, scales, biases, 32, bits)), atol=1e-6)
    q = t.unpack()
    assert q.max() < 2**bits and np.array_equal(pack(q, bits), np.array(codes))
    ours = quantize(w, bits, 32)  # our quantizer's codes read back by MLX
    np.testing.assert_allclose(np.array(mx.dequantize(mx.array(ours.codes), mx.array(ours.scales.data),
                                                      mx.array(ours.biases.data), 32, bits)), ours.dequantize(),
                               atol=1e-6)
    assert np.array_equal(unpack(ours.codes, bits, 128), ours.unpack())


def TypedF32(a):
    from engine.core.tensors import TypedArray

    return TypedArray(a.astype(np.float32), "float32")


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K"])
def test_gguf_blocks_map_exactly(kind):
    from gguf.constants import GGMLQuantizationType as T
    from gguf.quants import dequantize, quantize as gguf_quantize

    from engine.app.gguf_quant import to_quant_tensor
    from tiny_gguf import _random_blocks

    rng = np.random.default_rng(0)
    if kind.endswith("_K"):
        data = _random_blocks(kind, 4, 512, rng)
    else:
        data = gguf_quantize(rng.normal(size=(4, 512)).astype(np.float32), T[kind])
    t = to_quant_tensor(data, kind, 4, 512)
    ref = dequantize(data, T[kind]).reshape(4, 512)
    np.testing.assert_allclose(t.dequantize(), ref, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q6_K"])
def test_a_bf16_torch_stage_decodes_gguf_weights_through_rows8(tmp_path, kind):
    """bf16 activations on a CPU where our kernels run: GGUF weights held 8 rows interleaved,
    symmetric types (Q4_0, Q6_K requantized) without biases; a prefill and greedy decode steps
    follow the float32 stage (exact products, checked against transformers above) within bf16's
    and 8-bit activations' rounding."""
    from backends.torch_stage import native

    if native.load() is not None:
        pytest.skip(f"no CPU kernels here: {native.load()}")
    shape = K_TINY if kind.endswith("_K") else {}
    hf = make_tiny(tmp_path / "hf", "llama", **shape)
    path = write_gguf(hf, tmp_path / "m.gguf", kind, embed_kind="Q8_0" if kind != "Q6_K" else kind)
    q = import_gguf(path, tmp_path / "q", progress=False)
    last = json.loads((q / "config.json").read_text())["num_hidden_layers"] - 1
    half, exact = (load_stage("torch", q, 0, last, dtype=dt) for dt in ("bfloat16", "float32"))
    held = [m for m in half.model.modules() if getattr(m, "kind", "") == "rows8"]
    assert held and all((m.weight.biases is None) == (kind != "Q4_1") for m in held)
    ids = list(IDS)
    for step in range(4):
        chunk = ids if step == 0 else ids[-1:]
        out = [s.forward(StageBatch([SeqChunk(0, len(ids) - len(chunk), np.array(chunk, np.int32), P5)])).tokens[0]
               for s in (half, exact)]
        assert out[0].token_id == out[1].token_id and abs(out[0].logprob - out[1].logprob) < 0.05
        ids.append(out[1].token_id)
    for s in (half, exact):
        s.close()


def test_q6_k_keeps_its_bits_and_requantizes_for_mlx_lm():
    """Q6_K imports as mode q6_k: 6-bit codes, int8 sub-scales per 16 and float16 d per 256, 6.5625
    bits a weight as the file, dequantizing as gguf-py does; `for_mlx_lm` (and every backend without a
    kernel for it) requantizes it to symmetric 8-bit codes, each weight within half a step."""
    from gguf.constants import GGMLQuantizationType as T
    from gguf.quants import dequantize

    from engine.app import gguf_quant
    from tiny_gguf import _random_blocks

    data = _random_blocks("Q6_K", 4, 512, np.random.default_rng(1))
    t = gguf_quant.to_quant_tensor(data, "Q6_K", 4, 512)
    assert (t.bits, t.group_size, t.mode, t.scales.dtype, t.super_scales.dtype) == (6, 16, "q6_k", "int8", "float16")
    assert t.nbytes * 8 == 4 * 512 * 6.5625 and t.biases is None
    ref = dequantize(data, T.Q6_K).reshape(4, 512)
    np.testing.assert_array_equal(t.dequantize(), ref)  # bit-exact, as the other types
    m = gguf_quant.for_mlx_lm(t)
    assert (m.bits, m.group_size, m.mode, m.scales.dtype) == (8, 32, "affine", "float16")
    s = m.scales.data.astype(np.float32)
    assert np.array_equal(m.biases.data.astype(np.float32), -128 * s)
    assert (np.abs(m.dequantize() - ref) <= np.repeat(s, 32, axis=1) / 2 + 1e-7).all()


def test_symmetric_types_store_no_biases_unless_for_mlx_lm():
    from engine.app import gguf_quant
    from engine.core.quant import QuantScheme, checkpoint_entries
    from tiny_gguf import _random_blocks

    for kind in ("Q4_0", "Q5_0", "Q8_0"):
        data = _random_blocks(kind, 8, 64, np.random.default_rng(2))
        t = gguf_quant.to_quant_tensor(data, kind, 8, 64)
        assert (t.mode, t.biases) == ("symmetric", None)
        flat, block = checkpoint_entries({"model.x.weight": t})
        assert "model.x.biases" not in flat and QuantScheme.from_config({"quantization": block}).mode == "symmetric"
        m = gguf_quant.for_mlx_lm(t)
        np.testing.assert_array_equal(m.dequantize(), t.dequantize())
        assert m.mode == "affine" and "model.x.biases" in checkpoint_entries({"model.x.weight": m})[0]


def test_half_scales_still_span_each_group_and_fall_back_where_float16_is_too_coarse():
    """`quantize(half=True)`: scales rounded up and minimums down to float16 before the codes are
    chosen, so every weight is within half a step of its code; float32 where a group's scale would
    be a subnormal float16."""
    from engine.core.quant import quantize

    w = np.random.default_rng(2).standard_normal((8, 256)).astype(np.float32) * 0.05
    for bits in (4, 8):
        t = quantize(w, bits, 32, half=True)
        assert t.scales.dtype == "float16"
        s = np.repeat(t.scales.data.astype(np.float32), 32, axis=1)
        assert (np.abs(t.dequantize() - w) <= s / 2 + 1e-7).all()
        assert quantize(w, bits, 32).scales.dtype == "float32"  # the default: float32
        sym = quantize(w, bits, 32, half=True, symmetric=True)
        s = np.repeat(sym.scales.data.astype(np.float32), 32, axis=1)
        assert sym.scales.dtype == "float16" and (np.abs(sym.dequantize() - w) <= s / 2 + 1e-7).all()
    tiny = quantize(w * 1e-4, 8, 32, half=True)
    assert tiny.scales.dtype == "float32"


def _check_stage_against(ref_dir, qdir, backend, spec=None):
    ref = hf_model(ref_dir)
    lp = hf_logprobs(ref, IDS)
    # float32: exact products, the dequantized weights' own (bf16 takes 8-bit activations, checked below)
    spec = spec or [(backend, 0, 3)]
    stages = [load_stage(b, qdir, a, z, dtype="float32") for b, a, z in spec]
    n = len(IDS)
    # a prefill of 6, then decode steps, each token and its log-probability against the reference
    chunks = [(0, IDS[:6])] + [(i, [IDS[i]]) for i in range(6, n)]
    for off, ids in chunks:
        (tok,) = run_stages(stages, StageBatch([SeqChunk(0, off, np.array(ids, np.int32), P5)]))[0].tokens
        row = lp[off + len(ids) - 1]
        assert tok.token_id == int(np.argmax(row))
        assert abs(tok.logprob - row[tok.token_id]) < TOL
        top = np.argsort(-row)[:5]
        np.testing.assert_allclose([x for _, x in tok.top], row[top], atol=TOL)
    for s in stages:
        s.close()


@pytest.fixture(scope="module")
def quantized_dirs(tmp_path_factory):
    base = tmp_path_factory.mktemp("quant")
    src = make_tiny(base / "src", "llama-tied")
    out = {}
    for bits in (4, 8):
        for group in (32, 64):
            q = quantize_dir(src, base / f"q{bits}g{group}", bits, group, progress=False)
            out[bits, group] = (q, dequantize_dir(q, base / f"q{bits}g{group}-ref"))
    return out


@pytest.mark.parametrize("backend", ["mlx", "torch"])
@pytest.mark.parametrize("bits,group", [(4, 32), (4, 64), (8, 32), (8, 64)])
def test_mlx_layout_checkpoint_matches_its_dequantized_reference(quantized_dirs, backend, bits, group):
    qdir, ref = quantized_dirs[bits, group]
    cfg = json.loads((qdir / "config.json").read_text())
    assert cfg["quantization"]["bits"] == bits and cfg["quantization"]["group_size"] == group
    _check_stage_against(ref, qdir, backend)


def test_mixed_split_of_a_quantized_checkpoint(quantized_dirs):
    qdir, ref = quantized_dirs[4, 32]
    _check_stage_against(ref, qdir, None, spec=[("mlx", 0, 1), ("torch", 2, 3)])


@pytest.fixture(scope="module")
def quantized_moes(tmp_path_factory):
    """family -> (4-bit checkpoint, its dequantized float32 reference)."""
    base = tmp_path_factory.mktemp("qmoe")
    out = {}
    for family in ("mixtral", "qwen3_moe"):
        q = quantize_dir(make_tiny(base / family, family), base / f"{family}-q4", 4, 32, progress=False)
        out[family] = (q, dequantize_dir(q, base / f"{family}-ref"))
    return out


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
@pytest.mark.parametrize("spec", [[("mlx", 0, 3)], [("torch", 0, 3)], [("mlx", 0, 1), ("torch", 2, 3)]],
                         ids=["mlx", "torch", "mixed"])
def test_a_4_bit_moe_matches_its_dequantized_reference(quantized_moes, family, spec):
    """Quantized experts (and router) through gather_qmm on MLX and the quantized kernels on torch."""
    from engine.core.config import ModelConfig
    from engine.core.weights import load_stage_tensors

    qdir, ref = quantized_moes[family]
    w = load_stage_tensors(qdir, ModelConfig.load(qdir), 0, 0)
    assert isinstance(w[next(k for k in w if k.endswith("experts.gate_up_proj"))], QuantTensor)
    _check_stage_against(ref, qdir, None, spec=spec)


def test_per_module_overrides_and_unquantized_modules(quantized_dirs, tmp_path):
    """A `false` entry and an 8-bit override inside a 4-bit checkpoint, as mlx-community writes them."""
    from safetensors.numpy import load_file, save_file

    qdir, _ = quantized_dirs[4, 32]
    src8, _ = quantized_dirs[8, 32]
    w, w8 = load_file(str(qdir / "model.safetensors")), load_file(str(src8 / "model.safetensors"))
    ref_src = load_file(str(dequantize_dir(qdir, tmp_path / "r4") / "model.safetensors"))
    p_down, p_q = "model.layers.1.mlp.down_proj", "model.layers.2.self_attn.q_proj"
    for x in ("weight", "scales", "biases"):  # down_proj of layer 1 at 8 bits
        w[f"{p_down}.{x}"] = w8[f"{p_down}.{x}"]
    for x in ("scales", "biases"):  # q_proj of layer 2 not quantized
        del w[f"{p_q}.{x}"]
    w[f"{p_q}.weight"] = ref_src[f"{p_q}.weight"]
    d = tmp_path / "mixed"
    d.mkdir()
    save_file(w, str(d / "model.safetensors"))
    cfg = json.loads((qdir / "config.json").read_text())
    cfg["quantization"][p_down] = {"group_size": 32, "bits": 8}
    cfg["quantization"][p_q] = False
    cfg["quantization_config"] = cfg["quantization"]
    (d / "config.json").write_text(json.dumps(cfg))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (d / f).write_bytes((qdir / f).read_bytes())
    ref = dequantize_dir(d, tmp_path / "mixed-ref")
    for backend in ("mlx", "torch"):
        _check_stage_against(ref, d, backend)


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K"])
def test_gguf_types_import_quantized_and_match(tmp_path, kind):
    shape = K_TINY if kind.endswith("_K") else {}
    hf = make_tiny(tmp_path / "hf", "llama", **shape)
    path = write_gguf(hf, tmp_path / "m.gguf", kind, embed_kind="Q8_0" if not kind.endswith("_K") else kind)
    q = import_gguf(path, tmp_path / "q", progress=False)
    # Q6_K is requantized to 8 bits by both stages in float32 (its error is bounded above): they must
    # match what they hold, which is what an import for mlx-lm writes
    ref = (dequantize_dir(import_gguf(path, tmp_path / "mlx", progress=False, mlx_lm=True), tmp_path / "ref")
           if kind == "Q6_K" else import_gguf(path, tmp_path / "ref", progress=False, dequantize=True))
    cfg = json.loads((q / "config.json").read_text())
    expect = {"Q4_0": 4, "Q4_1": 4, "Q5_0": 5, "Q5_1": 5, "Q8_0": 8, "Q4_K": 4, "Q5_K": 5, "Q6_K": 6}[kind]
    assert (cfg["quantization"]["bits"], cfg["quantization"]["group_size"]) == (expect, 16 if kind == "Q6_K" else 32)
    layers = cfg["num_hidden_layers"]
    for backend in ("mlx", "torch"):
        stage = load_stage(backend, q, 0, layers - 1, dtype="float32")
        lp = hf_logprobs(hf_model(ref), IDS)
        (tok,) = stage.forward(StageBatch([SeqChunk(0, 0, np.array(IDS, np.int32), P5)])).tokens
        assert tok.token_id == int(np.argmax(lp[-1])) and abs(tok.logprob - lp[-1][tok.token_id]) < TOL
        (tok,) = stage.forward(StageBatch([SeqChunk(0, len(IDS), np.array([tok.token_id], np.int32), P5)])).tokens
        stage.close()


def test_a_4_bit_torch_layer_costs_at_most_0_4x_a_bf16_layer(quantized_dirs):
    """What the torch stage holds per layer: packed int4 with bf16 scales against bf16 weights."""
    from backends.torch_stage import native

    qdir, _ = quantized_dirs[4, 64]
    src = qdir.parent / "src"

    def layer_bytes(stage):
        layer = stage.model.layers[0]
        tensors = {t.data_ptr(): t.numel() * t.element_size() for t in [*layer.parameters(), *layer.buffers()]}
        return sum(tensors.values())

    q = load_stage("torch", qdir, 0, 3, dtype="bfloat16")
    f = load_stage("torch", src, 0, 3, dtype="bfloat16")
    kinds = {m.kind for m in q.model.layers[0].modules() if hasattr(m, "kind")}
    assert kinds == ({"rows8"} if native.load() is None else {"int4-cpu"})
    assert layer_bytes(q) <= 0.4 * layer_bytes(f)
    if kinds == {"rows8"}:  # two codes a byte, 8 rows interleaved
        gate_up = q.model.layers[0].mlp.gate_up
        assert gate_up.weight.codes.shape[1] * 4 * 2 == gate_up.in_features


def test_planner_counts_quantized_bytes(quantized_dirs):
    from engine.core.config import ModelConfig
    from engine.core.weights import layer_bytes

    qdir, _ = quantized_dirs[4, 32]
    cfg, fcfg = ModelConfig.load(qdir), ModelConfig.load(qdir.parent / "src")
    ratio = layer_bytes(qdir, cfg, "bfloat16") / layer_bytes(qdir.parent / "src", fcfg, "bfloat16")
    assert 0.2 < ratio < 0.45


@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize("bits,group", [(8, 32), (4, 32), (4, 64), (4, 128)])
def test_the_cpu_kernels_equal_their_torch_definition(rows, bits, group):
    """8-bit codes a byte each, 4-bit two a byte, scales and biases held in float32 or float16:
    float32 rows, and bf16 rows (for 4 bits on an AVX512-BF16 CPU the bf16 dot-product kernel),
    against the dequantized weight's product."""
    import torch

    from backends.torch_stage import native
    from backends.torch_stage.ops import _qmatmul, qmatmul

    if native.load() is not None:
        pytest.skip(f"no CPU kernels here: {native.load()}")
    g = torch.Generator().manual_seed(rows)
    k = 512
    codes = torch.randint(0, 256, (96, k * bits // 8), dtype=torch.uint8, generator=g)
    scales = torch.rand(96, k // group, generator=g) * 0.01
    biases = torch.randn(96, k // group, generator=g) * 0.1
    for dtype, held in ((torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                        (torch.float32, torch.float16), (torch.bfloat16, torch.float16)):  # GGUF's d and m: fp16
        x = torch.randn(rows, k, generator=g).to(dtype)
        s, b = scales.to(held), biases.to(held)
        ours, ref = qmatmul(x, codes, s, b, group), _qmatmul(x, codes, s.float(), b.float(), group)
        assert ours.dtype == dtype
        torch.testing.assert_close(ours.float(), ref.float(), rtol=1e-4 if dtype == torch.float32 else 1e-2,
                                   atol=1e-4 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize("bits,group", [(8, 32), (4, 32), (4, 64), (8, 128)])
def test_the_rows8_kernel_equals_its_torch_definition(rows, bits, group):
    """x rounded to 8 bits per block against 8-row interleaved 4- and 8-bit codes, with biases or
    symmetric (none), float32 or float16 scales: the kernel against `_qmatmul_rows8` (the same
    rounding of x, then a float32 product), and that definition against the exact product within
    what rounding x to 8 bits costs."""
    import torch

    from backends.torch_stage import native
    from backends.torch_stage.ops import _qmatmul, _qmatmul_rows8, interleave8, qmatmul_rows8

    if native.load() is not None:
        pytest.skip(f"no CPU kernels here: {native.load()}")
    g = torch.Generator().manual_seed(rows + bits)
    n, k = 96, 512
    codes = torch.randint(0, 256, (n, k * bits // 8), dtype=torch.uint8, generator=g)
    scales = torch.rand(n, k // group, generator=g) * 0.01
    biases = torch.randn(n, k // group, generator=g) * 0.1
    for dtype, held, symmetric in ((torch.float32, torch.float32, False), (torch.bfloat16, torch.float16, False),
                                   (torch.bfloat16, torch.float16, True)):
        x = torch.randn(rows, k, generator=g).to(dtype)
        s = scales.to(held)
        b = -(1 << (bits - 1)) * s if symmetric else biases.to(held)
        si, bi = (a.view(n // 8, 8, -1).transpose(1, 2).contiguous() for a in (s, b))
        args = (x, interleave8(codes), si, None if symmetric else bi, group, bits)
        ours, ref = qmatmul_rows8(*args), _qmatmul_rows8(*args)
        assert ours.dtype == dtype
        top = float(ref.float().abs().max())
        tol = 1e-5 * top if dtype == torch.float32 else 2**-7 * top
        torch.testing.assert_close(ours.float(), ref.float(), rtol=0, atol=tol)
        exact = _qmatmul(x.float(), codes, s.float(), b.float(), group)
        assert 0 < float((ref.float() - exact).abs().max()) < 0.02 * float(exact.abs().max())


@pytest.mark.parametrize("rows", [1, 3, 8])
def test_the_q6k_kernel_equals_its_torch_definition(rows):
    """Q6_K's codes in two planes (low nibbles, high 2 bits), int8 sub-scales and float16 scales:
    the planes give the codes back, and the kernel equals `_qmatmul_rows8_q6k`."""
    import torch

    from backends.torch_stage import native
    from backends.torch_stage.ops import _qmatmul, _qmatmul_rows8_q6k, q6_codes, q6_planes, qmatmul_rows8_q6k

    if native.load() is not None:
        pytest.skip(f"no CPU kernels here: {native.load()}")
    g = torch.Generator().manual_seed(rows)
    n, k = 64, 512
    q = torch.randint(0, 64, (n, k), dtype=torch.uint8, generator=g)
    low, high = q6_planes(q)
    assert torch.equal(q6_codes(low, high), q) and torch.equal(q6_codes(low, high, torch.tensor([9, 0, 63])), q[[9, 0, 63]])
    sc = torch.randint(-128, 128, (n, k // 16), dtype=torch.int8, generator=g)
    d = (torch.rand(n, k // 256, generator=g) * 1e-3).half()
    inter = lambda a: a.view(n // 8, 8, -1).transpose(1, 2).contiguous()  # noqa: E731
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(rows, k, generator=g).to(dtype)
        args = (x, low, high, inter(sc), inter(d))
        ours, ref = qmatmul_rows8_q6k(*args), _qmatmul_rows8_q6k(*args)
        top = float(ref.float().abs().max())
        torch.testing.assert_close(ours.float(), ref.float(), rtol=0,
                                   atol=(1e-5 if dtype == torch.float32 else 2**-7) * top)
        s = sc.float() * d.float().repeat_interleave(16, dim=1)
        exact = _qmatmul(x.float(), q, s, -32 * s, 16)
        assert float((ref.float() - exact).abs().max()) < 0.03 * float(exact.abs().max())


def test_rows8_holds_what_row_order_holds():
    """The 8-row interleaved layout gives back the same rows, codes and dequantized weight."""
    import torch

    from backends.torch_stage import native
    from backends.torch_stage.quant import Codes
    from engine.core.quant import quantize as q

    if native.load() is not None:
        pytest.skip(f"no CPU kernels here: {native.load()}")
    t = q(np.random.default_rng(5).normal(size=(64, 96)).astype(np.float32), 4, 32)
    inter, plain = Codes(t, torch.bfloat16, torch.device("cpu")), Codes(t, torch.float32, torch.device("cpu"))
    assert inter.rows8 and not plain.rows8
    ids = torch.tensor([0, 7, 8, 63, 9])
    assert torch.equal(inter.dequantized(torch.float32), torch.from_numpy(t.dequantize()))
    assert torch.equal(inter.dequantized(torch.float32, ids), plain.dequantized(torch.float32, ids))


def _mlx_lm_greedy(model_dir, ids, n):
    import backends.mlx_stage  # noqa: F401  (OpenBLAS before mlx)
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache
    from mlx_lm.utils import load_model

    model, _ = load_model(model_dir)
    cache = make_prompt_cache(model)
    logits = model(mx.array([ids]), cache=cache)[0, -1]
    out = []
    for _ in range(n):
        t = int(mx.argmax(logits).item())
        out.append(t)
        logits = model(mx.array([[t]]), cache=cache)[0, -1]
    return out


@pytest.mark.parametrize("bits,group", [(4, 64), (8, 32)])
def test_hetpipe_quantize_output_loads_in_mlx_lm_with_the_same_greedy_tokens(quantized_dirs, bits, group):
    pytest.importorskip("mlx_lm")
    qdir, _ = quantized_dirs[bits, group]
    stage = load_stage("mlx", qdir, 0, 3)
    ids, ours = list(IDS), []
    (tok,) = stage.forward(StageBatch([SeqChunk(0, 0, np.array(ids, np.int32), SamplingParams())])).tokens
    for i in range(16):
        ours.append(tok.token_id)
        (tok,) = stage.forward(StageBatch([SeqChunk(0, len(ids) + i, np.array([tok.token_id], np.int32),
                                                    SamplingParams())])).tokens
    stage.close()
    assert _mlx_lm_greedy(qdir, ids, 16) == ours


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_torch_int4_kernel_path_matches_our_codes_path(quantized_dirs, dtype):
    """torch's `_weight_int4pack_mm_for_cpu` (where our kernels do not run) and our nibble codes agree."""
    import torch

    from backends.torch_stage.quant import QuantLinear
    from engine.core.quant import quantize as q

    t = q(np.random.default_rng(3).normal(size=(96, 128)).astype(np.float32), 4, 32)
    dt = getattr(torch, dtype)
    from backends.torch_stage import native

    theirs = QuantLinear(t, dt, torch.device("cpu"), int4pack=True)
    ours = QuantLinear(t, dt, torch.device("cpu"), int4pack=False)
    half_rows8 = dtype == "bfloat16" and native.load() is None  # x rounded to 8 bits: within the bf16 tolerance
    assert (theirs.kind, ours.kind) == ("int4-cpu", "rows8" if half_rows8 else "codes")
    ref = torch.from_numpy(t.dequantize())
    for rows in (1, 5, 20):
        x = torch.randn(rows, 128).to(dt)
        want = x.float() @ ref.T
        # bf16: x, scales and the output round to 8 bits of mantissa
        tol = 1e-4 if dtype == "float32" else 0.02 * float(want.abs().max())
        for lin in (theirs, ours):
            torch.testing.assert_close(lin(x).float(), want, rtol=0, atol=tol)
