"""Import a GGUF into a Hugging Face layout directory that hetpipe loads (and, with `mlx_lm` or
`dequantize`, mlx-lm or transformers too).

Writes `config.json` (`gguf_config.py`), `model.safetensors`, `tokenizer.json` (`gguf_vocab.py`),
`tokenizer_config.json` (with the chat template) and `generation_config.json`. Block-quantized
tensors keep their quantization in MLX's affine layout, or in the symmetric and Q6_K forms that
hold exactly the file's bytes (`gguf_quant.py`); with `mlx_lm` in the affine layout only; with
`dequantize` every tensor is written as float32 instead. The `gguf` package (llama.cpp's own reader) parses. What
llama.cpp's converter changed is undone here:
- llama (and Mixtral) q and k rows were permuted for its RoPE layout;
- gemma's norms were stored with the +1 of Gemma's RMSNorm added;
- MoE experts were stacked into one `ffn_{gate,up,down}_exps` tensor per layer: split back into
  each expert's projections, the names transformers' checkpoints use (its first Mixtral files held
  one `ffn_gate.E` tensor per expert, read as well).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from ..core.errors import UserError
from ..core.experts import NAMES as EXPERT_NAMES
from ..core.quant import QuantTensor, checkpoint_entries
from .gguf_config import read_config
from .gguf_quant import for_mlx_lm, to_quant_tensor
from .gguf_vocab import build_tokenizer

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# where a family names a block tensor otherwise
_FAMILY_NAMES = {
    "gemma": {"post_attention_norm": "post_attention_layernorm", "ffn_norm": "pre_feedforward_layernorm",
              "post_ffw_norm": "post_feedforward_layernorm"},
    "phi3": {"attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"},  # fused gate/up, as phi3 stores it
}
_EXPERT_PARTS = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")  # (gate, up, down), as experts.NAMES orders them
_RULES = ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")  # read by read_config


def hf_names(gguf_name: str, cfg: dict) -> list[str] | None:
    """The Hugging Face names of a GGUF tensor: one, or one per expert for a stacked experts tensor."""
    if gguf_name in _GLOBAL_NAMES:
        return [_GLOBAL_NAMES[gguf_name]]
    parts = gguf_name.split(".")
    mt = cfg["model_type"]
    if len(parts) == 5 and parts[0] == "blk" and mt in EXPERT_NAMES and parts[3].isdigit():
        # llama.cpp's first Mixtral files: one tensor per expert, blk.L.ffn_gate.E.weight
        layer, kind, e, suffix = parts[1:]
        legacy = {"ffn_gate": 0, "ffn_up": 1, "ffn_down": 2}
        if kind not in legacy:
            return None
        module, proj = EXPERT_NAMES[mt]
        return [f"model.layers.{layer}.{module}.experts.{e}.{proj[legacy[kind]]}.{suffix}"]
    if len(parts) != 4 or parts[0] != "blk":
        return None
    layer, kind, suffix = parts[1], parts[2], parts[3]
    if mt in EXPERT_NAMES:
        module, proj = EXPERT_NAMES[mt]
        if kind == "ffn_gate_inp":
            return [f"model.layers.{layer}.{module}.gate.{suffix}"]
        if kind in _EXPERT_PARTS:
            x = proj[_EXPERT_PARTS.index(kind)]
            n = cfg.get("num_local_experts") or cfg["num_experts"]
            return [f"model.layers.{layer}.{module}.experts.{e}.{x}.{suffix}" for e in range(n)]
    family = "gemma" if mt.startswith("gemma") else mt
    name = _FAMILY_NAMES.get(family, {}).get(kind) or _BLOCK_NAMES.get(kind)
    return None if name is None else [f"model.layers.{layer}.{name}.{suffix}"]


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's `permute` of q/k rows (its interleaved RoPE layout -> HF halves)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_FLOAT_TYPES = ("F32", "F16", "BF16", "F64")


def read_tensors(reader, cfg: dict, progress: bool = True, dequantize: bool = True):
    """Yield (hf_name, float32 array or QuantTensor) for every tensor, as transformers names and lays
    them out. Block-quantized matrices (and each expert's) stay quantized unless `dequantize`."""
    from gguf.quants import dequantize as gguf_dequantize
    from tqdm import tqdm

    permuted = cfg["model_type"] in ("llama", "mixtral")
    norm_offset = 1.0 if cfg["model_type"].startswith("gemma") else 0.0
    for t in tqdm(reader.tensors, desc="importing", unit="tensor", disable=not progress):
        if t.name in _RULES:
            continue
        names = hf_names(t.name, cfg)
        if names is None:
            raise UserError(f"unexpected tensor {t.name!r} in a {cfg['model_type']} GGUF")
        shape = tuple(reversed(t.shape.tolist()))
        kind = t.tensor_type.name
        quantized = not dequantize and kind not in _FLOAT_TYPES and len(shape) >= 2
        if len(shape) == 3:  # stacked experts: (experts, rows, cols)
            if shape[0] != len(names):
                raise UserError(f"{t.name} stacks {shape[0]} experts; the config says {len(names)}")
            raw = np.asarray(t.data).reshape(shape[0], shape[1], -1)
            for e, name in enumerate(names):
                if quantized:
                    yield name, to_quant_tensor(raw[e], kind, *shape[1:])
                else:
                    yield name, _floats(gguf_dequantize(raw[e], t.tensor_type), shape[1:])
            continue
        w = to_quant_tensor(t.data, kind, *shape) if quantized else _floats(gguf_dequantize(t.data, t.tensor_type),
                                                                               shape)
        name = names[0]
        if norm_offset and name.endswith("norm.weight"):  # gemma's stored 1 + weight
            w = w - np.float32(norm_offset)
        heads = None
        if permuted and name.endswith(("q_proj.weight", "q_proj.bias")):
            heads = cfg["num_attention_heads"]
        elif permuted and name.endswith(("k_proj.weight", "k_proj.bias")):
            heads = cfg["num_key_value_heads"]
        if heads is not None:
            order = _unpermute(np.arange(shape[0]), heads)
            w = w.rows(order) if isinstance(w, QuantTensor) else np.ascontiguousarray(w[order])
        yield name, w


def _floats(data, shape) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(data).astype(np.float32).reshape(shape))


