"""A brain mask computed from CTP when a data set ships none (ISLES'24 does not)."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

#: Unenhanced brain tissue and CSF lie in this HU range; air (about -1000) and bone
#: (several hundred) do not, which is what separates the brain from its surroundings.
TISSUE_HU = (-10.0, 100.0)
#: Changes when compute_brain_mask computes other masks (2: zero-filled backgrounds are not tissue);
#: part of the slice cache's key for cases whose mask is computed.
BRAIN_MASK_VERSION = 2


def compute_brain_mask(ctp: np.ndarray, tissue_hu: tuple[float, float] = TISSUE_HU) -> np.ndarray:
    """Brain mask (bool, X x Y x Z) of a CTP series (X x Y x Z x frames, in HU).

    A heuristic for skull-on (or skull-stripped, zero-filled) CT: voxels whose median over time (the median ignores the
    contrast bolus, which passes in a minority of frames) is in `tissue_hu`, opened in-plane
    to cut thin bridges to scalp and neck tissue, then the largest 3D component that does
    not touch the in-plane border (the brain sits inside the skull; zero padding outside
    the scanned field of view touches the border and may be larger), and holes filled slice
    by slice (ventricles, vessels and calcifications outside the range).
    """
    if ctp.ndim != 4:
        raise ValueError(f"ctp: expected X x Y x Z x frames, got shape {ctp.shape}")
    baseline = np.median(ctp, axis=-1)
    tissue = (baseline > tissue_hu[0]) & (baseline < tissue_hu[1])
    # Skull-stripped or masked series fill the background with 0, which lies in the tissue range:
    # a voxel at exactly 0 HU in every frame is fill, not tissue (inside the brain the holes are
    # filled again below). Otherwise the mask covered the whole field of view.
    tissue &= np.any(ctp != 0, axis=-1)
    in_plane = np.zeros((3, 3, 3), dtype=bool)
    in_plane[:, :, 1] = ndimage.generate_binary_structure(2, 1)
    tissue = ndimage.binary_opening(tissue, structure=in_plane, iterations=2)
    labels, n = ndimage.label(tissue)
    if n == 0:
        return tissue
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    inner = sizes.copy()
    inner[np.unique(np.concatenate([labels[[0, -1]].ravel(), labels[:, [0, -1]].ravel()]))] = 0
    brain = labels == np.argmax(inner if inner.any() else sizes)
    for z in range(brain.shape[2]):
        brain[:, :, z] = ndimage.binary_fill_holes(brain[:, :, z])
    return brain
