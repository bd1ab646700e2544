# casemask: `make serve` starts the node on the built-in config; `make test` runs the tests.
# `make serve` makes the virtualenv .venv with what the node needs (Python packages only,
# no PyTorch); `make venv` (and `make test`) adds the CPU build of PyTorch for the
# engine's training tools and the test extras; `make test` also installs the Debian packages the tests talk to (APT_PACKAGES: dcmtk, orthanc,
# chromium for the dashboard's browser test, postgresql: the tests start their own
# cluster, ...) and a Triton server. `make install` puts the built wheel into its own
# virtualenv (PREFIX); `make clean` removes build artefacts and never data (var/).

PYTHON ?= python3
VENV := .venv
TRITON_VENV := .venv-triton
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
PREFIX ?= /opt/casemask
# Every pip install below (and in the tests and Dockerfiles) obeys these pins: never a
# CUDA build of torch.
export PIP_CONSTRAINT := $(CURDIR)/constraints.txt
# tesseract-ocr: the second OCR engine of the burned-in tests; libgl1/libglib2.0-0: OpenCV
# (pulled in by rapidocr-onnxruntime); the fonts draw the tests' synthetic text.
APT_PACKAGES := dcmtk orthanc orthanc-dicomweb dicom3tools openssl postgresql tesseract-ocr tesseract-ocr-eng libgl1 libglib2.0-0 fonts-dejavu-core fonts-liberation chromium chromium-driver

.PHONY: test-receivers serve test test-fast deps venv venv-node triton-venv wheel install docker bench bench-ingest bench-ingest-tls bench-deid bench-engine bench-pixels bench-triton bench-burnedin bench-similar bench-cluster clean

# The node alone: what `casemask serve` (and every command but `casemask engine`'s
# training tools) needs, no PyTorch, no test extras: 750 MB and 31 s from a local wheel
# cache, against 2.2 GB and 96 s for the full environment below (docs/benchmarks.md).
$(VENV)/.installed-node: pyproject.toml setup.py constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade --quiet pip
	$(PIP) install --quiet -e .
	# Bytecode for the project's own modules, as a regular install has (an editable one
	# does not, and with PYTHONDONTWRITEBYTECODE every start would compile them again).
	$(PY) -m compileall -q node engine
	touch $@

# Everything: the node, PyTorch (CPU build) for the engine's training tools and the
# test extras (`make test`, the benchmarks, `make wheel`).
$(VENV)/.installed: pyproject.toml setup.py constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade --quiet pip
	# torch first and pinned: an unpinned resolve pulls a CUDA build of several GB.
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e ".[train,test]"
	$(PY) -m compileall -q node engine
	touch $(VENV)/.installed-node $@

venv-node: $(VENV)/.installed-node

venv: $(VENV)/.installed

# A real Triton Inference Server for tests/test_triton.py and bench-triton: NVIDIA's
# PyTriton wheel bundles tritonserver (CPU, Python backend). It needs numpy < 2, which the
# project's environment does not have, so it gets an environment of its own.
$(TRITON_VENV)/.installed:
	$(PYTHON) -m venv $(TRITON_VENV)
	$(TRITON_VENV)/bin/pip install --upgrade --quiet pip
	$(TRITON_VENV)/bin/pip install --quiet "nvidia-pytriton==0.7.0" "numpy>=1.26,<2" "onnxruntime>=1.18,<2"
	touch $@

triton-venv: $(TRITON_VENV)/.installed

deps:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		$(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing >/dev/null; \
	fi

# Built from the node-only environment (and PyPA's build): no PyTorch needed to make it.
wheel: venv-node
	$(PIP) install --quiet "build>=1.2,<2"
	rm -rf dist
	$(PY) -m build --outdir dist .

# The wheel in a virtualenv of its own: $(PREFIX)/bin/casemask works from any folder.
install: wheel
	$(PYTHON) -m venv $(PREFIX)
	$(PREFIX)/bin/pip install --quiet dist/casemask-*.whl
	@echo "installed: $(PREFIX)/bin/casemask"

docker:
	docker build -f docker/Dockerfile -t casemask .

serve: venv-node
	$(VENV)/bin/casemask serve $(if $(CONFIG),--config $(CONFIG))

# The network-edge tests run twice: the second time with in-process nodes receiving in
# two processes ([node] receivers = 2: both accept from one shared listening socket).
RECEIVER_TESTS = CASEMASK_TEST_RECEIVERS=2 $(PY) -m pytest tests/test_edge.py tests/test_attack.py tests/test_tls.py tests/test_fuzz.py tests/test_node.py

test: deps venv triton-venv
	$(PY) -m pytest
	$(RECEIVER_TESTS)

test-receivers: venv
	$(RECEIVER_TESTS)

test-fast: venv
	$(PY) -m pytest -m "not slow"

bench: bench-ingest bench-ingest-tls bench-deid bench-engine bench-pixels bench-triton bench-burnedin bench-similar bench-cluster

bench-ingest: deps venv
	$(PY) tests/bench/bench_ingest.py

bench-ingest-tls: deps venv
	$(PY) tests/bench/bench_ingest_tls.py

bench-deid: venv
	$(PY) tests/bench/bench_deid.py

bench-engine: venv
	$(PY) tests/bench/bench_engine.py

bench-pixels: deps venv
	$(PY) tests/bench/bench_pixels.py

bench-triton: venv triton-venv
	$(PY) tests/bench/bench_triton.py

bench-burnedin: deps venv
	$(PY) tests/bench/bench_burnedin.py

bench-similar: venv
	# the searches compared (not dependencies of casemask): usearch, sqlite-vec, and apsw,
	# whose SQLite can load extensions where the interpreter's sqlite3 cannot
	$(PIP) install --quiet "usearch>=2.16,<3" "sqlite-vec>=0.1.6,<0.2" "apsw>=3.46"
	$(PY) tests/bench/bench_similar.py --db build/bench/index.db

bench-cluster: deps venv
	$(PY) tests/bench/bench_cluster.py

# Build artefacts only. Never var/ (or any data_dir): it holds the pseudonym secret and
# the database, and losing the secret changes every pseudonym from then on.
clean:
	rm -rf $(VENV) $(TRITON_VENV) .pytest_cache build dist *.egg-info
	find node engine config tests -name __pycache__ -type d -prune -exec rm -rf {} +
