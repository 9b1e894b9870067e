"""Bench scripts whose GPU-only parts would otherwise first run on a lent GPU: bench_attention's
kernels-alone columns (CUDA graphs replaced by a stand-in that calls each function once),
host_overhead's stubs (which must name the ops' current kernels) and the GroupNorm sweep's setting
selection; and the CPU timings' allocator setting."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import bench_attention  # noqa: E402
import bench_posttrain  # noqa: E402
import common  # noqa: E402
import host_overhead  # noqa: E402
import sweep_group_norm_cuda  # noqa: E402


def test_attention_device_times_fill_ours_and_the_fastest_peer(monkeypatch):
    grad_modes = []

    def fake_graph_ms(fns, reps=20, rounds=5):
        for fn in fns:
            fn()  # (each must run: a forward, or a forward and backward through autograd.grad)
        grad_modes.append(torch.is_grad_enabled())
        return [1.0, 3.0]

    monkeypatch.setattr(common, "graph_ms", fake_graph_ms)
    peers = bench_attention.candidates(torch.device("cpu"))
    # The CPU has no Triton backend: ldmfast's cpu backend stands in under that name.
    monkeypatch.setattr(bench_attention, "candidates",
                        lambda device: peers + [("ldmfast triton", dict(peers)["ldmfast cpu"])])
    qkv = tuple(torch.randn(1, 2, 16, 32) for _ in range(3))
    rows = [{"shape": "X B=1", "impl": "ldmfast triton", "fwd_ms": 1.0, "fwdbwd_ms": 2.0},
            {"shape": "X B=1", "impl": "sdpa flash_attention", "fwd_ms": 0.5, "fwdbwd_ms": 3.0},
            {"shape": "X B=1", "impl": "matmul-softmax-matmul", "fwd_ms": 0.7, "fwdbwd_ms": 1.5}]
    bench_attention.device_times(rows, "X", qkv, rows[1:])
    ours, flash, plain = rows
    assert grad_modes == [False, True]
    assert (ours["dev_fwd_ms"], ours["dev_fwd_vs_best_torch"]) == (1.0, 3.0)
    assert (ours["dev_fwdbwd_ms"], ours["dev_fwdbwd_vs_best_torch"]) == (1.0, 3.0)
    # The fastest peer of each pass in the eager timing is the one timed beside ours.
    assert flash["dev_fwd_ms"] == 3.0 and "dev_fwdbwd_ms" not in flash
    assert plain["dev_fwdbwd_ms"] == 3.0 and "dev_fwd_ms" not in plain


def test_host_overhead_runs_every_case_with_the_launches_stubbed():
    with host_overhead.stubbed_gpu():
        for name, (ours, theirs) in host_overhead.cases().items():
            assert host_overhead.us_per_call(ours, 3) > 0, name
            assert host_overhead.us_per_call(theirs, 3) > 0, name


def test_group_norm_sweep_runs_only_the_named_settings():
    select = sweep_group_norm_cuda.select_settings
    assert select(None) == sweep_group_norm_cuda.SETTINGS
    picked = select("fused_backward,l2_chunk_bytes")
    assert picked[0] == {} and len(picked) > 2
    assert all({"fused_backward", "l2_chunk_bytes"} & set(setting) for setting in picked[1:])
    with pytest.raises(ValueError, match="no setting named nope"):
        select("fused_backward,nope")


KEEP_FREED_PROBE = """
import ctypes, sys, torch
sys.path.insert(0, sys.argv[1])
import common
class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                      "fsmblks", "uordblks", "fordblks", "keepcost")]
mallinfo2 = ctypes.CDLL(None).mallinfo2
mallinfo2.restype = MallInfo2
kept = sys.argv[2] == "1" and common.keep_freed_cpu_memory()
before = mallinfo2().hblkhd
block = torch.empty(5_500_000)  # 22 MB
print(int(kept), mallinfo2().hblkhd - before)  # bytes of it in a mapping of its own
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt and mallinfo2")
def test_keep_freed_cpu_memory_puts_large_blocks_in_the_heap():
    """What the CPU benchmarks call first: afterwards a 22 MB block comes from glibc's heap, where a
    freed block stays for the next (no page faults in steady state), instead of a mapping of its
    own that free() returns to the system (glibc's default for a first large block; later ones
    depend on the order of earlier frees, which made the same call cost 2.8 or 11.7 ms). In fresh
    processes: the setting is process-wide."""
    bench = str(Path(__file__).resolve().parents[1] / "bench")
    mapped = {}
    for keep in ("1", "0"):
        out = subprocess.run([sys.executable, "-c", KEEP_FREED_PROBE, bench, keep], capture_output=True,
                             text=True, check=True).stdout.split()
        assert int(out[0]) == int(keep)
        mapped[keep] = int(out[1])
    assert mapped["1"] == 0 and mapped["0"] >= 22_000_000


class _FitsUpTo:
    """Stands for bench_posttrain.Setup: a step of more than `limit` samples runs out of memory."""

    def __init__(self, limit):
        self.limit, self.batches = limit, []
        self.optimizer = self.vqgan = torch.nn.Linear(1, 1)

    def set_batch(self, batch):
        self.batches.append(batch)

    def step(self, variant):
        if self.batches[-1] > self.limit:
            raise torch.OutOfMemoryError("fake")


@pytest.mark.parametrize("limit, estimate", [(300, None), (300, 290), (300, 330), (300, 100), (7, 500)])
def test_largest_batch_search(limit, estimate):
    """Bisection finds the largest batch exactly; from an estimate, within 5 % below it, in a few
    steps when the estimate is close."""
    s = _FitsUpTo(limit)
    found = bench_posttrain.largest_batch(s, "naive", estimate=estimate)
    assert found <= limit and s.batches.count(found) >= 1
    if estimate is None:
        assert found == limit
    else:
        assert found >= limit - max(1, int(estimate * 0.05))
    if estimate in (290, 330):
        assert len(s.batches) <= 4


def test_save_never_replaces_a_result_of_the_same_day(monkeypatch, tmp_path):
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    cpu = torch.device("cpu")
    first = common.save("demo_bench", cpu, [{"run": 1}])
    second = common.save("demo_bench", cpu, [{"run": 2}])
    third = common.save("demo_bench", cpu, [{"run": 3}])
    assert len({first, second, third}) == 3
    assert second.name == first.name.replace(".json", "-run2.json")
    assert third.name == first.name.replace(".json", "-run3.json")
    assert [json.loads(p.read_text())["rows"][0]["run"] for p in (first, second, third)] == [1, 2, 3]
