"""Request lifecycle: requests, scheduling policy, the engine loop (no tensors except in engine.py)."""
