# The two commands: `make test` and `make bench`. Both create .venv, install the pinned dev
# dependencies (requirements-dev.txt) and build the extension first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.deps-installed
BUILT  := $(VENV)/.ext-built
export TORCHINDUCTOR_CACHE_DIR ?= $(CURDIR)/.cache/inductor
export MAX_JOBS ?= 2
# pytest workers: one per core (each worker's torch then gets one thread: tests/conftest.py); the
# parity grids run at full thread count, once per CPU tier, in test-tiers (and so `make test`'s
# suite run leaves them out: --no-tier-grids).
TEST_JOBS ?= $(shell nproc)
CSRC   := $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cpu/*.h csrc/cuda/*.cu csrc/cuda/*.cuh csrc/cuda/*.cpp csrc/cuda/*.h tools/cuda_host/*.h tools/cuda_host/*.cpp)

.PHONY: fuzz sanitize test test-scale test-tiers bench bench-attention bench-model bench-varlen bench-paged build lint format check-cuda gpu-check clean

$(STAMP): requirements-dev.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -r requirements-dev.txt
	touch $@

# The build re-runs only when a source, setup.py or the deps changed (pip install -e costs ~40 s
# even when ninja has nothing to do, and `make test` reaches `build` twice).
$(BUILT): $(STAMP) $(CSRC) setup.py pyproject.toml
	$(BIN)/pip install -q --no-build-isolation --no-deps -e .
	touch $@

build: $(BUILT)  ## compile fastattn._C in place (ninja: incremental)
	@ls fastattn/_C*.so >/dev/null 2>&1 || { rm -f $(BUILT); $(MAKE) --no-print-directory $(BUILT); }

lint: $(STAMP)
	$(BIN)/ruff check fastattn tests benchmarks tools setup.py
	$(BIN)/ruff format --check fastattn tests benchmarks tools setup.py
	$(BIN)/clang-format --dry-run -Werror $(CSRC)
	$(BIN)/shellcheck tools/*.sh .ci/run
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff format fastattn tests benchmarks tools setup.py
	$(BIN)/ruff check --fix fastattn tests benchmarks tools setup.py
	$(BIN)/clang-format -i $(CSRC)

# tests/test_scale.py (every CPU op past 2**31 elements, ~2.5 min of one worker) runs after it
# in .ci/run (`make test-scale`), as make sanitize does: outside make test's 15-minute budget.
test: build lint  ## lint, the whole suite (Triton in the interpreter), then the CUDA build check
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q -n $(TEST_JOBS) tests --no-tier-grids \
	  --ignore=tests/test_scale.py
	$(MAKE) test-tiers
	OMP_NUM_THREADS=1 TRITON_INTERPRET=1 $(BIN)/python -m pytest -q -n $(TEST_JOBS) benchmarks \
	  --benchmark-disable
	$(MAKE) check-cuda

test-scale: build  ## every CPU op on tensors past 2**31 elements (tests/test_scale.py; needs ~18 GiB)
	$(BIN)/python -m pytest -q tests/test_scale.py

test-tiers: build  ## the CPU-kernel parity grids on every CPU tier (ISA path + ATen), all threads
	TRITON_INTERPRET=1 $(BIN)/python tools/cpu_tiers.py

sanitize: $(STAMP)  ## ASan + UBSan build: fuzz profile + C++ bad-input tests on every tier; TSan build: thread tests
	bash tools/sanitize.sh

fuzz: build  ## the property-based fuzzing of every op at length (randomised, thousands of cases)
	FASTATTN_FUZZ_PROFILE=long TRITON_INTERPRET=1 $(BIN)/python -m pytest -q -n $(TEST_JOBS) \
	  tests/test_fuzz.py

bench: build  ## the benchmark CLI's default suite on this machine (softmax, the norms)
	$(BIN)/fastattn-bench --json bench-results/latest.json

bench-attention: build  ## the attention cases: not in `make bench` (about 15 min more here)
	$(BIN)/fastattn-bench attention --json bench-results/attention.json

bench-model: build  ## whole-model training step and generation (issue 5): minutes per case
	$(BIN)/fastattn-bench model --json bench-results/model.json

bench-varlen: build  ## packed training step (issue 16): varlen vs padded SDPA, minutes here
	$(BIN)/fastattn-bench varlen --json bench-results/varlen.json

bench-paged: build  ## batched decode on a paged KV cache (issue 16) vs dense padded caches
	$(BIN)/fastattn-bench paged --json bench-results/paged.json

# On a CUDA machine, before anything else: build for its GPU, the gpu tests, the GPU benchmark,
# docs-ready summary in $(GPU_CHECK_OUT) (tools/gpu_check.py). Uses the machine's own Python with
# CUDA torch (GPU_PYTHON), never .venv (whose torch is the CPU wheel). No GPU: one line, status 3.
GPU_PYTHON ?= python3
gpu-check:  ## prove the GPU kernels on this machine's GPU in <= 8 min (GPU_CHECK_OUT, FASTATTN_WHEELS)
	$(GPU_PYTHON) tools/gpu_check.py

check-cuda:  ## build the CUDA kernels for sm_80/sm_90a against the CUDA torch, and import them
	bash tools/check_cuda.sh

clean:
	rm -rf build .build-cuda .build-asan .build-tsan fastattn/_C*.so *.egg-info .cache $(BUILT)
