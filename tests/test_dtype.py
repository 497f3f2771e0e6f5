"""`--dtype auto`: the checkpoint's own dtype where the device computes it natively, else float32,
as each backend's rule says for this machine's devices."""

import json
import shutil

import pytest

from engine.app.procs import start_stage, stop_stages
from engine.compose.stages import load_stage, resolve_dtype
from engine.core.weights import checkpoint_dtype
from transport import protocol as P
from transport.client import Client


def cpu_has_bf16() -> bool:
    import platform

    from backends.torch_stage.native import cpu_flags

    return platform.machine() == "x86_64" and bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


@pytest.fixture(scope="module")
def bf16_dir(tiny_dirs, tmp_path_factory):
    """The tiny llama, saved by transformers in bfloat16."""
    import torch
    from transformers import AutoModelForCausalLM

    src, out = tiny_dirs["llama"], tmp_path_factory.mktemp("bf16")
    AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).save_pretrained(out)
    for f in src.iterdir():
        if f.name.startswith("tokenizer"):
            shutil.copy(f, out / f.name)
    return out


def test_the_checkpoint_dtype_is_read_from_the_config_then_the_headers(tiny_dirs, bf16_dir, tmp_path):
    assert checkpoint_dtype(tiny_dirs["llama"]) == "float32"
    assert checkpoint_dtype(bf16_dir) == "bfloat16"
    shutil.copytree(bf16_dir, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg.pop("torch_dtype", None), cfg.pop("dtype", None)
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    assert checkpoint_dtype(tmp_path / "m") == "bfloat16"  # from the embedding's safetensors header


def test_a_quantized_checkpoint_counts_as_half_precision(tiny_dirs, tmp_path):
    """Its norms may be float32 (a GGUF import's are): auto still gives the torch CPU stage bf16 where
    the CPU computes it, so decode takes the 8-bit-activation kernels; MLX's CPU backend float32."""
    from engine.app.quantize import quantize_dir

    q = quantize_dir(tiny_dirs["llama"], tmp_path / "q4", bits=4, group_size=32)
    assert checkpoint_dtype(q) == "float32"
    assert resolve_dtype("torch", q, "auto", "cpu") == ("bfloat16" if cpu_has_bf16() else "float32")
    assert resolve_dtype("mlx", q, "auto", "cpu") == "float32"


def test_auto_follows_each_backends_rule_here(tiny_dirs, bf16_dir):
    torch_bf16 = "bfloat16" if cpu_has_bf16() else "float32"
    assert resolve_dtype("torch", bf16_dir, "auto", "cpu") == torch_bf16
    assert resolve_dtype("torch", tiny_dirs["llama"], "auto", "cpu") == "float32"  # its own dtype
    assert resolve_dtype("mlx", bf16_dir, "auto", "cpu") == "float32"  # MLX's CPU backend: fp32 is faster
    assert resolve_dtype("torch", bf16_dir, "float16", "cpu") == "float16"  # asked for: kept
    stage = load_stage("torch", bf16_dir, 0, 3)  # "auto" is the default
    try:
        assert stage.info.dtype == torch_bf16
    finally:
        stage.close()


def test_a_daemon_reports_what_auto_chose(bf16_dir):
    proc, address = start_stage("torch", bf16_dir, extra=["--layers", "0-3"])
    client = Client(10)
    try:
        assert client.call(address, P.PING)["info"]["dtype"] == ("bfloat16" if cpu_has_bf16() else "float32")
    finally:
        client.close()
        stop_stages([proc])
