"""transformers as the reference a stage is checked against (`hetpipe selftest`)."""

from __future__ import annotations

from pathlib import Path


def transformers_reference(model_dir: Path, prompts: list[list[int]], tokens: int,
                           dtype: str = "float32") -> list[dict]:
    """`tokens` greedy tokens per prompt and their log-probabilities, from transformers with its own
    KV cache: what `hetpipe selftest` checks both backends against where transformers is installed."""
    import warnings

    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
    out = []
    with torch.no_grad():
        for ids in prompts:
            toks, lps = [], []
            step = model(torch.tensor([ids]), use_cache=True)
            for _ in range(tokens):
                logits = step.logits[0, -1].double()
                t = int(torch.argmax(logits))
                toks.append(t)
                lps.append(float(torch.log_softmax(logits, -1)[t]))
                step = model(torch.tensor([[t]]), past_key_values=step.past_key_values, use_cache=True)
            out.append({"tokens": toks, "logprobs": lps})
    return out
