"""`POST /tokenize` and `POST /detokenize`, in vLLM's shapes: a prompt (or chat messages through
the model's template) into token ids, and token ids back into text."""

from __future__ import annotations

from ...serving.generator import Generator
from .completions import template_messages
from .guard import ParamError
from .schemas import DetokenizeRequest, TokenizeRequest


def tokenize(req: TokenizeRequest, gen: Generator) -> dict:
    tok = gen.tokenizer
    if (req.prompt is None) == (req.messages is None):
        raise ParamError("give either prompt or messages", "prompt")
    if req.prompt is not None:
        ids = tok.encode(req.prompt, add_special_tokens=req.add_special_tokens is not False)
    else:
        ids = tok.apply_chat_template(template_messages(req.messages), req.add_generation_prompt)
        if req.add_special_tokens and tok.add_bos and (not ids or ids[0] != tok.bos_id):
            ids = [tok.bos_id, *ids]
    return {"count": len(ids), "max_model_len": gen.cfg.max_position_embeddings, "tokens": ids, "token_strs": None}


def detokenize(req: DetokenizeRequest, gen: Generator) -> dict:
    if any(t >= gen.cfg.vocab_size for t in req.tokens):
        raise ParamError(f"token ids must be in 0..{gen.cfg.vocab_size - 1}", "tokens")
    return {"prompt": gen.tokenizer.decode(req.tokens)}
