"""VeRA: per-module scaling vectors over frozen random projections shared by all modules (and adapters)."""

from .loader import load_vera, projection_key

__all__ = ["load_vera", "projection_key"]
