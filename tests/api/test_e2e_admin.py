"""`peftserve serve --keys-file` on a tiny model: upload, generate (equals PEFT), replace, delete."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
from peft import PeftModel

from peftserve.auth import KeyRing, Scope
from peftserve.bench.server import ServerProcess
from peftserve_client import Client, NotFound
from tests.adapters import peft_factory as pf
from tests.engine.test_adapter_fidelity import reference_run
from tests.helpers.tiny_models import build_tiny_model

pytestmark = pytest.mark.slow

NEW_TOKENS = 12


def _greedy(client: Client, prompt: str, adapter_id: str) -> list[int]:
    result = client.generate(prompt, adapter_id=adapter_id, max_new_tokens=NEW_TOKENS, ignore_eos=True)
    return list(result.token_ids)


def test_upload_generate_replace_delete(tiny_llama_dir: Path, tmp_path: Path) -> None:
    base, tokenizer = build_tiny_model("llama")
    first = pf.make_lora_patterns(base, "llama", tmp_path / "first")
    second = pf.make_lora_layers(base, "llama", tmp_path / "second")
    ring, acme = KeyRing().add("acme", [Scope.INFER, Scope.ADMIN])
    ring, globex = ring.add("globex", [Scope.INFER, Scope.ADMIN])
    ring.save(tmp_path / "keys.json")

    server = ServerProcess.serve(
        ["--model", str(tiny_llama_dir), "--dtype", "float32", "--store", str(tmp_path / "store"),
         "--keys-file", str(tmp_path / "keys.json")]
    )  # fmt: skip
    prompt = "The quick brown fox"
    try:
        address = server.wait_ready(240)
        with (
            Client(address, timeout=60, api_key=acme) as client,
            Client(address, timeout=60, api_key=globex) as other,
        ):
            v1 = client.upload_adapter(first, "support")
            got_v1 = _greedy(client, prompt, "support")
            v2 = client.upload_adapter(second, "support")
            got_v2 = _greedy(client, prompt, "support")
            pinned_v1 = _greedy(client, prompt, "support@v1")
            status = client.get_adapter("support")

            with pytest.raises(NotFound) as theirs:
                other.generate(prompt, adapter_id="acme/support")
            with pytest.raises(NotFound) as missing:
                other.generate(prompt, adapter_id="acme/nothing")
            with pytest.raises(NotFound) as own_missing_get:
                client.get_adapter("nothing")
            with pytest.raises(NotFound) as own_missing_generate:
                client.generate(prompt, adapter_id="nothing")
            assert [s.adapter_id for s in other.iter_adapters()] == []

            client.delete_adapter("support")
            with pytest.raises(NotFound):
                client.generate(prompt, adapter_id="support")
            with pytest.raises(NotFound):
                client.get_adapter("support")
    finally:
        server.stop()

    assert (v1.adapter_id, v1.version, v2.version) == ("acme/support", "v1", "v2")
    assert (status.manifest.version, status.manifest.kind) == ("v2", "lora")
    # another tenant's adapter, a missing one of theirs and a missing one of one's own read the same
    assert theirs.value.message.replace("support", "nothing") == missing.value.message
    assert own_missing_get.value.message == own_missing_generate.value.message == missing.value.message

    ids = tokenizer(prompt)["input_ids"]
    want_v1, _ = reference_run(PeftModel.from_pretrained(copy.deepcopy(base), first).eval(), ids, NEW_TOKENS)
    want_v2, _ = reference_run(PeftModel.from_pretrained(copy.deepcopy(base), second).eval(), ids, NEW_TOKENS)
    assert want_v1 != want_v2, "the two adapters must differ for the replace check to mean anything"
    assert (got_v1, got_v2, pinned_v1) == (want_v1, want_v2, want_v1)
