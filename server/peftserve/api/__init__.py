"""The front doors: the gRPC API (protobuf ⇄ domain conversion, servicers, status mapping), the
OpenAI-compatible HTTP API (http/), TLS, and the server and its lifecycle (no torch)."""
