"""A stage's share of a checkpoint: only the tensors of its own layer range are read.

Tensors come back as numpy arrays memory-mapped from the safetensors files, with names as
Hugging Face spells them. numpy has no bfloat16, so bf16 tensors come back as their raw 2-byte
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
from .tensors import TypedArray

# safetensors dtype -> (numpy storage dtype, logical dtype name)
_DTYPES = {
    "F32": (np.float32, "float32"),
    "F16": (np.float16, "float16"),
    "BF16": (np.uint16, "bfloat16"),
    "F64": (np.float64, "float64"),
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


def stage_tensor_names(cfg: ModelConfig, names, first: int, last: int) -> list[str]:
    """The names a stage holding layers [first, last] needs from `names`."""
    is_first, is_last = first == 0, last == cfg.num_hidden_layers - 1
    wanted = []
    for name in names:
        m = _LAYER.match(name)
        if m:
            if first <= int(m.group(1)) <= last and not name.endswith("rotary_emb.inv_freq"):
                wanted.append(name)
        elif name == "model.embed_tokens.weight":
            # tied embeddings: the last stage needs the embedding matrix too, as its head
            if is_first or (is_last and (cfg.tie_word_embeddings or "lm_head.weight" not in names)):
                wanted.append(name)
        elif name in ("model.norm.weight", "lm_head.weight") and is_last:
            wanted.append(name)
    return wanted


def load_stage_tensors(model_dir: str | Path, cfg: ModelConfig, first: int, last: int) -> dict[str, TypedArray]:
    """Memory-map the tensors of layers [first, last] (plus embedding / norm / head at the ends)."""
    files = checkpoint_files(model_dir)
    wanted = stage_tensor_names(cfg, files, first, last)
    by_file: dict[Path, list[str]] = {}
    for name in wanted:
        by_file.setdefault(files[name], []).append(name)
    out = {}
    for path, names in by_file.items():
        header, data = read_header(path)
        for name in names:
            out[name] = _tensor(header[name], data, path, name)
    missing = [n for n in _required_names(cfg, first, last) if n not in out]
    if missing:
        raise UserError(f"checkpoint in {model_dir} lacks {missing[0]} (and {len(missing) - 1} more)")
    return out


def _required_names(cfg: ModelConfig, first: int, last: int) -> list[str]:
    req = []
    for i in range(first, last + 1):
        p = f"model.layers.{i}."
        req += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
        req += [p + f"self_attn.{x}_proj.weight" for x in "qkvo"]
        req += [p + f"mlp.{x}_proj.weight" for x in ("gate", "up", "down")]
    if first == 0:
        req.append("model.embed_tokens.weight")
    if last == cfg.num_hidden_layers - 1:
        req.append("model.norm.weight")
    return req


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
    if logical == "float64":
        return TypedArray(arr.astype(np.float32), "float32")
    return TypedArray(arr, logical)
