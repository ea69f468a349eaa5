#!/usr/bin/env bash
# `make check-cuda`: build fastattn._C with its CUDA kernels for sm_80 and sm_90a against the CUDA
# build of torch, then check the result on a machine without a GPU:
#   - the extension imports from the built package, outside the source tree, and
#     build_info()["cuda"] is True;
#   - its fatbin holds SASS for sm_80 and sm_90a, with the softmax and norm kernels in each;
#   - ptxas's resource usage of every kernel (-Xptxas -v, FASTATTN_NVCC_VERBOSE=1): no register
#     spills, shared memory within each arch's limits; the table (registers, smem, stack, spills
#     per kernel and arch) is printed and written to .build-cuda/resource-usage.md
#     (tools/ptxas_report.py);
#   - the dispatcher has CUDA kernels for fastattn::softmax, softmax_backward, norm and
#     norm_backward (registered by csrc/cuda/<op>_host.cpp).
# The build goes to .build-cuda (never the in-place fastattn/_C*.so of the CPU venv), in its own
# venv .venv-cuda (created on first use: torch 2.14.1+cu130 from local disk, ~1 min, 5.4 GB).
# Env: CUDA_HOME (default: derived from `nvcc --dryrun`), MAX_JOBS (default 2).
# The C++ translation units (the CPU kernels, the ops, the CUDA ops' host code) are compiled at
# -O0 without debug info (FASTATTN_CXXFLAGS, setup.py): here they only have to compile against the
# CUDA torch and link, and -O3 -g took two thirds of this build (the CPU build compiles them at
# -O3 and the suite tests them). The .cu files keep their nvcc flags (-O3, -lineinfo), per arch.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=.venv-cuda
PY=$ROOT/$VENV/bin/python
BUILD=$ROOT/.build-cuda
ARCHS="8.0;9.0a"
OPS=(fastattn::softmax fastattn::softmax_backward fastattn::norm fastattn::norm_backward
  fastattn::attention fastattn::attention_backward fastattn::paged_attention_forward)
KERNELS=(softmax_fwd_warp_kernel softmax_fwd_block_kernel softmax_bwd_warp_kernel
  softmax_bwd_block_kernel norm_fwd_reg_kernel norm_fwd_loop_kernel norm_bwd_reg_kernel
  norm_bwd_coef_kernel norm_bwd_loop_kernel norm_sum_partials_kernel attention_fwd_kernel
  attention_combine_kernel paged_append_kernel)
T0=$SECONDS

step() { printf '== %s\n' "$*"; }
fail() {
  echo "check-cuda: FAIL: $*" >&2
  exit 1
}
mkdir -p "$BUILD"

# 1. The CUDA venv (its own: the dev venv has the CPU torch wheel).
if ! "$PY" -c 'import torch, ninja, pybind11, numpy; assert torch.version.cuda' 2>/dev/null; then
  step "creating $VENV (torch==2.14.1, CUDA wheel from local disk)"
  # The CUDA wheel and its nvidia-* libraries take ~5.5 GB: say so before pip fills the disk
  # half-way ("OSError: [Errno 28] No space left on device" from the middle of an install).
  need_kb=$((7 * 1024 * 1024))
  for dir in "$ROOT" "${TMPDIR:-/tmp}"; do
    free_kb=$(df -Pk "$dir" | awk 'NR == 2 { print $4 }')
    ((free_kb >= need_kb)) ||
      fail "$VENV needs ~7 GiB free on the disk of $dir; it has $((free_kb / 1024)) MiB" \
        "(df -h $dir; an old clone's .venv-cuda or .build-* directories are 5+ GB each)"
  done
  [[ -x $PY ]] || python3 -m venv "$VENV"
  # The dev pins of the build tools (requirements-dev.txt is the one place versions are chosen).
  mapfile -t PINS < <(grep -E '^(numpy|ninja|pybind11)([=<>~ ]|$)' requirements-dev.txt)
  # --no-compile: no .pyc for its ~6200 .py files (~20 s of one core); imports compile what they use.
  "$VENV/bin/pip" install -q --no-compile torch==2.14.1 "${PINS[@]}" >"$BUILD/pip.log" 2>&1 ||
    { tail -30 "$BUILD/pip.log"; fail "pip install into $VENV"; }
fi
TORCH=$("$PY" -c 'import torch; print(torch.__version__)')
T_VENV=$((SECONDS - T0))

# 2. CUDA_HOME must be the toolkit. The nvcc on PATH may be a wrapper script outside it, and
# torch's guess (its parent dir) then fails to link: "cannot find -lcudart".
if [[ -z ${CUDA_HOME:-} ]]; then
  command -v nvcc >/dev/null || fail "nvcc not on PATH and CUDA_HOME unset"
  tmp=$(mktemp -d)
  : >"$tmp/x.cu"
  top=$(nvcc --dryrun -c "$tmp/x.cu" -o "$tmp/x.o" 2>&1 | sed -n 's/^#\$ TOP=//p' | head -1)
  rm -rf "$tmp"
  [[ -n $top ]] || fail "could not find the CUDA toolkit from 'nvcc --dryrun' (set CUDA_HOME)"
  CUDA_HOME=$(realpath "$top")
