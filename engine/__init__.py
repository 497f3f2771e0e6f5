"""hetpipe engine: framework-neutral (numpy, token ids, dataclasses). Imports neither mlx nor torch."""
