"""`peftserve serve --adapter ID=DIR` on a tiny model: adapters by id over gRPC, mixed in one batch."""

from __future__ import annotations

import copy
from concurrent.futures import ThreadPoolExecutor

import pytest
from peft import PeftModel

from peftserve.bench.server import ServerProcess
from peftserve_client import Client, NotFound
from tests.adapters import peft_factory as pf
from tests.engine.test_adapter_fidelity import reference_run
from tests.helpers.tiny_models import build_tiny_model

pytestmark = pytest.mark.slow

LONG_PROMPT = "The quick brown fox jumps over the lazy dog, and then over the lazy cat."


def test_adapters_by_id_in_one_batch_equal_peft(tiny_llama_dir, tmp_path):
    base, tokenizer = build_tiny_model("llama")
    lora = pf.make_lora_patterns(base, "llama", tmp_path / "lora")
    prefix = pf.make_prefix(base, tmp_path / "prefix", projection=True)
    server = ServerProcess.serve(
        ["--model", str(tiny_llama_dir), "--store", "", "--adapter", f"acme/lora={lora}",
         "--adapter", f"acme/prefix={prefix}"]
    )  # fmt: skip
    try:
        address = server.wait_ready(240)
        prompt = "The quick brown fox"
        ids = tokenizer(prompt)["input_ids"]
        with Client(address, timeout=60) as client:
            with ThreadPoolExecutor(4) as pool:
                calls = {
                    name: pool.submit(
                        client.generate, prompt, adapter_id=name, max_new_tokens=12, ignore_eos=True
                    )
                    for name in ("acme/lora", "acme/prefix", "")
                }
                results = {name: call.result() for name, call in calls.items()}
            with pytest.raises(NotFound, match="acme/missing"):
                client.generate(prompt, adapter_id="acme/missing")
            mixed = client.generate(prompt, adapters={"acme/lora": 0.5}, max_new_tokens=12, ignore_eos=True)
            # A prompt sent twice under acme/lora: the second finds its full blocks of 16 tokens cached.
            before = client.model_info().prefix_cache
            chat = [client.generate(LONG_PROMPT, adapter_id="acme/lora", max_new_tokens=4) for _ in range(2)]
            after = client.model_info().prefix_cache
    finally:
        server.stop()

    references = {
        "acme/lora": PeftModel.from_pretrained(copy.deepcopy(base), lora).eval(),
        "acme/prefix": PeftModel.from_pretrained(copy.deepcopy(base), prefix).eval(),
        "": base,
    }
    for name, result in results.items():
        want, _ = reference_run(references[name], ids, 12)
        assert list(result.token_ids) == want, name
    half, _ = reference_run(pf.merged_mixture(base, [(lora, 0.5)]), ids, 12)
    assert list(mixed.token_ids) == half
    assert chat[0].token_ids == chat[1].token_ids
    assert (chat[0].usage.cached_tokens, chat[1].usage.cached_tokens) == (0, after.hit_tokens)
    assert before.enabled and before.hit_tokens == 0  # every earlier request had an identity of its own
    full_blocks = (len(tokenizer(LONG_PROMPT)["input_ids"]) - 1) // 16
    assert after.hit_tokens == 16 * full_blocks > 0 and after.cached_blocks > before.cached_blocks
