"""Model identity: a hash of the config and, where the weights are present, their index.

Every stage compares the coordinator's hashes to its own and refuses to serve another model.
The coordinator may hold only the config and tokenizer, so the weights part is optional.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .errors import UserError
from .weights import checkpoint_files, read_header

# config fields that change what the model computes (not bookkeeping like transformers_version)
_CONFIG_KEYS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "vocab_size", "rms_norm_eps", "rope_theta", "rope_parameters",
                "rope_scaling", "tie_word_embeddings", "attention_bias", "max_position_embeddings")


def config_hash(model_dir: str | Path) -> str:
    d = json.loads((Path(model_dir) / "config.json").read_text())
    return _sha({k: d.get(k) for k in _CONFIG_KEYS})


def weights_hash(model_dir: str | Path) -> str | None:
    """Hash of (name, dtype, shape, byte size) of every tensor, or None when the weights are not all
    here (a coordinator holding config and tokenizer only, a stage fetching its own files)."""
    try:
        files = checkpoint_files(model_dir)
    except UserError:
        return None
    if not all(p.is_file() for p in set(files.values())):
        return None
    index = {}
    for path in sorted(set(files.values())):
        header, _ = read_header(path)
        index.update({n: [m["dtype"], m["shape"], m["data_offsets"][1] - m["data_offsets"][0]]
                      for n, m in header.items()})
    return _sha(index)


def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]
