"""Serving benchmark: the same as `peftserve bench` (the harness is the package peftserve.bench).

.venv/bin/python benchmarks/bench_serving.py --quick --out bench_out/serving
.venv/bin/python benchmarks/bench_serving.py --help
"""

import sys

from peftserve.bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
