"""vargpt-mlx: VARGPT-v1.1 (understanding, generation, editing) on Apple Silicon with MLX."""

__version__ = "0.1.0"
