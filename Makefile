# casemask: `make serve` starts the node on the built-in config; `make test` runs the tests.
# Both install what they need: Debian packages (dcmtk, orthanc, orthanc-dicomweb,
# dicom3tools) and a
# virtualenv in .venv with the CPU build of PyTorch.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT_PACKAGES := dcmtk orthanc orthanc-dicomweb dicom3tools

.PHONY: serve test test-fast deps venv bench bench-ingest bench-deid bench-engine bench-pixels clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade --quiet pip
	# torch first and pinned: an unpinned resolve pulls a CUDA build of several GB.
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e ".[test]"
	# Bytecode for the project's own modules, as a regular install has (an editable one
	# does not, and with PYTHONDONTWRITEBYTECODE every start would compile them again).
	$(PY) -m compileall -q node engine
	touch $@

venv: $(VENV)/.installed

deps:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		$(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing >/dev/null; \
	fi

serve: venv
	$(VENV)/bin/casemask serve $(if $(CONFIG),--config $(CONFIG))

test: deps venv
	$(PY) -m pytest

test-fast: venv
	$(PY) -m pytest -m "not slow"

bench: bench-ingest bench-deid bench-engine bench-pixels

bench-ingest: deps venv
	$(PY) tests/bench/bench_ingest.py

bench-deid: venv
	$(PY) tests/bench/bench_deid.py

bench-engine: venv
	$(PY) tests/bench/bench_engine.py

bench-pixels: deps venv
	$(PY) tests/bench/bench_pixels.py

clean:
	rm -rf $(VENV) var .pytest_cache build *.egg-info