def import_gguf(path: str | Path, out: str | Path, progress: bool = True, dequantize: bool = False,
                mlx_lm: bool = False) -> Path:
    """Import GGUF `path` into directory `out` (written beside, then renamed into place): quantized
    tensors kept quantized (in MLX's affine form only with `mlx_lm`), or all of them float32 with
    `dequantize`."""
    import gguf
    from safetensors.numpy import save_file

    path, out = Path(path), Path(out)
    if not path.is_file():
        raise UserError(f"no such GGUF file: {path}")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # gguf raises bare ValueError/struct errors on a bad file
        raise UserError(f"{path} is not a readable GGUF file: {e}") from None
    cfg = read_config(reader)
    tok, tok_cfg = build_tokenizer(reader)
    tok_cfg["model_max_length"] = cfg["max_position_embeddings"]
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors = dict(read_tensors(reader, cfg, progress, dequantize))
    if mlx_lm:
        tensors = {n: for_mlx_lm(w) if isinstance(w, QuantTensor) else w for n, w in tensors.items()}
    flat, block = checkpoint_entries(tensors)
    if block:
        cfg["quantization"] = cfg["quantization_config"] = block
    save_file(flat, str(tmp / "model.safetensors"), metadata={"format": "mlx" if block else "pt"})
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    tok.save(str(tmp / "tokenizer.json"))
    (tmp / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2))
    gen = {"bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"]}
    (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
    (tmp / "hetpipe-source.json").write_text(json.dumps({"gguf": path.name, "bytes": path.stat().st_size}))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out
