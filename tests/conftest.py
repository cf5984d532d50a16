"""Suite-wide settings: no network, deterministic torch, few threads, Triton's interpreter without a GPU."""

import os
import tempfile

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Engines (and servers started by tests) attend in place with our C++ kernel, the CPU default (built once
# per dtype, kept below). tests/runner/test_flex_attention.py covers flex attention, test_attention.py the
# gathering path; PEFTSERVE_ATTENTION=flex or sdpa runs the whole suite on either.
os.environ.setdefault("PEFTSERVE_ATTENTION", "cpp")
# Engines warm up before they serve, so that a step's path (attention in place or gathered, a layer's
# weight packed or plain) does not depend on threads' timing; tests/runner/test_warm_up.py covers the
# background.
os.environ.setdefault("PEFTSERVE_WARM_UP", "before")
# Engines pack their weights at every start, and write nothing under the user's cache directory;
# tests/runner/test_packed_cache.py covers keeping them.
os.environ.setdefault("PEFTSERVE_PACKED_CACHE", "off")
# Our built C++ kernels are kept beside inductor's cache in the temporary directory, not the user's.
os.environ.setdefault("PEFTSERVE_KERNEL_CACHE", os.path.join(tempfile.gettempdir(), "peftserve-test-kernels"))
# Without a GPU the Triton kernels run on CPU tensors in Triton's interpreter, which must be on when they
# are defined (at import). With one, the triton tests run compiled on the device.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest_plugins = ["tests.helpers.fixtures"]
