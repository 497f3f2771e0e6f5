"""PyTorch backend: `create_stage(...)` builds a `Stage` running on cuda, mps or cpu."""

from .stage import TorchStage, create_stage

__all__ = ["TorchStage", "create_stage"]
