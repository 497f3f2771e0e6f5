"""PyTorch backend: `create_stage(...)` builds a `Stage` running on cuda, mps or cpu; `auto_dtype`
says what `--dtype auto` computes in on a device."""

from .stage import TorchStage, auto_dtype, create_stage

__all__ = ["TorchStage", "auto_dtype", "create_stage"]
