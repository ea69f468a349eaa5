#!/usr/bin/env bash
# make sanitize: fastattn._C built with AddressSanitizer and UndefinedBehaviorSanitizer in its own
# build directory (.build-asan; the in-place build is untouched), then the seeded fuzz profile,
# its regressions and the C++-entry bad-input tests run against it, on every CPU tier this
# machine has. Any sanitizer report stops the run with a non-zero status.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
py=${PYTHON:-$root/.venv/bin/python}
out=$root/.build-asan
san="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer"

mkdir -p "$out"
rm -rf "$out"/lib.*
FASTATTN_BUILD_CUDA=0 CFLAGS="$san" LDFLAGS="$san" MAX_JOBS=${MAX_JOBS:-2} \
  "$py" setup.py -q build --build-base "$out" >"$out/build.log" 2>&1 || {
  tail -30 "$out/build.log"
  exit 1
}
lib=$(echo "$out"/lib.*)
# The Python process must load the ASan runtime before anything else. Python and torch leak by
# design at exit (not fastattn's: leak detection off); torch mixes allocators across its libraries.
asan_rt=$(gcc -print-file-name=libasan.so)
export LD_PRELOAD=$asan_rt
export ASAN_OPTIONS=detect_leaks=0:alloc_dealloc_mismatch=0:halt_on_error=1:abort_on_error=0
export UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
export TRITON_INTERPRET=1 FASTATTN_FUZZ_PROFILE=${FASTATTN_FUZZ_PROFILE:-ci}
tests=("$root/tests/test_fuzz.py" "$root/tests/test_softmax.py" "$root/tests/test_norm.py"
  "$root/tests/test_attention.py")
select="test_fuzz or test_regressions or test_bad_input_is_rejected_in_cpp"

failed=0
for tier in "" avx512 avx2 scalar; do
  label=${tier:-best}
  # From the build directory, so that `import fastattn` is the sanitized build.
  if (cd "$lib" && FASTATTN_CPU_ISA=${tier:-auto} "$py" -m pytest -q -p no:cacheprovider \
    -p no:xdist "${tests[@]}" -k "$select"); then
    echo "sanitize $label: ok"
  else
    echo "sanitize $label: FAILED"
    failed=1
  fi
done
exit $failed
