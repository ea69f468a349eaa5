#!/usr/bin/env bash
# make sanitize: fastattn._C built with AddressSanitizer and UndefinedBehaviorSanitizer in its own
# build directory (.build-asan; the in-place build is untouched), then the seeded fuzz profile,
# its regressions and the C++-entry bad-input tests run against it, on every CPU tier this
# machine has. Then the CUDA kernels on the host execution layer (every tests/test_cuda_host*.py,
# docs/cuda-host.md) with its harness library built with the same two sanitizers. Then a
# ThreadSanitizer build (.build-tsan) runs the tests that call the ops and the output cache from
# many Python threads at once. Any sanitizer report stops the run with a non-zero status.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
py=${PYTHON:-$root/.venv/bin/python}

# build_with DIR FLAGS: fastattn._C built with FLAGS (compile and link) in DIR (its old lib.*
# removed first, so a stale build is never tested); prints the lib.* directory to import from.
build_with() {
  local dir=$1 flags=$2
  mkdir -p "$dir"
  rm -rf "$dir"/lib.*
  env -u LD_PRELOAD FASTATTN_BUILD_CUDA=0 CFLAGS="$flags" LDFLAGS="$flags" \
    MAX_JOBS="${MAX_JOBS:-2}" "$py" setup.py -q build --build-base "$dir" >"$dir/build.log" 2>&1 || {
    tail -30 "$dir/build.log" >&2
    return 1
  }
  echo "$dir"/lib.*
}

lib=$(build_with "$root/.build-asan" \
  "-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer")
# The Python process must load the ASan runtime before anything else, and libstdc++ with it
# (Python is not linked to it, and ASan's __cxa_throw interceptor must find it at start). Python
# and torch leak by design at exit (not fastattn's: leak detection off); torch mixes allocators
# across its libraries (alloc/dealloc mismatch off).
asan_rt=$(gcc -print-file-name=libasan.so)
cxx_rt=$(gcc -print-file-name=libstdc++.so)
if [ ! -f "$asan_rt" ]; then  # gcc prints the bare name when it has no such runtime
  echo "sanitize: this gcc has no AddressSanitizer runtime (libasan.so): not run"
  exit 0
fi
export LD_PRELOAD="$asan_rt $cxx_rt"
export ASAN_OPTIONS=detect_leaks=0:alloc_dealloc_mismatch=0:halt_on_error=1
export UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
# Only the cpu backend is drawn by the fuzzing here: the others run no fastattn C++.
export TRITON_INTERPRET=1 FASTATTN_FUZZ_PROFILE=${FASTATTN_FUZZ_PROFILE:-ci} FASTATTN_FUZZ_BACKENDS=cpu
tests=("$root/tests/test_fuzz.py" "$root/tests/test_softmax.py" "$root/tests/test_norm.py"
  "$root/tests/test_attention.py")
select="test_fuzz or test_regressions or test_bad_input_is_rejected_in_cpp"

failed=0
for tier in "" avx512 avx2 scalar; do
  label=${tier:-best}
  # From the build directory, so that `import fastattn` is the sanitized build.
  # -s: a sanitizer report goes to stderr, which pytest's capture would lose at the abort.
  if (cd "$lib" && FASTATTN_CPU_ISA=${tier:-auto} "$py" -m pytest -q -s -p no:cacheprovider \
    -p no:xdist "${tests[@]}" -k "$select"); then
    echo "sanitize $label: ok"
  else
    echo "sanitize $label: FAILED"
    failed=1
  fi
done

# The CUDA kernels on the CPU (tools/cuda_host): tests/cuda_host_lib.py builds the harness library
# with the sanitizers (its own file in .cache/cuda_host, keyed by the flags; ~25 s of g++ the
# first time), loaded by ctypes under the runtimes above. ASan checks each kernel's global
# accesses against the tensors and its dynamic shared memory against the launch's size, UBSan its
# arithmetic. The layer annotates its fiber switches for ASan; ASan's one warning that it "doesn't
# fully support makecontext/swapcontext" is expected. Every tests/test_cuda_host*.py.
host_tests=("$root"/tests/test_cuda_host*.py)
host_flags="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer"
if (cd "$lib" && FASTATTN_CUDA_HOST_FLAGS=$host_flags "$py" -m pytest -q -s -p no:cacheprovider \
  -p no:xdist "${host_tests[@]}"); then
  echo "sanitize cuda-host: ok"
else
  echo "sanitize cuda-host: FAILED"
  failed=1
fi

# ThreadSanitizer: the output cache and the ops' entry code under 8 Python threads at once. One
# OpenMP thread per call: gcc's libgomp is not built with TSan, so the happens-before of its
# barriers is invisible to it and every OpenMP team would report races that are not there (the
# OpenMP kernels are checked bitwise across threads and thread counts in test_concurrency.py).
tsan_rt=$(gcc -print-file-name=libtsan.so)
if [ ! -f "$tsan_rt" ]; then
  echo "sanitize: this gcc has no ThreadSanitizer runtime (libtsan.so): thread stage not run"
  exit $failed
fi
tlib=$(build_with "$root/.build-tsan" "-fsanitize=thread -fno-omit-frame-pointer")
tsel="many_threads or eight_threads or freed_on_another_thread or reused_blocks"
if (cd "$tlib" && LD_PRELOAD="$tsan_rt $cxx_rt" OMP_NUM_THREADS=1 \
  TSAN_OPTIONS="halt_on_error=1:report_signal_unsafe=0:suppressions=$root/tools/tsan.supp" "$py" -m pytest -q -s \
  -p no:cacheprovider -p no:xdist "$root/tests/test_output_pool.py" \
  "$root/tests/test_concurrency.py" -k "$tsel"); then
  echo "sanitize thread: ok"
else
  echo "sanitize thread: FAILED"
  failed=1
fi
exit $failed
