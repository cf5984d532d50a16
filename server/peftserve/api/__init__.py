"""The gRPC API: protobuf ⇄ domain conversion, the servicer, the server and its lifecycle (no torch)."""
