"""A stage's share of a checkpoint: only the tensors of its own layer range are read.

Tensors come back as numpy arrays memory-mapped from the safetensors files, with names as
Hugging Face spells them. In a quantized checkpoint (MLX's layout, `quant.py`) a module's
`weight`, `scales` and `biases` come back as one `QuantTensor` under the name of its weight. numpy has no bfloat16, so bf16 tensors come back as their raw 2-byte
words (uint16) tagged "bfloat16"; each backend views them as its own bf16 without an upcast.
The `safetensors` package's numpy loader refuses bf16, hence this small reader of the format
(8-byte header length, JSON header, raw little-endian data).
"""

from __future__ import annotations

import json
import mmap
import re
import struct
from pathlib import Path

import numpy as np

from .config import ModelConfig
from .errors import UserError
from .experts import moe_prefix, stack_experts
from .quant import SUPER, QuantScheme, QuantTensor
from .shapes import ShapeModel
from .tensors import TypedArray, itemsize

# safetensors dtype -> (numpy storage dtype, logical dtype name)
_DTYPES = {
    "F32": (np.float32, "float32"),
    "F16": (np.float16, "float16"),
    "BF16": (np.uint16, "bfloat16"),
    "F64": (np.float64, "float64"),
    "U32": (np.uint32, "uint32"),
    "I8": (np.int8, "int8"),  # q6_k sub-scales
}

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def checkpoint_files(model_dir: str | Path) -> dict[str, Path]:
    """tensor name -> safetensors file, for one file or a sharded checkpoint with its index."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: model_dir / fname for name, fname in weight_map.items()}
    single = model_dir / "model.safetensors"
    if not single.is_file():
        raise UserError(f"no weights in {model_dir}: expected model.safetensors or its index")
    return {name: single for name in read_header(single)[0]}


def checkpoint_dtype(model_dir: str | Path) -> str:
    """The float dtype the checkpoint was saved in: config.json's `torch_dtype` (or `dtype`), else
    that of its embedding (or first float tensor) in the safetensors headers; float32 if neither says."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    for key in ("torch_dtype", "dtype"):
        if config.get(key) in ("float32", "bfloat16", "float16"):
            return config[key]
    files = checkpoint_files(model_dir)
    names = sorted((n for n in files if files[n].is_file()), key=lambda n: not n.startswith("model.embed_tokens"))
    for name in names[:64]:  # (a Hub snapshot may hold some of the files only)
        meta = read_header(files[name])[0].get(name, {})
        if meta.get("dtype") in ("F32", "BF16", "F16"):
            return _DTYPES[meta["dtype"]][1]
    return "float32"


def stage_tensor_names(cfg: ModelConfig, names, first: int, last: int) -> list[str]:
    """The names a stage holding layers [first, last] needs from `names`."""
    is_first, is_last = first == 0, last == cfg.num_hidden_layers - 1
    wanted = []
    for name in names:
        m = _LAYER.match(name)
        if m:
            if first <= int(m.group(1)) <= last and not name.endswith("rotary_emb.inv_freq"):
                wanted.append(name)
        elif name.rsplit(".", 1)[0] == "model.embed_tokens":  # weight (and scales, biases if quantized)
            # tied embeddings: the last stage needs the embedding matrix too, as its head
            if is_first or (is_last and (cfg.tie_word_embeddings or "lm_head.weight" not in names)):
                wanted.append(name)
        elif name.rsplit(".", 1)[0] in ("model.norm", "lm_head") and is_last:
            wanted.append(name)
    return wanted


def load_stage_tensors(model_dir: str | Path, cfg: ModelConfig, first: int, last: int
                       ) -> dict[str, TypedArray | QuantTensor]:
    """Memory-map the tensors of layers [first, last] (plus embedding / norm / head at the ends); of a
    `ShapeModel`, make them."""
    if isinstance(model_dir, ShapeModel):
        return model_dir.stage_tensors(first, last)
    files = checkpoint_files(model_dir)
    wanted = stage_tensor_names(cfg, files, first, last)
    by_file: dict[Path, list[str]] = {}
    for name in wanted:
        by_file.setdefault(files[name], []).append(name)
    raw = {}
    for path, names in by_file.items():
        header, data = read_header(path)
        for name in names:
            raw[name] = _tensor(header[name], data, path, name)
    out = group_quantized(raw, cfg.quantization, model_dir)
    missing = [n for n in _required_names(cfg, first, last) if n not in out]
    if missing:
        raise UserError(f"checkpoint in {model_dir} lacks {missing[0]} (and {len(missing) - 1} more)")
    if cfg.norm_offset:
        fold_norm_offset(out, cfg.norm_offset)
    for i in range(first, last + 1):  # each MoE layer's experts as two stacked tensors
        if cfg.moe is not None and cfg.moe.routed(i):
            p = moe_prefix(cfg, i)
            out[p + "gate.weight"], out[p + "experts.gate_up_proj"], out[p + "experts.down_proj"] = \
                stack_experts(out, cfg, i)
    return out


def fold_norm_offset(w: dict, offset: float) -> None:
    """Norms that multiply by (offset + weight) (gemma) as plain norm weights: float32, the offset added
    as transformers adds it, in float32 (a backend casts them to its dtype like every weight)."""
    for name, t in w.items():
        if name.endswith("norm.weight"):
            w[name] = TypedArray(t.to_float32() + np.float32(offset), "float32")


