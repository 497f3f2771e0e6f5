"""Framework backends. Only code under here imports mlx or torch."""
