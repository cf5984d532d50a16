"""Uploads and deletes store versions in a loop, printing each acknowledged one, until it is killed.

Run as ``python -m tests.store.crash_writer ROOT SEED`` by the crash-consistency test, which SIGKILLs it.
Lines: ``READY``; ``ACK <id> <version> <name>=<sha256> ...`` after a commit returned;
``DELETING <id>`` before and ``DELETED <id>`` after a delete.
"""

from __future__ import annotations

import json
import random
import sys

from peftserve.store import AdapterStore
from peftserve.store.files import sha256_hex
from tests.store.helpers import put

NAMES = ("a", "b", "c", "d")


def main(root: str, seed: int) -> None:
    rng = random.Random(seed)
    store = AdapterStore(root)
    print("READY", flush=True)
    while True:
        adapter_id = f"crash/{rng.choice(NAMES)}"
        if rng.random() < 0.1:
            print(f"DELETING {adapter_id}", flush=True)
            store.delete_adapter(*adapter_id.split("/"))
            print(f"DELETED {adapter_id}", flush=True)
            continue
        files = {
            "adapter_config.json": json.dumps({"peft_type": "LORA", "seed": rng.random()}).encode(),
            "adapter_model.safetensors": rng.randbytes(rng.randint(1 << 14, 1 << 19)),
        }
        stored = put(store, adapter_id, files)
        hashes = " ".join(f"{name}={sha256_hex(data)}" for name, data in sorted(files.items()))
        print(f"ACK {adapter_id} {stored.manifest.version} {hashes}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
