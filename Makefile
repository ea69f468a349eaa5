# The two commands: `make test` and `make bench`. Both create .venv, install the pinned dev
# dependencies (requirements-dev.txt) and build the extension first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.deps-installed
export TORCHINDUCTOR_CACHE_DIR ?= $(CURDIR)/.cache/inductor
export MAX_JOBS ?= 2
CSRC   := $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cpu/*.h csrc/cuda/*.cu csrc/cuda/*.cpp csrc/cuda/*.h)

.PHONY: test test-tiers bench bench-attention bench-model build lint format check-cuda clean

$(STAMP): requirements-dev.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -r requirements-dev.txt
	touch $@

build: $(STAMP)  ## compile fastattn._C in place (ninja: incremental)
	$(BIN)/pip install -q --no-build-isolation --no-deps -e .

lint: $(STAMP)
	$(BIN)/ruff check fastattn tests benchmarks tools setup.py
	$(BIN)/ruff format --check fastattn tests benchmarks tools setup.py
	$(BIN)/clang-format --dry-run -Werror $(CSRC)
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff format fastattn tests benchmarks tools setup.py
	$(BIN)/ruff check --fix fastattn tests benchmarks tools setup.py
	$(BIN)/clang-format -i $(CSRC)

test: build lint  ## lint, the whole suite (Triton in the interpreter), then the CUDA build check
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q tests
	$(MAKE) test-tiers
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q benchmarks --benchmark-disable
	$(MAKE) check-cuda

test-tiers: build  ## the CPU-kernel parity grids again on each lower CPU tier (ISA path + ATen)
	TRITON_INTERPRET=1 $(BIN)/python tools/cpu_tiers.py

bench: build  ## the benchmark CLI's default suite on this machine (softmax, the norms)
	$(BIN)/fastattn-bench --json bench-results/latest.json

bench-attention: build  ## the attention cases: not in `make bench` (about 15 min more here)
	$(BIN)/fastattn-bench attention --json bench-results/attention.json

bench-model: build  ## whole-model training step and generation (issue 5): minutes per case
	$(BIN)/fastattn-bench model --json bench-results/model.json

check-cuda:  ## build the CUDA kernels for sm_80/sm_90a against the CUDA torch, and import them
	bash tools/check_cuda.sh

clean:
	rm -rf build .build-cuda fastattn/_C*.so *.egg-info .cache
