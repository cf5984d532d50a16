"""A fake OpenAI server: the two routes the benchmark uses, answering like vLLM; it keeps every body."""

from __future__ import annotations

import json
from http.server import BaseHTTPRequestHandler


def fake_reply(prompt: list[int], n: int) -> list[int]:
    """The ids the fake generates for a prompt: a function of its length, so a test can predict them."""
    return [1000 + len(prompt) + i for i in range(n)]


class FakeOpenAI(BaseHTTPRequestHandler):
    bodies: list[dict] = []

    def log_message(self, *args: object) -> None:
        pass

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802
        models = [
            {"id": name, "object": "model", "created": 0, "owned_by": "vllm"} for name in ("base", "main/a1")
        ]
        self._send(200, json.dumps({"object": "list", "data": models}).encode(), "application/json")

    def do_POST(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.bodies.append(body)
        n = body["max_tokens"]
        chunk = {"id": "c", "object": "text_completion", "created": 0, "model": body["model"]}
        events = []
        for token in fake_reply(body["prompt"], n):
            choice = {"index": 0, "text": "x", "finish_reason": None}
            if body.get("return_token_ids"):  # vLLM's extra field: each chunk's new ids
                choice["token_ids"] = [token]
            events.append({**chunk, "choices": [choice]})
        usage = {"prompt_tokens": len(body["prompt"]), "completion_tokens": n, "total_tokens": n}
        events.append({**chunk, "choices": [], "usage": usage})
        stream = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
        self._send(200, stream.encode(), "text/event-stream")
