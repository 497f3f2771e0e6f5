"""transformers as the reference: log-probabilities for a full sequence, greedy continuations."""

from __future__ import annotations

import numpy as np


def hf_model(model_dir, dtype="float32"):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()


def hf_logprobs(model, ids) -> np.ndarray:
    """(T, vocab) float64 log-softmax of transformers' logits for token ids `ids`, no cache."""
    import torch

    with torch.no_grad():
        logits = model(torch.tensor([list(ids)], dtype=torch.long)).logits[0]
    return torch.log_softmax(logits.double(), -1).numpy()


def hf_hidden(model, ids, layer_count) -> np.ndarray:
    """Hidden states after `layer_count` decoder layers, (T, hidden) float32."""
    import torch

    with torch.no_grad():
        out = model(torch.tensor([list(ids)], dtype=torch.long), output_hidden_states=True)
    return out.hidden_states[layer_count][0].float().numpy()


def hf_greedy(model, ids, n) -> tuple[list[int], list[float]]:
    """n greedy tokens (EOS not special) and their log-probabilities: transformers' own forward
    with its own KV cache, one token at a time (no generation config, no logits processors)."""
    import torch

    toks, lps = [], []
    with torch.no_grad():
        out = model(torch.tensor([list(ids)]), use_cache=True)
        for _ in range(n):
            logits = out.logits[0, -1]
            t = int(torch.argmax(logits))
            toks.append(t)
            lps.append(float(torch.log_softmax(logits.double(), -1)[t]))
            out = model(torch.tensor([[t]]), past_key_values=out.past_key_values, use_cache=True)
    return toks, lps
