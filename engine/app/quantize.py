"""`hetpipe quantize`: a float checkpoint directory to MLX's affine layout, which mlx-lm loads too.

Every 2-D weight (the projections, the embedding, an untied head) whose rows split into whole
groups is quantized with min/max scales and biases in float32 (`engine/core/quant.py`); the rest
(norms, biases) is copied. Tokenizer and generation files are copied beside.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from ..core.errors import UserError
from ..core.quant import QuantScheme, QuantTensor, check_scheme, checkpoint_entries, quantize
from ..core.weights import all_tensors

_COPIED = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "special_tokens_map.json",
           "chat_template.jinja")


def quantize_dir(model_dir: str | Path, out: str | Path, bits: int = 4, group_size: int = 64,
                 progress: bool = True) -> Path:
    from tqdm import tqdm

    check_scheme(bits, group_size)
    model_dir, out = Path(model_dir), Path(out)
    cfg_path = model_dir / "config.json"
    if not cfg_path.is_file():
        raise UserError(f"no model at {model_dir}: config.json not found")
    cfg = json.loads(cfg_path.read_text())
    if QuantScheme.from_config(cfg) is not None:
        raise UserError(f"{model_dir} is already quantized")
    tensors = {}
    for name, t in tqdm(all_tensors(model_dir).items(), desc="quantizing", unit="tensor", disable=not progress):
        if name.endswith(".weight") and t.data.ndim == 2 and t.data.shape[1] % group_size == 0:
            tensors[name] = quantize(t.to_float32(), bits, group_size)
        else:
            tensors[name] = t.to_float32() if t.data.ndim < 2 or t.dtype == "bfloat16" else t.data
    flat, block = checkpoint_entries(tensors)
    cfg["quantization"] = cfg["quantization_config"] = block or QuantScheme(bits, group_size).to_config()
    return _write(flat, cfg, model_dir, out, "mlx")


def dequantize_dir(model_dir: str | Path, out: str | Path) -> Path:
    """The float32 checkpoint a quantized directory stands for (what transformers loads)."""
    from ..core.weights import group_quantized

    model_dir, out = Path(model_dir), Path(out)
    cfg = json.loads((model_dir / "config.json").read_text())
    scheme = QuantScheme.from_config(cfg)
    if scheme is None:
        raise UserError(f"{model_dir} is not quantized")
    tensors = group_quantized(all_tensors(model_dir), scheme, model_dir)
    flat = {name: t.dequantize() if isinstance(t, QuantTensor) else t.to_float32() for name, t in tensors.items()}
    cfg.pop("quantization", None)
    cfg.pop("quantization_config", None)
    return _write(flat, cfg, model_dir, out, "pt")


def _write(flat: dict, cfg: dict, model_dir: Path, out: Path, fmt: str) -> Path:
    """model.safetensors, config.json and the source's tokenizer files, written beside `out` and
    renamed into place."""
    from safetensors.numpy import save_file

    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(flat, str(tmp / "model.safetensors"), metadata={"format": fmt})
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    for name in _COPIED:
        if (model_dir / name).is_file():
            shutil.copy(model_dir / name, tmp / name)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out
