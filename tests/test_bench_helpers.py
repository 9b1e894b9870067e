"""Bench scripts whose GPU-only parts would otherwise first run on a lent GPU: bench_attention's
kernels-alone columns (CUDA graphs replaced by a stand-in that calls each function once) and
host_overhead's stubs (which must name the ops' current kernels)."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import bench_attention  # noqa: E402
import common  # noqa: E402
import host_overhead  # noqa: E402


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
