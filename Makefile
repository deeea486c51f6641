# Two commands set up a fresh machine: `make demo` and `make test`.
# Both create (or reuse) .venv, install quantkit and its dependencies, then run.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU build of PyTorch; installed first so no dependency pulls a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.quantkit-installed
DEMO_OUT ?= out/demo

.PHONY: install demo test lint clean

$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -e ".[dev]"
	@touch $@

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/quantkit convert --to gguf:q4_k_m --to gguf:q8_0 -o $(DEMO_OUT)

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check quantkit tests benchmarks

clean:
	rm -rf $(VENV) out quantkit-out .pytest_cache
