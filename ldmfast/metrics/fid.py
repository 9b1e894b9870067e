"""Frechet distance between two sets of features, the core of FID.

d^2 = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)).

The usual implementation calls scipy.linalg.sqrtm on the non-symmetric product S1 S2, which
returns complex values and spurious imaginary parts when the covariances are near singular
(fewer samples than feature dimensions, the common case for 2048-d features of a few
hundred slices). Here the trace comes from the symmetric positive semi-definite matrix
S1^(1/2) S2 S1^(1/2), which has the same eigenvalues as S1 S2: a float64 eigen-decomposition
with round-off negatives clipped to 0, real by construction.
"""

from __future__ import annotations

import torch


def _as_float64(x, name: str) -> torch.Tensor:
    t = torch.as_tensor(x).detach().to(device="cpu", dtype=torch.float64)
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name}: contains NaN or inf")
    return t


def _psd_sqrt(matrix: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric positive semi-definite matrix (negative round-off clipped)."""
    vals, vecs = torch.linalg.eigh((matrix + matrix.T) / 2)
    return (vecs * vals.clamp_min(0).sqrt()) @ vecs.T


class FeatureStatistics:
    """Mean and covariance of feature vectors, accumulated in float64 batch by batch so a data
    set's features need not all be kept."""

    def __init__(self, dim: int | None = None):
        """dim: the feature length; None takes it from the first batch."""
        self.dim = dim
        self.count = 0
        self._sum = self._outer = None

    def update(self, features) -> None:
        """Add a batch of features, shape (N, dim)."""
        f = _as_float64(features, "features")
        if self.dim is None and f.ndim == 2:
            self.dim = f.shape[1]
        if f.ndim != 2 or f.shape[1] != self.dim:
            raise ValueError(f"features: expected shape (N, {self.dim}), got {tuple(f.shape)}")
        if self._sum is None:
            self._sum = torch.zeros(self.dim, dtype=torch.float64)
            self._outer = torch.zeros(self.dim, self.dim, dtype=torch.float64)
        self.count += f.shape[0]
        self._sum += f.sum(dim=0)
        self._outer += f.T @ f

    @property
    def mean(self) -> torch.Tensor:
        if self.count == 0:
            raise ValueError("features: no sample added")
        return self._sum / self.count

    @property
    def covariance(self) -> torch.Tensor:
        """The unbiased sample covariance (divides by N - 1, as numpy.cov)."""
        if self.count < 2:
            raise ValueError(f"features: a covariance needs at least 2 samples, got {self.count}")
        mu = self.mean
        return (self._outer - self.count * torch.outer(mu, mu)) / (self.count - 1)


def feature_statistics(features) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, covariance) in float64 of features of shape (N, dim), N >= 2."""
    f = _as_float64(features, "features")
    if f.ndim != 2:
        raise ValueError(f"features: expected shape (N, dim), got {tuple(f.shape)}")
    stats = FeatureStatistics(f.shape[1])
    stats.update(f)
    return stats.mean, stats.covariance


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Squared Frechet distance between the Gaussians N(mu1, sigma1) and N(mu2, sigma2)
    (what FID reports). Clipped at 0: round-off can push identical sets a hair below."""
    mu1, mu2 = _as_float64(mu1, "mu1"), _as_float64(mu2, "mu2")
    s1, s2 = _as_float64(sigma1, "sigma1"), _as_float64(sigma2, "sigma2")
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(
            f"mu1, sigma1, mu2, sigma2: expected shapes (d,), (d, d), (d,), (d, d); got "
            f"{tuple(mu1.shape)}, {tuple(s1.shape)}, {tuple(mu2.shape)}, {tuple(s2.shape)}"
        )
    root = _psd_sqrt(s1)
    product = root @ s2 @ root
    trace_sqrt = torch.linalg.eigvalsh((product + product.T) / 2).clamp_min(0).sqrt().sum()
    diff = mu1 - mu2
    value = diff @ diff + torch.trace(s1) + torch.trace(s2) - 2 * trace_sqrt
    return max(float(value), 0.0)


def fid_from_features(features1, features2) -> float:
    """Frechet distance between the statistics of two feature sets, shapes (N1, d), (N2, d)."""
    return frechet_distance(*feature_statistics(features1), *feature_statistics(features2))


def fid_from_statistics(stats1: FeatureStatistics, stats2: FeatureStatistics) -> float:
    """Frechet distance between two accumulated `FeatureStatistics`."""
    return frechet_distance(stats1.mean, stats1.covariance, stats2.mean, stats2.covariance)


__all__ = ["FeatureStatistics", "feature_statistics", "fid_from_features", "fid_from_statistics", "frechet_distance"]
