"""Shared benchmark plumbing: timing, device naming, tables, result files under bench/results/."""
from __future__ import annotations

import cProfile
import datetime
import json
import os
import platform
import pstats
import re
import time
from pathlib import Path

import torch
import torch.utils.benchmark as tbench

RESULTS = Path(__file__).resolve().parent / "results"


def device_tag(device: torch.device) -> str:
    """'cpu-2core' or the GPU's name, for result file names."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return f"cpu-{os.cpu_count()}core"


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo; platform.processor() elsewhere): CPU results differ by
    machine (an Intel Xeon and an AMD Zen 4 core ran the same kernels at different ratios to torch)."""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def time_ms(fn, min_run_time: float = 0.5) -> float:
    """Median milliseconds of fn() (CUDA synchronized by torch.utils.benchmark)."""
    fn()  # warm up: first-call costs (Triton compilation, allocator) are not the steady state
    timer = tbench.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median * 1e3


def alternating_min_ms(fns, min_run_time: float, sync=lambda: None, clock=time.perf_counter) -> list[float]:
    """Milliseconds per call of each of fns, timed in alternating rounds (every fn once per round, a
    few calls each), each the minimum over rounds: robust to other processes sharing the machine
    (the minimum is the uncontended time; a shared CPU's speed drifts by 1.5x within a minute, which
    a median of one function's calls after another's folds into their ratio).
    clock=time.thread_time measures the CPU time of this thread only (single-threaded runs)."""
    for fn in fns:  # warm up (Triton compilation, allocator)
        fn()
    sync()
    calls = []
    for fn in fns:  # calls per round: ~20 ms of work
        t0 = time.perf_counter()
        fn()
        sync()
        calls.append(max(1, int(0.02 / max(time.perf_counter() - t0, 1e-6))))
    best = [float("inf")] * len(fns)
    deadline = time.perf_counter() + len(fns) * min_run_time
    rounds = 0
    while rounds < 5 or time.perf_counter() < deadline:
        for i, fn in enumerate(fns):
            t0 = clock()
            for _ in range(calls[i]):
                fn()
            sync()
            best[i] = min(best[i], (clock() - t0) / calls[i] * 1e3)
        rounds += 1
    return best


def keep_freed_cpu_memory() -> bool:
    """Make glibc's malloc keep freed memory in its heap (no trimming, a fixed 32 MiB mmap
    threshold) so that CPU timings leave out the page faults of fresh allocations. glibc otherwise
    returns a freed block to the system or keeps it depending on the order of earlier frees, and a
    call then pays ~5400 page faults per 22 MB output or none: the same GroupNorm forward measured
    2.8 or 11.7 ms, torch's as often as ours. False where malloc is not glibc's (nothing changed).
    Not for memory measurements: resident memory no longer falls when tensors are freed."""
    import ctypes
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
    # 32 MiB is glibc's largest mmap threshold on 64-bit; larger blocks stay their own mappings
    return bool(mallopt(m_trim_threshold, 2**31 - 1)) and bool(mallopt(m_mmap_threshold, 32 << 20))


def cpu_malloc_meta(kept: bool) -> str:
    """The result files' "cpu_malloc" entry: whether keep_freed_cpu_memory was in effect."""
    return "freed memory kept (no page faults per call)" if kept else "default"


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def wall_ms(fn, reps: int, warmup: int = 3) -> float:
    """Wall milliseconds per call of fn over `reps` back-to-back calls, CUDA synchronized at the
    ends only: on a GPU, the host's time per call wherever the kernels are shorter than it."""
    for _ in range(warmup):
        fn()
    _sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    _sync()
    return (time.perf_counter() - t0) / reps * 1e3


def graph_ms(fns, reps: int = 20, rounds: int = 5) -> list[float | None]:
    """Device milliseconds per call of each fn: `reps` calls captured in one CUDA graph, replayed
    in alternating rounds, the minimum over rounds, timed with CUDA events. A graph replays the
    kernels without the host work around them (Python, dispatch, autograd, launches), so this is
    the kernels' own time: what a bandwidth figure is about, and what a model sees whenever its
    host runs ahead of the GPU. None for a fn that cannot be captured (the reason is printed)."""
    graphs = []
    for fn in fns:
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm up off the capture stream, as torch.cuda.graph asks
                for _ in range(3):
                    fn()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for _ in range(reps):
                    fn()
            graphs.append(graph)
        except RuntimeError as err:
            print(f"graph capture failed: {str(err).splitlines()[0]}", flush=True)
            graphs.append(None)
    best = [float("inf")] * len(fns)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(rounds):
        for i, graph in enumerate(graphs):
            if graph is None:
                continue
            graph.replay()  # the first replay of a round pays for nothing the others do not
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            best[i] = min(best[i], start.elapsed_time(end) / reps)
    return [None if g is None else b for g, b in zip(graphs, best)]


def print_table(rows: list[dict], columns: list[str]) -> None:
    text = [[_fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(t[i]) for t in text)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for t in text:
        print("  ".join(v.ljust(w) for v, w in zip(t, widths)))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def save(name: str, device: torch.device, rows: list[dict], meta: dict | None = None) -> Path:
    """Write rows as JSON to bench/results/<name>-<device>-<date>.json and return the path. A later
    run on the same day goes to ...-<date>-run2.json, -run3 and so on: it never replaces a result
    (a second run of a day had overwritten a committed file)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    date = datetime.date.today().isoformat()
    stem = f"{name}-{device_tag(device)}-{date}"
    path, run = RESULTS / f"{stem}.json", 2
    while path.exists():
        path, run = RESULTS / f"{stem}-run{run}.json", run + 1
    info = {"benchmark": name, "date": date, "device": device_tag(device), "torch": torch.__version__,
            "python": platform.python_version(), "threads": torch.get_num_threads(), "cpu": cpu_model(),
            **(meta or {})}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"info": info, "rows": rows}, indent=1) + "\n")
    os.replace(tmp, path)
    return path


def _profiled(fn, reps: int, activities) -> torch.profiler.profile:
    """A torch.profiler session over `reps` calls of fn, after three calls of warm-up."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    return prof


def kernel_table(fn, reps: int) -> list[tuple[str, float, int]]:
    """(kernel name, microseconds per call, launches per call), largest first."""
    prof = _profiled(fn, reps, [torch.profiler.ProfilerActivity.CUDA])
    rows = [(e.key, e.device_time_total / reps, e.count // reps) for e in prof.key_averages()
            if e.device_time_total > 0]
    return sorted(rows, key=lambda r: -r[1])


def runtime_calls(fn, reps: int) -> list[tuple[str, float, int]]:
    """(CUDA runtime/driver call, host microseconds per call of fn, calls per call of fn), longest
    first: launches, allocations, and any synchronization (cudaStreamSynchronize, a blocking
    cudaMemcpy...) that would make the host wait for the GPU inside fn."""
    prof = _profiled(fn, reps, [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA])
    rows = [(e.key, e.cpu_time_total / reps, e.count // reps) for e in prof.key_averages()
            if e.device_type == torch.autograd.DeviceType.CPU and e.key.startswith("cu")]
    return sorted(rows, key=lambda r: -r[1])


def host_profile(fn, reps: int = 5, top: int = 15) -> None:
    """Where the host spends `reps` calls of fn (cProfile, by own time, the `top` entries): on a
    GPU, what the device waits for whenever this is longer than the kernels."""
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(reps):
        fn()
    _sync()
    prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(top)
