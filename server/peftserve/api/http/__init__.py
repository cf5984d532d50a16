"""The OpenAI-compatible HTTP front: a thin translator over the same engine, keys and errors as gRPC.

app.py builds the FastAPI app; inference.py and admin.py hold its routes; schemas.py the request
bodies; translate.py the mapping to and from the engine; streaming.py server-sent events and client
disconnects; errors.py the error-to-HTTP-status mapping; server.py runs uvicorn in serve()'s loop.
"""

from peftserve.api.http.app import create_app
from peftserve.api.http.server import HttpServer

__all__ = ["HttpServer", "create_app"]
