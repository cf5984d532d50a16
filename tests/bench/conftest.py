"""The fake OpenAI peer the benchmark's HTTP systems are tested against."""

from __future__ import annotations

import threading
from http.server import ThreadingHTTPServer

import pytest

from tests.helpers.fake_openai import FakeOpenAI


@pytest.fixture
def fake_peer():
    """The fake's root URL; FakeOpenAI.bodies holds what it was sent."""
    FakeOpenAI.bodies = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeOpenAI)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    thread.join()
