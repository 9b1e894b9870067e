"""Backend choice: auto, forced by use_backend() or LDMFAST_BACKEND, and clear errors."""
import os
import subprocess
import sys

import pytest
import torch

import ldmfast.ops as ops
from ldmfast.ops import _backends


def _args():
    x = torch.randn(2, 3)
    return x, torch.randn_like(x), 0.5, 0.9


def test_auto_picks_the_compiled_cpu_kernel_for_cpu_tensors():
    assert ops.get_backend() == "auto"
    assert ops.resolve("ddim_step", torch.zeros(2)) == "cpu"
    # Kernels take fp32/fp16/bf16; auto hands other dtypes to the reference.
    assert ops.resolve("ddim_step", torch.zeros(2, dtype=torch.float64)) == "reference"


def test_use_backend_as_context_manager_and_as_call():
    with ops.use_backend("reference"):
        assert ops.get_backend() == "reference"
        with ops.use_backend("cpu"):
            assert ops.resolve("ddim_step", torch.zeros(2)) == "cpu"
        assert ops.get_backend() == "reference"
    assert ops.get_backend() == "auto"
    ops.use_backend("reference")
    try:
        assert ops.resolve("ddim_step", torch.zeros(2)) == "reference"
    finally:
        ops.use_backend("auto")
    assert ops.get_backend() == "auto"


def test_a_block_forces_its_backend_in_its_own_thread_only():
    import threading

    seen, entered, leave = [], threading.Event(), threading.Event()

    def other():
        entered.wait()
        seen.append(ops.get_backend())
        leave.set()

    thread = threading.Thread(target=other)
    thread.start()
    with ops.use_backend("reference"):
        entered.set()
        leave.wait()
        assert ops.get_backend() == "reference"
    thread.join()
    assert seen == ["auto"] and ops.get_backend() == "auto"
    # A use_backend object opened as a block later still forces its backend there.
    block = ops.use_backend("cpu")
    ops.use_backend("auto")
    with block:
        assert ops.get_backend() == "cpu"
    assert ops.get_backend() == "auto"


def test_unknown_backend_name_is_a_value_error():
    with pytest.raises(ValueError, match="unknown backend 'fastest'"):
        ops.use_backend("fastest")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given on a machine without a GPU")
def test_forced_cuda_without_gpu_says_why():
    with ops.use_backend("cuda"), pytest.raises(ops.BackendUnavailableError, match="CUDA tensors, got a cpu"):
        ops.ddim_step(*_args())


def test_forced_backend_with_unsupported_dtype_says_why():
    x = torch.randn(2, 3, dtype=torch.float64)
    with ops.use_backend("cpu"), pytest.raises(ops.BackendUnavailableError, match="float64"):
        ops.ddim_step(x, x, 0.5, 0.9)


def test_missing_compiled_module_is_reported_not_hidden(monkeypatch):
    monkeypatch.setitem(ops._native._modules, "_C", None)
    monkeypatch.setitem(ops._native._import_errors, "_C", "No module named 'ldmfast._C'")
    reason = ops.unavailable_reason("cpu", torch.device("cpu"))
    assert "ldmfast._C is not built" in reason
    with ops.use_backend("cpu"), pytest.raises(ops.BackendUnavailableError, match="not built"):
        ops.ddim_step(*_args())
    assert ops.resolve("ddim_step", torch.zeros(2)) == "reference"  # auto moves on


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setattr(_backends, "_TRITON_INTERPRET", False)
    assert "TRITON_INTERPRET=1" in ops.unavailable_reason("triton", torch.device("cpu"))
    monkeypatch.setattr(_backends, "_TRITON_MISSING", "Triton is not installed (pip install triton)")
    assert "not installed" in ops.unavailable_reason("triton", torch.device("cpu"))


def _run(code, **env):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=120)


def test_environment_variable_forces_a_backend():
    result = _run("import torch, ldmfast.ops as o; print(o.get_backend(), o.resolve('ddim_step', torch.zeros(1)))",
                  LDMFAST_BACKEND="reference")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["reference", "reference"]


def test_bad_environment_variable_names_it():
    result = _run("import torch, ldmfast.ops as o; o.ddim_step(torch.zeros(1), torch.zeros(1), 0.5, 0.9)",
                  LDMFAST_BACKEND="gpu")
    assert result.returncode != 0
    assert "LDMFAST_BACKEND: unknown backend 'gpu'" in result.stderr


def test_import_works_without_triton():
    # None in sys.modules is how Python marks a module as not importable.
    code = ("import sys; sys.modules['triton'] = None\n"
            "import torch, ldmfast.ops as o\n"
            "print(o.ddim_step(torch.ones(1, 2), torch.zeros(1, 2), 1.0, 1.0).tolist())\n"
            "print(o.unavailable_reason('triton', torch.device('cpu')))\n")
    result = _run(code, TRITON_INTERPRET="1")
    assert result.returncode == 0, result.stderr
    assert "[[1.0, 1.0]]" in result.stdout and "Triton is not installed" in result.stdout
