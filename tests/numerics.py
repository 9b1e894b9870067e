"""The numerics contract of DESIGN.md as test helpers."""
from __future__ import annotations

import pytest
import torch

FP32_TOL = 1e-5
LOWP_TOL = 1e-2
LOWP = (torch.float16, torch.bfloat16)

# Every backend on the device it runs on; CUDA cases carry the `cuda` mark.
BACKEND_CASES = ([pytest.param(f"cpu:{b}", id=f"cpu-{b}") for b in ("reference", "cpu", "triton")] +
                 [pytest.param(f"cuda:{b}", id=f"cuda-{b}", marks=pytest.mark.cuda)
                  for b in ("reference", "triton", "cuda")])


def split_case(case: str) -> tuple[torch.device, str]:
    device, backend = case.split(":")
    return torch.device(device), backend


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; NaN anywhere gives inf."""
    out64, ref64 = out.double(), ref.double()
    if not torch.isfinite(out64).all():
        return float("inf")
    denom = ref64.norm().item()
    return (out64 - ref64).norm().item() / (denom if denom > 0 else 1.0)


def assert_matches(out: torch.Tensor, ref64: torch.Tensor, dtype: torch.dtype, what: str = "output",
                   torch_lowp: torch.Tensor | None = None, fp32_tol: float = FP32_TOL) -> None:
    """out against the float64 reference: fp32 under fp32_tol; fp16/bf16 under 1e-2 and no worse
    than twice the error of plain torch computing in the same precision (torch_lowp)."""
    assert out.shape == ref64.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    err = rel_err(out, ref64)
    if dtype in LOWP:
        assert err < LOWP_TOL, f"{what}: relative error {err:.3g} >= {LOWP_TOL} ({dtype})"
        if torch_lowp is not None:
            torch_err = rel_err(torch_lowp, ref64)
            assert err <= 2 * torch_err + 1e-7, (
                f"{what}: relative error {err:.3g} is over twice plain torch's {torch_err:.3g} ({dtype})")
    else:
        assert err < fp32_tol, f"{what}: relative error {err:.3g} >= {fp32_tol} ({dtype})"
