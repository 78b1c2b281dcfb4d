# Two commands do all set-up on a fresh machine: `make run` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# A pinned CPU-friendly torch for a fresh venv; a venv that already has torch (e.g. a CUDA build) keeps it.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
MODEL ?= weights/tiny-mixtral
PROMPT ?= def fibonacci(n):

.PHONY: run test bench bench-kernels gpu-check setup clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install "$(TORCH_SPEC)" || $(BIN)/pip install "torch>=2.4,<3"
	$(BIN)/pip install -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(BIN)/moe-engine generate --model $(MODEL) --max-tokens 96 --temperature 0.7 --top-p 0.95 --repetition-penalty 1.1 --seed 0 "$(PROMPT)"

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/moe-engine bench decode

bench-kernels: $(STAMP)
	$(BIN)/moe-engine bench kernels

# On a CUDA machine: the GPU tests, tile tuning, then the decode and kernel benchmarks (one prepared run;
# logs and JSON in bench_results/).
gpu-check: $(STAMP)
	.ci/gpu_check.sh bench_results $(BIN)/python

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
