"""Background work at the lowest CPU priority, so that the steps served beside it take the cores first."""

from __future__ import annotations

import os
import sys
import threading

LOWEST_PRIORITY = 19
"""The nice value of work in the background (Linux: 19 is the lowest)."""


def lowest_priority() -> None:
    """Put the calling thread at the lowest CPU priority (Linux, where a thread has its own; it passes
    to the threads and processes it starts); elsewhere nothing changes."""
    if sys.platform.startswith("linux"):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), LOWEST_PRIORITY)
