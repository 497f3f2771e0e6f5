"""Benchmark input (not a test): an 8B-wide model as llama.cpp's own tools write it, for comparing
hetpipe with llama.cpp on the same file.

Writes a Llama model at Llama-3-8B widths (hidden 4096, MLP 14336, 32 heads, 8 KV heads) with N
layers and random weights, with SmolLM2's tokenizer (so the vocabulary is 49152, not 128256),
converts it with llama.cpp's `convert_hf_to_gguf.py` to f16, and quantizes that to Q4_0 with
llama.cpp's own quantizer (`llama_model_quantize`, from llama-cpp-python in `--llama-python`;
the head becomes Q6_K, as llama-quantize does).

    .venv/bin/python examples/wide_q4_0.py --out /tmp/wide --layers 2 --llama-python /path/to/python
    .venv/bin/python examples/bench_model_core.py --model "$(hetpipe import-gguf /tmp/wide/q4_0.gguf ...)" \\
        --configs 'hetpipe:torch:bfloat16' --gguf /tmp/wide/q4_0.gguf --llama-python /path/to/python
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

QUANTIZE = """
import sys, llama_cpp
p = llama_cpp.llama_model_quantize_default_params()
p.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
p.nthread = 2
rc = llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), p)
sys.exit(rc)
"""


def write_model(out: Path, layers: int) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from engine.app.fetch import default_model_dir

    hf = out / "hf"
    cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=49152, max_position_embeddings=8192, rope_theta=500000.0,
                      rms_norm_eps=1e-5, tie_word_embeddings=False, torch_dtype="bfloat16")
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    model.save_pretrained(hf)
    tok = default_model_dir()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tok / name).is_file():
            shutil.copy(tok / name, hf / name)
    return hf


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--llama-python", required=True, help="a Python with llama-cpp-python")
    args = ap.parse_args()
    from llama_cpp_convert import convert

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    hf = write_model(out, args.layers)
    f16 = out / "f16.gguf"
    convert([(hf, f16, "f16")])
    q4 = out / "q4_0.gguf"
    subprocess.run([args.llama_python, "-c", QUANTIZE, str(f16), str(q4)], check=True)
    print(q4)


if __name__ == "__main__":
    main()
