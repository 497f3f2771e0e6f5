"""MLX backend: `create_stage(...)` builds a `Stage` running on Metal, or the CPU elsewhere;
`auto_dtype` says what `--dtype auto` computes in on a device."""

from .blas import preload_openblas

preload_openblas()  # before mlx is imported anywhere

from .stage import MLXStage, auto_dtype, create_stage  # noqa: E402

__all__ = ["MLXStage", "auto_dtype", "create_stage"]