def layer_bytes(model_dir: str | Path, cfg: ModelConfig, dtype: str, layer: int = 0) -> int:
    """Bytes decoder layer `layer` holds once loaded in activation dtype `dtype` (from the headers only):
    float tensors in `dtype`, packed codes as packed, so a 4-bit layer counts about a quarter."""
    files = checkpoint_files(model_dir)
    names = [n for n in stage_tensor_names(cfg, files, layer, layer) if n.startswith(f"model.layers.{layer}.")]
    headers = {path: read_header(path)[0] for path in {files[n] for n in names}}
    total = 0
    for n in names:
        meta = headers[files[n]][n]
        numel = int(np.prod(meta["shape"]))
        total += numel * (4 if meta["dtype"] == "U32" else itemsize(dtype))
    return total


def group_quantized(raw: dict[str, TypedArray], scheme: QuantScheme | None, where) -> dict:
    """Each quantized module's weight, scales and biases as one QuantTensor; the rest unchanged."""
    quantized = {n[: -len(".scales")] for n in raw if n.endswith(".scales")}
    if quantized and scheme is None:
        raise UserError(f"{where}: {min(quantized)}.scales is present but config.json has no `quantization` block")
    out = {}
    for name, t in raw.items():
        module = name.rsplit(".", 1)[0]
        if module not in quantized:
            if t.dtype == "uint32":
                raise UserError(f"{where}: {name} is packed (uint32) but has no scales")
            out[name] = t
        elif name.endswith(".weight"):
            out[name] = _quant_tensor(raw, module, scheme, where)
    return out


def _quant_tensor(raw: dict[str, TypedArray], module: str, scheme: QuantScheme, where) -> QuantTensor:
    spec = scheme.for_module(module)
    if spec is None:
        raise UserError(f"{where}: {module} has scales but its quantization entry is false")
    bits, group, mode = spec
    need = {"affine": ("weight", "scales", "biases"), "symmetric": ("weight", "scales"),
            "q6_k": ("weight", "scales", "super_scales")}[mode]
    got = {x: raw.get(f"{module}.{x}") for x in need}
    if any(v is None for v in got.values()):
        raise UserError(f"{where}: quantized module {module} ({mode}) needs {', '.join(need)}")
    codes, scales = got["weight"], got["scales"]
    n, words = codes.data.shape
    k = words * 32 // bits
    shapes = {"scales": (n, k // group), "biases": (n, k // group), "super_scales": (n, k // SUPER)}
    if codes.dtype != "uint32" or any(got[x].data.shape != shapes[x] for x in need[1:]) \
            or (mode == "q6_k" and (scales.dtype, got["super_scales"].dtype) != ("int8", "float16")):
        raise UserError(f"{where}: {module} does not match {bits} bits in groups of {group} ({mode}): "
                        f"weight {codes.dtype} {list(codes.data.shape)}, scales {list(scales.data.shape)}")
    return QuantTensor(codes.data, scales, got.get("biases"), bits, group, got.get("super_scales"))


def _required_names(cfg: ModelConfig, first: int, last: int) -> list[str]:
    """What every layer of any family holds (fused q/k/v and gate/up count as q and gate; a MoE layer's
    experts are checked as they are stacked, `experts.py`)."""
    req = []
    for i in range(first, last + 1):
        p = f"model.layers.{i}."
        req += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight", p + "self_attn.o_proj.weight"]
        if cfg.sandwich_norms:
            req += [p + "pre_feedforward_layernorm.weight", p + "post_feedforward_layernorm.weight"]
        if cfg.qk_norm:
            req += [p + "self_attn.q_norm.weight", p + "self_attn.k_norm.weight"]
        req += [p + f"self_attn.{x}_proj.weight" for x in (("qkv",) if cfg.model_type == "phi3" else "qkv")]
        if cfg.moe is None or not cfg.moe.routed(i):
            req += [p + f"mlp.{x}_proj.weight" for x in (("gate_up", "down") if cfg.model_type == "phi3"
                                                         else ("gate", "up", "down"))]
    if first == 0:
        req.append("model.embed_tokens.weight")
    if last == cfg.num_hidden_layers - 1:
        req.append("model.norm.weight")
    return req


def all_tensors(model_dir: str | Path) -> dict[str, TypedArray]:
    """Every tensor of a checkpoint, memory-mapped (for tools that rewrite a whole checkpoint)."""
    files = checkpoint_files(model_dir)
    out = {}
    for path in sorted(set(files.values())):
        header, data = read_header(path)
        out.update({name: _tensor(meta, data, path, name) for name, meta in header.items()})
    return out


def read_header(path: Path) -> tuple[dict, memoryview]:
    try:
        with open(path, "rb") as f:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as e:
        raise UserError(f"cannot read {path}: {e}") from None
    (n,) = struct.unpack("<Q", buf[:8])
    header = json.loads(buf[8 : 8 + n])
    header.pop("__metadata__", None)
    return header, memoryview(buf)[8 + n :]


def _tensor(meta: dict, data: memoryview, path: Path, name: str) -> TypedArray:
    if meta["dtype"] not in _DTYPES:
        raise UserError(f"{path.name}: tensor {name} has unsupported dtype {meta['dtype']}")
    np_dtype, logical = _DTYPES[meta["dtype"]]
    begin, end = meta["data_offsets"]
    arr = np.frombuffer(data[begin:end], dtype=np_dtype).reshape(meta["shape"])
    if logical == "uint32":
        return TypedArray(arr, "uint32")  # packed codes (see `group_quantized`), never a compute dtype
    if logical == "float64":
        return TypedArray(arr.astype(np.float32), "float32")
    return TypedArray(arr, logical)
