"""peftserve: one frozen base model, many parameter-efficient adapters, one gRPC endpoint."""

__version__ = "0.1.0"
