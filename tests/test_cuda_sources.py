"""Rules of the CUDA C++ sources (csrc/cuda/, see csrc/README.md), checked on any machine.

The CUDA kernels only run where a GPU is (tests/test_cuda_device.py); these checks read the
sources for the mistakes that pass every CPU test and the nvcc build, then fail on a device: a
launch on the legacy default stream instead of torch's current one, a launch error left for the
next CUDA call to report, a shuffle mask that names part of a warp, a kernel attribute set racily
per launch, and the layout rules (shared helpers in common.cuh, one header per op, host halves
named so that no two sources compile to one object, every kernel in the build check), and that
an op's device code moved to <op>_kernels.cuh stays compilable by the host execution layer
(tools/cuda_host/, tests/test_cuda_host.py).
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
CUDA = CSRC / "cuda"
KERNEL_FILES = sorted(CUDA.glob("*.cu"))
OPS = [p.stem for p in KERNEL_FILES]
# Op-specific pieces that two .cu files may each define under one name (in their own anonymous
# namespaces): the kernel arguments and the launchers. Anything else both define is a copy that
# belongs in common.cuh.
SAME_NAME_OK = {"FwdArgs", "BwdArgs", "launch_forward", "launch_backward"}


def kernel_code(path: Path) -> str:
    """An op's device and launch code: <op>.cu, plus <op>_kernels.cuh where its device code moved
    to (so that the host execution layer can compile it without the launchers)."""
    header = path.with_name(f"{path.stem}_kernels.cuh")
    return code(path) + ("\n" + code(header) if header.exists() else "")


def common_code() -> str:
    """The shared helpers: common.cuh and its device half, device.cuh."""
    return code(CUDA / "common.cuh") + "\n" + code(CUDA / "device.cuh")


def code(path: Path) -> str:
    """The file without comments (string literals in these sources hold no comment markers)."""
    text = path.read_text()
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    return re.sub(r"//[^\n]*", "", text)


def namespace_scope_names(src: str) -> set[str]:
    """Names of the structs, enums, constants and functions a file defines or declares at namespace
    scope. Google style (.clang-format) does not indent namespace bodies, so those start in column
    0 while statements inside functions are indented."""
    src = re.sub(r"__launch_bounds__\([^)]*\)", "", src)
    names = set()
    for line in src.splitlines():
        if not line or line[0].isspace() or line[0] in "#}":
            continue
        if m := re.match(r"(?:struct|class|enum)\s+(?:alignas\(.*\)\s+)?(\w+)", line):
            names.add(m.group(1))
        elif m := re.match(r"(?:static\s+)?(?:inline\s+)?constexpr\s+[\w:<>]+\s+(\w+)\s*=", line):
            names.add(m.group(1))
        elif not re.match(r"(template|namespace|using|TORCH_LIBRARY|return)\b", line):
            if m := re.search(r"\b(\w+)\(", line):
                names.add(m.group(1))
    return names


def split_top_level(args: str) -> list[str]:
    """``a, f(b, c), d`` -> ["a", "f(b, c)", "d"]."""
    parts, depth, cur = [], 0, ""
    for ch in args:
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch == "," and depth == 0:
            parts.append(cur.strip())
            cur = ""
        else:
            cur += ch
    return [*parts, cur.strip()]


def test_the_ops_are_found():
    # The other tests iterate over these: an empty list would pass them all.
    assert {"norm", "softmax"} <= set(OPS)


def test_no_two_sources_compile_to_one_object():
    # torch's builder names each object after its source's stem (csrc/cuda/x.cpp and x.cu would
    # both become x.o); setup.py compiles these globs.
    sources = [
        *CSRC.glob("*.cpp"),
        *(CSRC / "cpu").glob("*.cpp"),
        *CUDA.glob("*.cpp"),
        *CUDA.glob("*.cu"),
    ]
    stems = Counter(str(p.relative_to(ROOT).with_suffix("")) for p in sources)
    assert not [s for s, n in stems.items() if n > 1]
    setup = (ROOT / "setup.py").read_text()
    assert "object_filenames" not in setup, "setup.py still renames objects"


@pytest.mark.parametrize("op", OPS)
def test_op_layout(op):
    """<op>.cu holds the kernels (on common.cuh), <op>.h its entry points, <op>_host.cpp the
    checks and the registration; the host half declares nothing of the .cu itself."""
    cu, header, host = (code(CUDA / f) for f in (f"{op}.cu", f"{op}.h", f"{op}_host.cpp"))
    assert '#include "common.cuh"' in cu
    assert f'#include "{op}.h"' in cu, "the .cu must see its own declarations"
    assert f'#include "{op}.h"' in host and '#include "../checks.h"' in host
    assert "TORCH_LIBRARY_IMPL(fastattn, CUDA, m)" in host
    assert "TORCH_LIBRARY_IMPL" not in cu
    entries = namespace_scope_names(header)
    assert entries, f"{op}.h declares no entry point"
    assert entries <= namespace_scope_names(cu), f"{op}.cu does not define all of {entries}"
    assert not entries & namespace_scope_names(host), f"{op}_host.cpp redeclares an entry point"


@pytest.mark.parametrize("op", OPS)
def test_host_half_uses_named_checks(op):
    host = code(CUDA / f"{op}_host.cpp")
    assert "TORCH_CHECK" not in host, "checks belong in csrc/checks.h, as named helpers"
    assert "check_cuda(" in host


def test_check_cuda_lives_in_checks_h():
    checks = code(CSRC / "checks.h")
    assert re.search(r"^inline void check_cuda\(", checks, re.M)
    for path in [*CSRC.glob("*.cpp"), *CUDA.glob("*.cpp"), *CUDA.glob("*.cu")]:
        assert "check_cuda" not in namespace_scope_names(code(path)), path.name


def test_shared_helpers_are_not_copied():
    common = namespace_scope_names(common_code())
    assert {"Pack", "warp_reduce", "block_reduce", "ceil_div", "device_limits"} <= common
    defined = {p.name: namespace_scope_names(kernel_code(p)) for p in KERNEL_FILES}
    for name, names in defined.items():
        assert not names & common, f"{name} redefines {sorted(names & common)} of common.cuh"
    seen: Counter[str] = Counter(n for names in defined.values() for n in names)
    copies = sorted(n for n, k in seen.items() if k > 1 and n not in SAME_NAME_OK)
    assert not copies, f"defined in more than one .cu (move to common.cuh): {copies}"


LAUNCH = re.compile(r"<<<(.*?)>>>\s*\((.*?)\);", re.S)


@pytest.mark.parametrize("path", KERNEL_FILES, ids=lambda p: p.name)
def test_every_launch_is_on_the_current_stream_and_checked(path):
    src = code(path)
    launches = list(LAUNCH.finditer(src))
    assert launches, "no kernel launch found"
    inits = re.findall(r"cudaStream_t\s+(\w+)\s*=\s*([^;]+);", src)
    assert inits, "no stream taken from torch"
    for name, init in inits:
        assert init.strip() == "c10::cuda::getCurrentCUDAStream()", f"{name} = {init}"
    streams = {n for n, _ in inits} | set(re.findall(r"cudaStream_t\s+(\w+)\s*[,)]", src))
    for m in launches:
        config = split_top_level(m.group(1))
        assert len(config) == 4, f"<<<{m.group(1)}>>> launches on the default stream"
        assert config[3] in streams, f"<<<{m.group(1)}>>>: {config[3]} is not torch's stream"
        after = src[m.end() :].lstrip()
        assert after.startswith("C10_CUDA_KERNEL_LAUNCH_CHECK();"), (
            f"<<<{m.group(1)}>>> is not followed by C10_CUDA_KERNEL_LAUNCH_CHECK()"
        )


def test_shuffles_are_shared_and_use_whole_warps():
    for path in [*KERNEL_FILES, *CUDA.glob("*.cuh")]:
        src = code(path)
        calls = re.findall(r"__shfl\w*_sync\(\s*([^,]+),", src)
        if path.name != "device.cuh":
            assert not calls, f"{path.name}: shuffles belong in device.cuh's reductions"
        for mask in calls:
            assert mask.strip() == "kFullMask", f"{path.name}: shuffle mask {mask}"
        assert "__activemask" not in src and "__ballot" not in src


def test_kernel_attributes_are_set_once_under_a_lock():
    for path in KERNEL_FILES:
        assert "cudaFuncSetAttribute" not in code(path), f"{path.name}: use max_dynamic_smem"
    common = code(CUDA / "common.cuh")
    assert common.count("cudaFuncSetAttribute(") == 1
    body = common[common.index("int max_dynamic_smem(") :]
    body = body[: body.index("\n}\n")]
    set_at = body.index("cudaFuncSetAttribute(")
    assert "std::lock_guard" in body[:set_at] or "std::call_once" in body[:set_at]
    assert ".find(" in body[:set_at], "an opted-in kernel must not be set again"


@pytest.mark.parametrize("path", KERNEL_FILES, ids=lambda p: p.name)
def test_entry_points_take_a_device_guard(path):
    """Each entry point of a .cu (declared in its header) makes the input's device current
    before it allocates or launches anything, so inputs on cuda:1 work from a cuda:0 thread."""
    src = code(path)
    entries = namespace_scope_names(code(path.with_suffix(".h")))
    assert entries
    for name in entries:
        m = re.search(rf"^\S[^\n]*\b{name}\((.*?)\)\s*\{{\s*([^;]*);", src, re.M | re.S)
        assert m, f"{name} not defined in {path.name}"
        assert re.match(r"const c10::cuda::(Optional)?CUDAGuard \w+\(", m.group(2)), (
            f"{name} does not start with a device guard: {m.group(2)!r}"
        )


def test_the_build_check_covers_every_kernel_and_op():
    script = (ROOT / "tools" / "check_cuda.sh").read_text()
    kernels_list = re.search(r"^KERNELS=\((.*?)\)", script, re.M | re.S)
    ops_list = re.search(r"^OPS=\((.*?)\)", script, re.M | re.S)
    assert kernels_list and ops_list
    kernels, ops = kernels_list.group(1).split(), ops_list.group(1).split()
    for path in KERNEL_FILES:
        pattern = r"__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s*)?(\w+)\("
        names = re.findall(pattern, kernel_code(path))
        assert names, path.name
        for name in names:
            assert name in kernels, f"tools/check_cuda.sh KERNELS lacks {name}"
    for path in CUDA.glob("*_host.cpp"):
        for op in re.findall(r'm\.impl\("(\w+)"', code(path)):
            assert f"fastattn::{op}" in ops, f"tools/check_cuda.sh OPS lacks fastattn::{op}"


def test_makefile_tracks_every_csrc_file():
    # `make build` re-runs only when a file of CSRC changed, and `make lint` formats CSRC.
    line = re.search(r"^CSRC\s*:=\s*\$\(wildcard (.*)\)$", (ROOT / "Makefile").read_text(), re.M)
    assert line
    patterns = [Path(p) for p in line.group(1).split()]
    files = [p for p in CSRC.rglob("*") if p.suffix in {".cpp", ".h", ".cu", ".cuh"}]
    assert any(p.suffix == ".cuh" for p in files)
    for f in files:
        rel = f.relative_to(ROOT)
        ok = any(rel.parent == p.parent and rel.match(p.name) for p in patterns)
        assert ok, f"{rel} is not in the Makefile's CSRC"


def test_inline_ptx_is_behind_mma_cuh():
    """The kernels' inline PTX (mma.sync, ldmatrix, cp.async) lives in mma.cuh's small device
    functions only, compiled out under the host layer (FASTATTN_CUDA_HOST), which has portable
    implementations of each (tools/cuda_host/tensor_core.h)."""
    for path in [*KERNEL_FILES, *CUDA.glob("*.cuh")]:
        if path.name != "mma.cuh":
            assert "asm" not in re.findall(r"\b\w+\b", code(path)), f"{path.name}: inline PTX"
    src = code(CUDA / "mma.cuh")
    guarded = src[src.index("#ifndef FASTATTN_CUDA_HOST") : src.rindex("#endif")]
    assert src.count("asm volatile") == guarded.count("asm volatile") > 0
    host = (ROOT / "tools" / "cuda_host" / "tensor_core.h").read_text()
    for fn in re.findall(r"__forceinline__ \w+ (\w+)\(", guarded):
        if fn != "smem_address":  # an address conversion, not a primitive
            assert re.search(rf"\b{fn}\(", host), f"tensor_core.h has no host {fn}"


def test_device_headers_stay_host_compilable():
    """device.cuh and the <op>_kernels.cuh headers are what the host execution layer compiles
    with g++: no CUDA runtime or tensor headers, no launch syntax, dynamic shared memory through
    device.cuh's dynamic_smem (the layer provides it), and each moved header is the .cu's."""
    headers = [CUDA / "device.cuh", *sorted(CUDA.glob("*_kernels.cuh"))]
    assert len(headers) >= 2, "no <op>_kernels.cuh found"
    for path in headers:
        src = code(path)
        includes = re.findall(r'#include\s+[<"]([^>"]+)[>"]', src)
        allowed = {"device.cuh", "mma.cuh", "ATen/OpMathType.h"}
        # <cmath> and the like are fine; any project, torch or CUDA header but these is not.
        bad = [i for i in includes if ("." in i or "/" in i) and i not in allowed]
        assert not bad, f"{path.name} includes {bad}: the host layer cannot compile them"
        assert "<<<" not in src, f"{path.name}: launches belong in the .cu"
        if path.name != "device.cuh":
            assert "extern __shared__" not in src, f"{path.name}: use dynamic_smem<T>()"
            op = path.name.removesuffix("_kernels.cuh")
            assert f'#include "{path.name}"' in code(CUDA / f"{op}.cu")
    assert "extern __shared__" in code(CUDA / "device.cuh")
    assert '#include "device.cuh"' in code(CUDA / "common.cuh")


@pytest.mark.parametrize("op", OPS)
def test_device_code_lives_in_the_kernels_header(op):
    """Each op's kernels and device helpers are in <op>_kernels.cuh (the .cu keeps the launchers),
    and the host harness compiles that header, so the host execution layer runs every kernel."""
    header = CUDA / f"{op}_kernels.cuh"
    assert header.exists(), f"{op}.cu's device code is not in {header.name}"
    cu = code(CUDA / f"{op}.cu")
    assert not re.search(r"__(global|device)__", cu), f"{op}.cu defines device code"
    harness = "\n".join(code(p) for p in sorted((ROOT / "tools" / "cuda_host").glob("*.cpp")))
    assert f'#include "{header.name}"' in harness, f"no harness unit includes {header.name}"
    assert f'"{header.name}"' in (ROOT / "tests" / "cuda_host_lib.py").read_text(), (
        f"tests/cuda_host_lib.py's SOURCES lacks {header.name} (the build's cache key)"
    )
