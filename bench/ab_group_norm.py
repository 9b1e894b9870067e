"""In-process A/B of two versions of the CPU GroupNorm kernels (csrc/cpu/group_norm.cpp).

    python bench/ab_group_norm.py HEAD~1                # that revision against the working tree
    python bench/ab_group_norm.py REV_A REV_B --dtypes bfloat16 --layout channels_last

Each version is compiled from its own sources (group_norm.cpp, isa.cpp and the headers, as git has
them at that revision, or the working tree's) into a small module of its own, with the flags of
the CMake build and the per-file options that version's CMakeLists.txt gives group_norm.cpp. Both
load into this one process and their calls alternate (common.alternating_min_ms, CPU time of one
thread): on a shared machine whose speed drifts by up to 1.5x within a minute, separate processes
or runs cannot tell a few percent apart.

Every call is timed both right after its twin and right after the other version's call (each
function appears twice per round, in mirrored order): a call that directly follows the same work
on the same tensors finds them in cache, and a harness that always ran B right after A measured
two identical builds 1.11x apart in the backward.
"""
from __future__ import annotations

import argparse
import importlib
import re
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import torch

import common

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ["csrc/dtype.h", "csrc/cpu/group_norm.cpp", "csrc/cpu/group_norm.h", "csrc/cpu/half.h", "csrc/cpu/isa.cpp",
           "csrc/cpu/isa.h", "csrc/cpu/vec_math.h"]
# Headers that only some revisions have (copied where the revision has them).
OPTIONAL_SOURCES = ["csrc/cpu/line_aligned.h"]
# The CMake build's flags for the CPU module (build.ninja of a Release build), less the warnings.
FLAGS = ["-O3", "-DNDEBUG", "-std=gnu++17", "-fPIC", "-fvisibility=hidden", "-fno-fast-math", "-flto=auto",
         "-fopenmp", "-shared"]
SHAPES = [(1, 128, 192, 224), (1, 256, 96, 112), (2, 512, 48, 56), (4, 224, 48, 56), (4, 896, 24, 28),
          (4, 1792, 12, 14)]  # bench_group_norm.py's CPU shapes
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

BINDING = r"""
#include <pybind11/pybind11.h>
#include <cstdint>
#include "cpu/group_norm.h"
using namespace ldmfast;
template <typename T = void> T* at(uintptr_t p) { return reinterpret_cast<T*>(p); }
void forward(int dt, uintptr_t x, uintptr_t w, uintptr_t b, uintptr_t y, uintptr_t m, uintptr_t r, int64_t n,
             int64_t c, int64_t s, int64_t g, float eps, bool silu, bool cl, int threads) {
  cpu::group_norm_forward(static_cast<DType>(dt), at(x), at<const float>(w), at<const float>(b), at(y), at<float>(m),
                          at<float>(r), n, c, s, g, eps, silu, cl, threads);
}
void backward(int dt, uintptr_t dy, uintptr_t x, uintptr_t w, uintptr_t b, uintptr_t m, uintptr_t r, uintptr_t dx,
              uintptr_t dw, uintptr_t db, int64_t n, int64_t c, int64_t s, int64_t g, bool silu, bool cl, int threads) {
  cpu::group_norm_backward(static_cast<DType>(dt), at(dy), at(x), at<const float>(w), at<const float>(b),
                           at<const float>(m), at<const float>(r), at(dx), at<float>(dw), at<float>(db), n, c, s, g,
                           silu, cl, threads);
}
PYBIND11_MODULE(MODULE_NAME, mod) {
  mod.def("forward", &forward, pybind11::call_guard<pybind11::gil_scoped_release>());
  mod.def("backward", &backward, pybind11::call_guard<pybind11::gil_scoped_release>());
}
"""


def source_text(rev: str, path: str, optional: bool = False) -> str | None:
    """A file as git has it at `rev`, or as the working tree has it (rev "worktree"); None for an
    optional file that the version lacks."""
    if rev == "worktree":
        if optional and not (ROOT / path).exists():
            return None
        return (ROOT / path).read_text()
    try:
        return subprocess.run(["git", "show", f"{rev}:{path}"], cwd=ROOT, check=True, capture_output=True,
                              text=True).stdout
    except subprocess.CalledProcessError as err:
        if optional:
            return None
        raise SystemExit(f"{rev}: cannot read {path} ({err.stderr.strip()})") from None


def file_options(rev: str) -> list[str]:
    """The COMPILE_OPTIONS that the version's CMakeLists.txt sets on group_norm.cpp."""
    found = re.search(r"group_norm\.cpp PROPERTIES COMPILE_OPTIONS\s+([^)]+)\)", source_text(rev, "CMakeLists.txt"))
    return found.group(1).replace('"', " ").replace(";", " ").split() if found else []  # (a CMake list)


