#!/usr/bin/env python3
"""Generate the Python gRPC code of protos/ into the client package (make protos).

The client package owns the generated modules; the server imports them from there, so the
descriptors are registered once. Imports between generated modules are made relative so the
package does not depend on a top-level `peftserve.v1` module, and message classes are named after
the module they live in.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
PROTO_FILE = "peftserve/v1/peftserve.proto"
OUT_DIR = ROOT / "client" / "peftserve_client" / "_proto"
GENERATED = ("peftserve_pb2.py", "peftserve_pb2.pyi", "peftserve_pb2_grpc.py")
_ABSOLUTE_IMPORT = re.compile(r"^from peftserve\.v1 import (peftserve_pb2\b)", re.MULTILINE)
_MODULE_NAME = "'peftserve.v1.peftserve_pb2', _globals)"
"""The module protoc names the message classes after; they take the real one (__name__) instead, so
pickle finds them (Ray Serve's proxy pickles requests on their way to a deployment)."""


def generate(out_dir: Path) -> list[Path]:
    """Run protoc on PROTO_FILE and write the three generated modules into out_dir."""
    from grpc_tools import protoc  # dev-only dependency (grpcio-tools)

    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            PROTO_FILE,
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {PROTO_FILE}")
        written = []
        for name in GENERATED:
            text = (Path(tmp) / "peftserve" / "v1" / name).read_text()
            target = out_dir / name
            text = _ABSOLUTE_IMPORT.sub(r"from . import \1", text).replace(_MODULE_NAME, "__name__, _globals)")
            target.write_text(text)
            written.append(target)
    init = out_dir / "__init__.py"
    if not init.exists():
        init.write_text('"""Generated protobuf and gRPC modules (scripts/gen_protos.py); do not edit."""\n')
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="output directory (default: %(default)s)")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
