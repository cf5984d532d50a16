"""Suite-wide settings: no network, deterministic torch, few threads."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Engines (and servers started by tests) gather then run SDPA: nothing to compile per model geometry.
# tests/runner/test_flex_attention.py covers attention in place; PEFTSERVE_ATTENTION=flex runs the
# whole suite on it.
os.environ.setdefault("PEFTSERVE_ATTENTION", "sdpa")

pytest_plugins = ["tests.helpers.fixtures"]
