# The two commands of the README, and what they need.
VENV ?= .venv
PY := $(VENV)/bin/python
# The converter needs torch; 2.13.0 is the CPU build this project is tested with.
TORCH ?= torch==2.13.0
export UDQUANT_CACHE_DIR ?= $(CURDIR)/.cache
export GRADIO_ANALYTICS_ENABLED = False

.PHONY: demo test lint unit e2e toolchain venv bench space gpu-smoke clean

venv: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e '.[convert,dev]'
	touch $@

toolchain:
	scripts/build-toolchain.sh

demo: venv toolchain
	$(VENV)/bin/udquant demo --out-dir udquant-out/demo

lint: venv
	$(VENV)/bin/ruff check job tests bench scripts space
	$(VENV)/bin/mypy

unit: venv
	$(PY) -m pytest tests/unit -q

e2e: venv toolchain
	$(PY) -m pytest tests/e2e -q

test: venv toolchain lint
	$(PY) -m pytest -q -ra

bench: venv toolchain
	$(PY) -m bench.spine
	$(PY) -m bench.extract

space: venv
	$(PY) space/app.py

# On the GPU machine, offline: the venv is made beforehand (a copied checkout may look stale to make),
# and the source archive comes from UDQUANT_LLAMA_CPP_ARCHIVE (see scripts/gpu-smoke.sh --help).
gpu-smoke:
	scripts/gpu-smoke.sh --venv $(VENV)

clean:
	rm -rf udquant-out .pytest_cache .mypy_cache .ruff_cache
