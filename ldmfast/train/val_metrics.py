"""Image error sums over validation slices, reduced over processes: PSNR (mean over slices),
MAE over all pixels and lesion MAE over lesion pixels, for images in [-1, 1]; and the slices with
the largest lesions kept for a preview grid."""
from __future__ import annotations

import math

import numpy as np
import torch

from .distributed import all_reduce_sum

#: Images are in [-1, 1]: PSNR's peak-to-peak range is 2.
DATA_RANGE = 2.0


class ImageErrorSums:
    def __init__(self, device: torch.device, keep: int = 0):
        # per-slice PSNR, slices, |error|, pixels, |error| in lesions, lesion pixels
        self.totals = torch.zeros(6, dtype=torch.float64, device=device)
        self.keep, self.kept = keep, []

    def add(self, pred: torch.Tensor, target: torch.Tensor, lesion: torch.Tensor) -> None:
        """pred, target (N, C, H, W) in [-1, 1]; lesion (N, 1, H, W) in {0, 1}."""
        err = (pred.float().clamp(-1, 1) - target.float()).double()
        mse = err.square().mean(dim=(1, 2, 3)).clamp_min(1e-12)
        lesion = lesion.to(err.device, err.dtype)
        self.totals += torch.stack([(10 * torch.log10(DATA_RANGE ** 2 / mse)).sum(),
                                    torch.tensor(float(err.shape[0]), dtype=err.dtype, device=err.device),
                                    err.abs().sum(), torch.tensor(float(err.numel()), dtype=err.dtype, device=err.device),
                                    (err.abs() * lesion).sum(), lesion.sum() * err.shape[1]]).to(self.totals.device)
        if self.keep:
            areas = lesion.sum(dim=(1, 2, 3)).tolist()
            for i, area in enumerate(areas):
                self.kept.append((area, target[i].float().cpu().numpy(), pred[i].float().clamp(-1, 1).cpu().numpy(),
                                  lesion[i].float().cpu().numpy()))
            self.kept = sorted(self.kept, key=lambda item: -item[0])[:self.keep]

    def reduce(self) -> dict:
        all_reduce_sum(self.totals)
        t = self.totals.tolist()
        # No slice measured is no measurement: NaN (logged as null), never a perfect-looking 0.
        return {"psnr": t[0] / t[1] if t[1] > 0 else math.nan, "mae": t[2] / t[3] if t[3] > 0 else math.nan,
                "lesion_mae": t[4] / t[5] if t[5] > 0 else math.nan, "slices": int(t[1])}

    def preview_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """(targets, predictions, lesions) of the kept slices, or None."""
        if not self.kept:
            return None
        return tuple(np.stack([k[j] for k in self.kept]) for j in (1, 2, 3))
