"""MLX backend: `create_stage(...)` builds a `Stage` running on Metal, or the CPU elsewhere."""

from .blas import preload_openblas

preload_openblas()  # before mlx is imported anywhere

from .stage import MLXStage, create_stage  # noqa: E402

__all__ = ["MLXStage", "create_stage"]