def build(rev: str, name: str, work: Path):
    """Compile the version into module `name` under work/ and import it."""
    src = work / name
    for path in SOURCES + OPTIONAL_SOURCES:
        text = source_text(rev, path, optional=path in OPTIONAL_SOURCES)
        if text is None:
            continue
        target = src / Path(path).relative_to("csrc")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    (src / "binding.cpp").write_text(BINDING.replace("MODULE_NAME", name))
    includes = subprocess.run([sys.executable, "-m", "pybind11", "--includes"], check=True, capture_output=True,
                              text=True).stdout.split()
    out = work / f"{name}{sysconfig.get_config_var('EXT_SUFFIX')}"
    cmd = ["g++", *FLAGS, *file_options(rev), *includes, f"-I{src}", str(src / "binding.cpp"),
           str(src / "cpu/group_norm.cpp"), str(src / "cpu/isa.cpp"), "-o", str(out)]
    print(f"{rev}: {' '.join(file_options(rev)) or 'no per-file options'}", flush=True)
    subprocess.run(cmd, check=True)
    sys.path.insert(0, str(work))
    return importlib.import_module(name)


def calls(mod, x, dy, layout: str):
    """(forward, backward) of `mod` on x (N, C, H, W) and dy, 32 groups, SiLU, one thread."""
    n, c, h, w = x.shape
    cl = layout == "channels_last"
    weight, bias = torch.randn(c), torch.randn(c)
    y, dx = torch.empty_like(x), torch.empty_like(x)
    stats, grads = torch.empty(2, n, 32), torch.empty(2, c)
    code = DTYPE_CODES[x.dtype]
    fwd = (code, x.data_ptr(), weight.data_ptr(), bias.data_ptr(), y.data_ptr(), stats[0].data_ptr(),
           stats[1].data_ptr(), n, c, h * w, 32, 1e-5, True, cl, 1)
    bwd = (code, dy.data_ptr(), x.data_ptr(), weight.data_ptr(), bias.data_ptr(), stats[0].data_ptr(),
           stats[1].data_ptr(), dx.data_ptr(), grads[0].data_ptr(), grads[1].data_ptr(), n, c, h * w, 32, True, cl, 1)
    mod.forward(*fwd)  # the statistics the backward reads
    buffers = (weight, bias, y, dx, stats, grads)  # alive as long as the calls (default arguments)
    return (lambda keep=buffers: mod.forward(*fwd)), (lambda keep=buffers: mod.backward(*bwd))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("rev_a", help="a git revision")
    p.add_argument("rev_b", nargs="?", default="worktree", help="a git revision (default: the working tree)")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--layout", default="contiguous", choices=["contiguous", "channels_last"])
    p.add_argument("--seconds", type=float, default=1.5, help="timing per shape (alternating rounds)")
    args = p.parse_args()
    torch.set_num_threads(1)
    common.keep_freed_cpu_memory()
    with tempfile.TemporaryDirectory(prefix="ab_group_norm_") as tmp:
        a, b = build(args.rev_a, "gn_a", Path(tmp)), build(args.rev_b, "gn_b", Path(tmp))
        ratios: dict[str, list[float]] = {"fwd": [], "bwd": []}
        print(f"\nCPU time of one thread, ms per call ({args.layout}); ratio = A / B (above 1: B is faster)")
        for dtype in [getattr(torch, d) for d in args.dtypes.split(",")]:
            for shape in SHAPES:
                x = torch.randn(shape, dtype=dtype)
                if args.layout == "channels_last":
                    x = x.to(memory_format=torch.channels_last)
                dy = torch.randn_like(x)
                (af, ab), (bf, bb) = calls(a, x, dy, args.layout), calls(b, x, dy, args.layout)
                t = common.alternating_min_ms([af, bf, bf, af, ab, bb, bb, ab], args.seconds, clock=time.thread_time)
                fa, fb, ba, bb_ = min(t[0], t[3]), min(t[1], t[2]), min(t[4], t[7]), min(t[5], t[6])
                ratios["fwd"].append(fa / fb)
                ratios["bwd"].append(ba / bb_)
                print(f"{str(dtype)[6:]:9s} {str(shape):18s} fwd {fa:7.3f} / {fb:7.3f} = {fa / fb:.3f}   "
                      f"bwd {ba:7.3f} / {bb_:7.3f} = {ba / bb_:.3f}", flush=True)
        print("geomean A / B: " + ", ".join(f"{k} {statistics.geometric_mean(v):.3f}" for k, v in ratios.items()))


if __name__ == "__main__":
    main()