fi
[[ -x $CUDA_HOME/bin/nvcc ]] || fail "CUDA_HOME=$CUDA_HOME has no bin/nvcc"
export CUDA_HOME
NVCC_VERSION=$("$CUDA_HOME/bin/nvcc" --version | sed -n 's/.*release \([0-9.]*\).*/\1/p')

# 3. Build out of tree: build_ext only (the `build` command would also write fastattn.egg-info
# into the source tree), into $BUILD/lib next to a copy of the Python package. Incremental: ninja
# keeps its objects in $BUILD/temp.
step "building fastattn._C with CUDA (archs $ARCHS, MAX_JOBS=${MAX_JOBS:-2}) -> ${BUILD#"$ROOT"/}"
T1=$SECONDS
mkdir -p "$BUILD/lib/fastattn"
find "$BUILD/lib/fastattn" -name '*.py' -delete
find fastattn -name '*.py' -not -path '*/__pycache__/*' -exec cp --parents {} "$BUILD/lib" \;
FASTATTN_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST=$ARCHS MAX_JOBS=${MAX_JOBS:-2} FASTATTN_CXXFLAGS="-O0 -g0" \
  FASTATTN_NVCC_VERBOSE=1 \
  "$PY" setup.py build_ext --build-lib "$BUILD/lib" --build-temp "$BUILD/temp" \
  >"$BUILD/build.log" 2>&1 ||
  { grep -E -B2 -A6 'error|Error' "$BUILD/build.log" | tail -60; fail "build (log: $BUILD/build.log)"; }
T_BUILD=$((SECONDS - T1))
SO=$(find "$BUILD/lib/fastattn" -maxdepth 1 -name '_C*.so' | head -1)
[[ -n $SO ]] || fail "no $BUILD/lib/fastattn/_C*.so after the build"

# 4. The fatbin: SASS per arch, each with every kernel.
step "fatbin of ${SO#"$ROOT"/}"
KARGS=()
for k in "${KERNELS[@]}"; do KARGS+=(--kernel "$k"); done
"$PY" tools/fatbin_list.py "$SO" --require sm_80,sm_90a "${KARGS[@]}" || fail "fatbin check"

# 5. Resource usage, from ptxas's lines in the build log (each .cu's last compile is kept in
# $BUILD/ptxas: ninja recompiles only what changed).
step "resource usage (ptxas -v)"
"$PY" tools/ptxas_report.py "$BUILD/build.log" --cu csrc/cuda/*.cu --store "$BUILD/ptxas" \
  --out "$BUILD/resource-usage.md" --arch sm_80,sm_90a "${KARGS[@]}" || fail "resource usage"

# 6. Import the built package from outside the source tree, so that neither the in-place CPU
# build nor the sources can be picked up instead.
step "importing the built package"
tmp=$(mktemp -d)
(cd "$tmp" && PYTHONPATH=$BUILD/lib "$PY" - "$BUILD/lib" "$ARCHS" "${OPS[@]}") <<'EOF' ||
import os
import sys

import torch

lib, archs, ops = sys.argv[1], sys.argv[2], sys.argv[3:]
import fastattn  # noqa: E402
from fastattn import _extension  # noqa: E402

ok = True


def check(cond: bool, what: str) -> None:
    global ok
    print(f"  {'ok  ' if cond else 'FAIL'} {what}")
    ok &= bool(cond)


check(_extension.error() is None, f"fastattn._C loads (error: {_extension.error()})")
mod = _extension.load()
if mod is not None:
    path = os.path.realpath(mod.__file__)
    check(path.startswith(os.path.realpath(lib) + os.sep), f"imported from the build: {path}")
    info = mod.build_info()
    check(info.get("cuda") is True, f'build_info()["cuda"] is True (got {info.get("cuda")})')
    check(info.get("cuda_archs") == archs, f'build_info()["cuda_archs"] == {archs!r}')
    for op in ops:
        has = torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA")
        check(has, f"{op} has a CUDA kernel")
    cuda_ops = sorted(
        n for n in torch._C._dispatch_get_registrations_for_dispatch_key("CUDA")
        if n.startswith("fastattn::")
    )
    print(f"  fastattn ops with CUDA kernels: {', '.join(cuda_ops) or 'none'}")
print(f"  torch {torch.__version__}, CUDA available here: {torch.cuda.is_available()}")
sys.exit(0 if ok else 1)
EOF
  { rm -rf "$tmp"; fail "import checks"; }
rm -rf "$tmp"

echo "check-cuda: OK (torch $TORCH, nvcc $NVCC_VERSION, CUDA_HOME=$CUDA_HOME;" \
  "venv ${T_VENV}s, build ${T_BUILD}s, total $((SECONDS - T0))s)"
