"""Evaluating synthesized DWI/ADC volumes against a reference data set.

The reference is a data set in any layout `ldmfast.data` reads (cases with CTP, DWI, ADC,
optionally brain and lesion masks); the prediction folder holds `<case>/{dwi,adc}.nii.gz`
as `ldmfast.data.write_synthesis` writes them. Each reference case is preprocessed exactly
as for training, and its usable slices (those a model synthesizes) are compared.

Two intensity scales, both reported, every column named by its scale:
- "normalized" (the default, the paper's): the model's [-1, 1] scale. The reference is
  preprocessed as for training (clip to the in-mask 0.5/99.5 percentiles, mask, map to
  [-1, 1]); the prediction is mapped with the reference volume's clip bounds, which inverts
  the writer exactly. data_range 2.
- "original": the stored intensities. The reference inside the brain mask (outside it 0, as
  the writer leaves the prediction), the prediction as written. data_range per volume and
  channel: the reference's clip bounds (high - low), so PSNR and SSIM match the normalized
  scale's up to the reference's clipped extremes, and MAE is in the image's own unit.

Region ("slice", default, or "brain"): MAE, PSNR, SSIM and MS-SSIM over the whole slice or
the brain mask only; lesion MAE is always inside the lesion mask and undefined (empty in the
CSV, null in the JSON) where a slice or case has no lesion.

Levels: per slice; per volume (MAE, lesion MAE and PSNR pooled over the volume's evaluated
pixels, SSIM and MS-SSIM the mean of its slices); per data set (mean, std, median over
volumes; the mean over all slices too). FID is per data set, in the normalized scale.

Samples: a case synthesized with `ldmfast synthesize --samples K` has K draws; by default
(samples "all") its slice and volume values are the means over the draws (the expected value of
one draw, with less noise than a single one), and FID takes every draw's slices; "first" measures
draw 0 alone (`<case>/{dwi,adc}.nii.gz`). The report's figures show draw 0.
"""

from __future__ import annotations

import json
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from nibabel.filebasedimages import ImageFileError
from tqdm.auto import tqdm

from ldmfast.data import (
    CaseFiles,
    DataError,
    PreprocessedCase,
    PreprocessOptions,
    VolumeStats,
    find_cases,
    load_case,
    output_paths,
    preprocess_case,
    sample_paths,
)
from ldmfast._values import is_integer
from ldmfast.data.loading import AFFINE_TOLERANCE
from ldmfast.data.writer import OUTPUT_CHANNELS, SYNTHESIS_RECORD

from . import image
from .extractors import extract_features
from .fid import FeatureStatistics, fid_from_statistics

SCALES = ("normalized", "original")
DEFAULT_SCALE = "normalized"
REGIONS = ("slice", "brain")
CHANNELS = OUTPUT_CHANNELS
METRICS = ("mae", "psnr", "ssim", "ms_ssim", "lesion_mae")
#: Whether a larger value is better, for reading differences between runs.
HIGHER_IS_BETTER = {"mae": False, "psnr": True, "ssim": True, "ms_ssim": True, "lesion_mae": False, "fid": False}
#: CTP display window of the figures, in the normalized scale: 0 to 100 HU of the 0-200 HU window.
CTP_WINDOW = (-1.0, 0.0)
#: EvaluateOptions.samples: every draw of a case ("all", their mean) or draw 0 alone ("first")
SAMPLE_MODES = ("all", "first")


@dataclass(frozen=True)
class EvaluateOptions:
    """region: "slice" or "brain"; ms_ssim_scales: 1 to 5 (the first standard weights,
    renormalized, for slices too small for 5); batch_size: slices per metric batch; samples:
    "all" (a case's values are the means over the draws its synthesis record lists) or "first"
    (draw 0 only)."""

    region: str = "slice"
    ms_ssim_scales: int = 5
    device: str = "cpu"
    batch_size: int = 64
    preprocess: PreprocessOptions = PreprocessOptions()
    samples: str = "all"

    def __post_init__(self):
        if self.region not in REGIONS:
            raise ValueError(f"region: {self.region!r} is not one of {REGIONS}")
        if self.samples not in SAMPLE_MODES:
            raise ValueError(f"samples: {self.samples!r} is not one of {SAMPLE_MODES}")
        if not 1 <= self.ms_ssim_scales <= len(image.MS_SSIM_WEIGHTS):
            raise ValueError(f"ms_ssim_scales: must be within 1..{len(image.MS_SSIM_WEIGHTS)}, got {self.ms_ssim_scales}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {self.batch_size}")

    @property
    def ms_ssim_weights(self) -> tuple[float, ...]:
        w = image.MS_SSIM_WEIGHTS[: self.ms_ssim_scales]
        return tuple(v / sum(w) for v in w)


def column(scale: str, channel: str, metric: str) -> str:
    """The CSV column / JSON key of a metric, e.g. "normalized_dwi_mae"."""
    return f"{scale}_{channel}_{metric}"


# --- pairing cases ---------------------------------------------------------------------------


def pair_cases(pred_dir: str | os.PathLike, ref_cases: list[CaseFiles], *, exclude: tuple = ()
               ) -> tuple[list[tuple[CaseFiles, dict[str, Path]]], list[str]]:
    """Match the prediction folder's cases to reference cases by case id.

    Returns the pairs (reference files, prediction paths) in reference order and the ids of
    reference cases with no prediction (left out: a test split is often a subset). A
    prediction case with no reference, or with a missing channel file, and a predicted
    reference case without its DWI or ADC, are DataErrors. Folders in `exclude` (the results
    folder, when it lies inside the prediction folder) are not cases.
    """
    pred_dir = Path(pred_dir)
    if not pred_dir.is_dir():
        raise DataError("prediction folder not found", path=pred_dir)
    skip = {Path(p).resolve() for p in exclude}
    predicted = sorted(p.name for p in pred_dir.iterdir()
                       if p.is_dir() and not p.name.startswith(".") and p.resolve() not in skip)
    if not predicted:
        raise DataError("no case folder inside the prediction folder", path=pred_dir)
    by_id = {c.case_id: c for c in ref_cases}
    orphans = [cid for cid in predicted if cid not in by_id]
    if orphans:
        raise DataError(f"predicted case(s) {orphans} have no reference case (check --ref and the case names)",
                        case=orphans[0], path=pred_dir / orphans[0])
    pairs = []
    for case in ref_cases:
        if case.case_id not in predicted:
            continue
        for name in ("dwi", "adc"):  # needed only for the cases evaluated
            if getattr(case, name) is None:
                raise DataError(f"the reference case has no {name.upper()} file to compare with",
                                case=case.case_id, path=case.ctp.parent)
        paths = output_paths(pred_dir, case.case_id)
        for name, path in paths.items():
            if not path.is_file():
                raise DataError(f"missing synthesized {name.upper()} file", case=case.case_id, path=path)
        pairs.append((case, paths))
    missing = [c.case_id for c in ref_cases if c.case_id not in predicted]
    return pairs, missing


# --- one case's volumes ----------------------------------------------------------------------


def read_prediction(case: PreprocessedCase, paths: dict[str, Path]) -> np.ndarray:
    """The synthesized volumes at the case's usable slices: S x 2 x X x Y, stored intensities.
    Shape or affine unlike the reference's is a DataError naming the file."""
    out = []
    for name in CHANNELS:
        path = paths[name]
        try:
            img = nib.load(path)
            shape = img.shape[:3] if len(img.shape) == 4 and img.shape[3] == 1 else img.shape
            if shape != tuple(case.spatial_shape):
                raise DataError(f"shape {img.shape} differs from the reference's {case.spatial_shape}", case=case.case_id, path=path)
            gap = float(np.max(np.abs(img.affine - case.affine)))
            if gap > AFFINE_TOLERANCE:
                raise DataError(f"affine differs from the reference's by up to {gap:.4g}", case=case.case_id, path=path)
            data = img.get_fdata(dtype=np.float32).reshape(shape)
        except (ImageFileError, OSError, EOFError, ValueError, zlib.error) as err:  # zlib: damaged gzip data
            if isinstance(err, DataError):
                raise
            raise DataError(f"cannot read as NIfTI: {err}", case=case.case_id, path=path) from err
        if not np.isfinite(data).all():
            raise DataError("non-finite voxels (NaN or inf)", case=case.case_id, path=path)
        out.append(np.moveaxis(data[:, :, case.slice_index], -1, 0))
    return np.stack(out, axis=1)


@dataclass(frozen=True)
class PredictionRecord:
    """What a case's synthesis record says of its files: the clip bounds its [0, 1] output was
    mapped to stored values with ({"dwi": stats, "adc": stats}; None without a record), its scale
    ("case", "unit", "model"; "none" without a record) and how many samples it holds."""

    stats: dict[str, VolumeStats] | None
    scale: str
    samples: int


def prediction_record(case_id: str, paths: dict[str, Path]) -> PredictionRecord:
    """The synthesis record of a prediction case; a folder without one (another tool's output)
    holds one sample taken as intensities on the reference's bounds. A record without usable
    bounds or sample count is a DataError."""
    path = paths[CHANNELS[0]].parent / SYNTHESIS_RECORD
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return PredictionRecord(None, "none", 1)
    except (OSError, ValueError) as err:
        raise DataError(f"cannot read the synthesis record: {err}", case=case_id, path=path) from None
    try:
        stats = {name: VolumeStats(float(record["stats"][name][0]), float(record["stats"][name][1]))
                 for name in CHANNELS}
        if not all(np.isfinite([s.low, s.high]).all() and s.high > s.low for s in stats.values()):
            raise ValueError
    except (TypeError, KeyError, IndexError, ValueError):
        raise DataError("the synthesis record has no usable 'stats' ({'dwi': [low, high], 'adc': [low, high]})",
                        case=case_id, path=path) from None
    samples = record.get("samples", 1)  # (records of older versions wrote one sample and no count)
    if not is_integer(samples) or samples < 1:
        raise DataError(f"the synthesis record's 'samples' must be an integer >= 1, got {samples!r}",
                        case=case_id, path=path)
    return PredictionRecord(stats, str(record.get("scale", "unknown")), int(samples))


def read_draws(case: PreprocessedCase, pred_dir: Path, record: PredictionRecord, mode: str) -> list[np.ndarray]:
    """The stored volumes (`read_prediction`) of the draws `mode` measures: every sample the record
    lists ("all") or draw 0 ("first"). A listed sample's missing file is a DataError naming it."""
    draws = []
    for k in range(record.samples if mode == "all" else 1):
        paths = sample_paths(pred_dir, case.case_id, k)
        for name, path in paths.items():
            if not path.is_file():
                raise DataError(f"missing synthesized {name.upper()} file of sample {k} (the synthesis record lists "
                                f"{record.samples} samples; --samples first measures sample 0 alone)",
                                case=case.case_id, path=path)
        draws.append(read_prediction(case, paths))
    return draws


def _normalize(pred: np.ndarray, stats: tuple[VolumeStats, VolumeStats]) -> np.ndarray:
    """Stored values -> the model scale with the clip bounds they were written with, the inverse
    of the writer's mapping (what is outside [low, high] clips to -1 or 1)."""
    out = np.empty_like(pred)
    for c, st in enumerate(stats):
        unit = np.clip((pred[:, c] - st.low) / (st.high - st.low), 0.0, 1.0)
        out[:, c] = 2 * unit - 1
    return out


def _predictions(stored: np.ndarray, written_with: dict[str, VolumeStats] | None,
                 case: PreprocessedCase) -> dict[str, np.ndarray]:
    """A prediction in both scales: mapped to the model scale with the bounds it was written with
    (its record's; the reference's for a folder without one), and in intensities on the
    reference's bounds: as stored, or, when it was written on other bounds (a [0, 1] `unit` output,
    a model's stats), mapped onto the reference's, as `--scale case` would have written it (zero
    outside the brain mask, like the reference)."""
    ref_stats = (case.dwi_stats, case.adc_stats)
    own = ref_stats if written_with is None else tuple(written_with[name] for name in CHANNELS)
    normalized = _normalize(stored, own)
    if own == ref_stats:
        return {"normalized": normalized, "original": stored}
    original = np.stack([st.low + (normalized[:, c] + 1) / 2 * (st.high - st.low) for c, st in enumerate(ref_stats)],
                        axis=1) * case.mask[:, None]
    return {"normalized": normalized, "original": original.astype(stored.dtype)}


def _original_reference(volumes, case: PreprocessedCase) -> np.ndarray:
    """The reference DWI/ADC at the usable slices, S x 2 x X x Y, zero outside the brain mask."""
    ref = np.stack([np.moveaxis(v[:, :, case.slice_index], -1, 0) for v in (volumes.dwi, volumes.adc)], axis=1)
    return ref * case.mask[:, None]


# --- metrics of one case ---------------------------------------------------------------------


def slice_metrics(pred, ref, mask, lesion, data_range, options: EvaluateOptions) -> dict[str, np.ndarray]:
    """Every metric per slice and channel (S x 2 arrays), plus "mse" and the pixel counts
    "n_region" and "n_lesion" (S arrays) that pooling over a volume needs."""
    device = torch.device(options.device)
    region = mask if options.region == "brain" else None
    parts: dict[str, list] = {k: [] for k in ("mse", "mae", "ssim", "ms_ssim", "lesion_mae")}
    for start in range(0, pred.shape[0], options.batch_size):
        s = slice(start, start + options.batch_size)
        p = torch.as_tensor(pred[s], device=device)
        r = torch.as_tensor(ref[s], device=device)
        m = None if region is None else torch.as_tensor(region[s], device=device)
        les = torch.as_tensor(lesion[s], device=device)
        rng = torch.as_tensor(data_range, device=device)
        parts["mse"].append(image.mse(p, r, m))
        parts["mae"].append(image.mae(p, r, m))
        parts["ssim"].append(image.ssim(p, r, m, data_range=rng))
        parts["ms_ssim"].append(image.ms_ssim(p, r, m, data_range=rng, weights=options.ms_ssim_weights))
        parts["lesion_mae"].append(image.lesion_mae(p, r, les))
    out = {k: torch.cat(v).cpu().double().numpy() for k, v in parts.items()}
    out["psnr"] = image.psnr_from_mse(torch.as_tensor(out["mse"]), torch.as_tensor(data_range, dtype=torch.float64)).numpy()
    h, w = pred.shape[-2:]
    out["n_region"] = mask.sum(axis=(1, 2)).astype(np.float64) if options.region == "brain" else np.full(len(pred), h * w, np.float64)
    out["n_lesion"] = lesion.sum(axis=(1, 2)).astype(np.float64)
    return out


def _pooled(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Per channel, the mean of per-slice means weighted by their pixel counts: the mean
    over all the volume's pixels. NaN where no pixel counts."""
    ok = (weights > 0)[:, None] & np.isfinite(values)
    total = np.where(ok, values * weights[:, None], 0.0).sum(axis=0)
    count = np.where(ok, weights[:, None], 0.0).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1e-300), np.nan)


def _nanmean(values: np.ndarray) -> np.ndarray:
    ok = ~np.isnan(values)
    return np.where(ok.any(axis=0), np.where(ok, values, 0).sum(axis=0) / np.maximum(ok.sum(axis=0), 1), np.nan)


def volume_metrics(per_slice: dict[str, np.ndarray], data_range) -> dict[str, np.ndarray]:
    """Per-volume values (length-2 arrays, one per channel) from the per-slice ones."""
    mse = _pooled(per_slice["mse"], per_slice["n_region"])
    with np.errstate(divide="ignore"):
        psnr = 10 * np.log10(np.asarray(data_range, np.float64).reshape(-1) ** 2 / mse)
    return {
        "mae": _pooled(per_slice["mae"], per_slice["n_region"]),
        "psnr": psnr,
        "ssim": _nanmean(per_slice["ssim"]),
        "ms_ssim": _nanmean(per_slice["ms_ssim"]),
        "lesion_mae": _pooled(per_slice["lesion_mae"], per_slice["n_lesion"]),
    }


# --- results ---------------------------------------------------------------------------------


@dataclass
class FigureSlice:
    """What a report figure shows of one slice: CTP frame, reference and each run's
    prediction in the normalized scale (2 x X x Y), brain and lesion masks (X x Y)."""

    case_id: str
    z: int
    frame: int
    ctp: np.ndarray
    reference: np.ndarray
    predictions: dict[str, np.ndarray]
    mask: np.ndarray
    lesion: np.ndarray

    @property
    def lesion_pixels(self) -> int:
        return int(self.lesion.sum())


@dataclass
class RunResult:
    """One prediction folder's metrics: rows per slice and per case (column names from
    `column`), and FID per channel (or why it is unavailable)."""

    label: str
    pred_dir: Path
    slice_rows: list[dict] = field(default_factory=list)
    case_rows: list[dict] = field(default_factory=list)
    fid: dict = field(default_factory=dict)


@dataclass
class Evaluation:
    settings: dict
    runs: list[RunResult]
    not_predicted: list[str]
    figures: list[FigureSlice]


def _statistics(values: list[float]) -> dict:
    v = np.asarray(values, np.float64)
    v = v[~np.isnan(v)]
    if v.size == 0:
        return {"mean": None, "std": None, "median": None, "n": 0}
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else 0.0,
            "median": float(np.median(v)), "n": int(v.size)}


def dataset_summary(run: RunResult) -> dict:
    """{scale: {channel: {metric: {mean, std, median, n (volumes), slice_mean, n_slices}}}}."""
    out: dict = {}
    for scale in SCALES:
        for channel in CHANNELS:
            for metric in METRICS:
                key = column(scale, channel, metric)
                entry = _statistics([r[key] for r in run.case_rows])
                by_slice = _statistics([r[key] for r in run.slice_rows])
                entry.update(slice_mean=by_slice["mean"], n_slices=by_slice["n"])
                out.setdefault(scale, {}).setdefault(channel, {})[metric] = entry
    return out


def differences(base: dict, other: dict) -> dict:
    """other - base for every dataset mean (and FID), same nesting as `dataset_summary`."""
    out: dict = {}
    for scale, channels in base.items():
        for channel, metrics in channels.items():
            for metric, entry in metrics.items():
                a, b = entry["mean"], other[scale][channel][metric]["mean"]
                diff = None if a is None or b is None else b - a
                better = None if diff is None or diff == 0 else (diff > 0) == HIGHER_IS_BETTER[metric]
                out.setdefault(scale, {}).setdefault(channel, {})[metric] = {"difference": diff, "improved": better}
    return out


# --- the evaluation loop ---------------------------------------------------------------------


def _peak_frame(ctp: np.ndarray, mask: np.ndarray) -> int:
    """The CTP frame of highest mean inside the brain (peak enhancement), F x X x Y."""
    inside = mask.sum()
    means = (ctp * mask).reshape(ctp.shape[0], -1).sum(axis=1) / max(inside, 1)
    return int(np.argmax(means))


class _FigurePicker:
    """Keeps the slices to draw: those asked for by (case, z), else the `count` cases with the
    largest lesion, each at its slice of largest lesion area (the middle slice without one)."""

    def __init__(self, count: int, requested: list[tuple[str, int]]):
        self.count = count
        self.requested = requested
        self.kept: list[FigureSlice] = []

    def wanted(self, case: PreprocessedCase) -> list[int]:
        """Positions (into the case's usable slices) to draw for this case."""
        if self.requested:
            chosen = [z for cid, z in self.requested if cid == case.case_id]
            bad = [z for z in chosen if z not in case.slice_index]
            if bad:
                raise ValueError(f"figure slice: case {case.case_id!r} has no evaluated slice {bad}; usable: {case.slice_index.tolist()}")
            return [int(np.flatnonzero(case.slice_index == z)[0]) for z in chosen]
        if self.count == 0:
            return []
        area = case.lesion.sum(axis=(1, 2))
        return [int(np.argmax(area)) if area.max() > 0 else len(area) // 2]

    def offer(self, fig: FigureSlice) -> None:
        self.kept.append(fig)
        if not self.requested:
            # Stable sort: ties keep case order.
            self.kept.sort(key=lambda f: -f.lesion_pixels)
            del self.kept[self.count :]


def _extractor_input(x: np.ndarray) -> torch.Tensor:
    """Normalized slices of one channel (S x X x Y) -> (S, 1, X, Y) in [0, 1]."""
    return torch.from_numpy((np.clip(x, -1, 1) + 1) / 2)[:, None].float()


def evaluate(
    ref_source: str | os.PathLike,
    pred_dirs: list[tuple[str, str | os.PathLike]],
    options: EvaluateOptions = EvaluateOptions(),
    *,
    layout: str = "auto",
    extractor: torch.nn.Module | None = None,
    fid_unavailable: str = "no FID weights file given",
    figure_cases: int = 4,
    figure_slices: list[tuple[str, int]] = (),
    progress: bool = True,
    exclude: tuple = (),
) -> Evaluation:
    """Evaluate one or more prediction folders, `[(label, folder), ...]`, against `ref_source`.

    The first folder decides the cases; every other must hold the same ones (a side-by-side
    comparison of different cases would mislead). `extractor` (from `load_extractor`) turns
    FID on; without one FID is reported as unavailable with `fid_unavailable` as the reason.
    `exclude`: folders inside a prediction folder that are not cases (the results folder).
    """
    if not pred_dirs:
        raise ValueError("pred_dirs: at least one prediction folder is needed")
    labels = [label for label, _ in pred_dirs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"labels: must differ, got {labels}")
    # DWI and ADC are required of the evaluated cases only (pair_cases): a reference case that was
    # not synthesized may lack them.
    ref_cases = find_cases(ref_source, layout=layout)
    pairs, not_predicted = pair_cases(pred_dirs[0][1], ref_cases, exclude=exclude)
    run_paths = [{case.case_id: paths for case, paths in pairs}]
    for label, folder in pred_dirs[1:]:
        other, _ = pair_cases(folder, ref_cases, exclude=exclude)
        other_ids = [c.case_id for c, _ in other]
        if other_ids != list(run_paths[0]):
            raise DataError(f"run {label!r} has cases {other_ids}, run {labels[0]!r} has {list(run_paths[0])}: "
                            "compared runs must cover the same cases", path=folder)
        run_paths.append(dict((c.case_id, p) for c, p in other))

    runs = [RunResult(label=label, pred_dir=Path(folder)) for label, folder in pred_dirs]
    feature_stats = None
    if extractor is not None:
        feature_stats = {name: {ch: FeatureStatistics() for ch in CHANNELS} for name in ["reference"] + labels}
    if figure_cases < 0:
        raise ValueError(f"figure_cases: must be >= 0, got {figure_cases}")
    unknown = sorted({cid for cid, _ in figure_slices} - set(run_paths[0]))
    if unknown:  # found before minutes of metrics, not silently drawn nowhere
        raise ValueError(f"figure slice: no evaluated case {unknown} (the cases with a prediction: "
                         f"{sorted(run_paths[0])[:10]}{' ...' if len(run_paths[0]) > 10 else ''})")
    picker = _FigurePicker(figure_cases, list(figure_slices))

    scales_found: dict[str, dict[str, int]] = {run.label: {} for run in runs}  # cases per scale of the records
    draws_found: dict[str, dict[int, int]] = {run.label: {} for run in runs}  # cases per number of draws measured
    for case_files, _ in tqdm(pairs, desc="evaluate", unit="case", disable=not progress):
        volumes = load_case(case_files)
        # (the metrics leave the CTP out: a reference CTP of other timing needs no word here)
        case = preprocess_case(volumes, options.preprocess, require_target=True, warn_resampled=False)
        _check_ms_ssim_fits(case, options.ms_ssim_scales)
        refs = {"normalized": case.target, "original": _original_reference(volumes, case)}
        ranges = {"normalized": np.array([2.0, 2.0]),
                  "original": np.array([s.high - s.low for s in (case.dwi_stats, case.adc_stats)])}
        figure_at = picker.wanted(case)
        if feature_stats is not None:
            for c, ch in enumerate(CHANNELS):
                feature_stats["reference"][ch].update(extract_features(extractor, _extractor_input(case.target[:, c])))
        predictions = {}
        for run, paths in zip(runs, run_paths):
            record = prediction_record(case.case_id, paths[case.case_id])
            scales_found[run.label][record.scale] = scales_found[run.label].get(record.scale, 0) + 1
            draws = [_predictions(stored, record.stats, case)
                     for stored in read_draws(case, run.pred_dir, record, options.samples)]
            draws_found[run.label][len(draws)] = draws_found[run.label].get(len(draws), 0) + 1
            predictions[run.label] = draws[0]["normalized"]
            _add_rows(run, case, draws, refs, ranges, options)
            if feature_stats is not None:
                for preds in draws:
                    for c, ch in enumerate(CHANNELS):
                        feature_stats[run.label][ch].update(
                            extract_features(extractor, _extractor_input(preds["normalized"][:, c])))
        for i in figure_at:
            frame = _peak_frame(case.ctp[i], case.mask[i])
            picker.offer(FigureSlice(
                case_id=case.case_id, z=int(case.slice_index[i]), frame=frame, ctp=case.ctp[i, frame],
                reference=case.target[i], predictions={k: v[i] for k, v in predictions.items()},
                mask=case.mask[i], lesion=case.lesion[i]))

    for run in runs:
        run.fid = _fid(feature_stats, run.label, fid_unavailable)
    settings = {
        "reference": str(ref_source),
        "runs": {label: str(folder) for label, folder in pred_dirs},
        "default_scale": DEFAULT_SCALE,
        "scales": {
            "normalized": "model scale [-1, 1]: reference preprocessed as for training, prediction mapped with the "
                          "clip bounds its synthesis.json records (the reference volume's where it has none); "
                          "data_range 2",
            "original": "stored intensities; reference zero outside the brain mask; data_range = the reference "
                        "volume's clip bounds (high - low) per channel; a prediction written on other bounds "
                        "(scale 'unit' or 'model') mapped onto the reference's",
        },
        "prediction_scales": scales_found,
        "samples": options.samples,
        "samples_meaning": ("a case's values are the means over its draws (synthesize --samples); FID takes every "
                            "draw's slices; figures show draw 0" if options.samples == "all" else "draw 0 of each case"),
        "draws_per_case": {label: {str(k): n for k, n in sorted(found.items())} for label, found in draws_found.items()},
        "region": options.region,
        "region_meaning": "whole slice" if options.region == "slice" else "brain mask only",
        "ms_ssim": {"window": image.WINDOW_SIZE, "sigma": image.WINDOW_SIGMA, "weights": list(options.ms_ssim_weights)},
        "volume_level": "MAE, lesion MAE, PSNR pooled over the volume's evaluated pixels; SSIM, MS-SSIM mean of slices",
        "slices": "the reference case's usable slices (DWI, ADC and CTP non-zero inside the brain mask)",
        "fid_scale": "normalized, per channel",
        "fid_features": None if extractor is None else getattr(extractor, "description", type(extractor).__name__),
        "device": options.device,
    }
    return Evaluation(settings=settings, runs=runs, not_predicted=not_predicted, figures=picker.kept)


def _check_ms_ssim_fits(case: PreprocessedCase, scales: int) -> None:
    """Slices too small for the MS-SSIM scales asked for: said in the option's terms (the metric's
    own error names its arguments), with the most scales that fit."""
    side = min(case.target.shape[-2:])
    if side < image._min_size(scales):
        fits = max((k for k in range(1, scales) if image._min_size(k) <= side), default=0)
        raise ValueError(f"ms_ssim_scales: {scales} scales need slices of at least {image._min_size(scales)} pixels a "
                         f"side; case {case.case_id!r} has {case.target.shape[-2]} x {case.target.shape[-1]}"
                         + (f" (at most {fits} scales fit: --ms-ssim-scales {fits})" if fits else ""))


def _add_rows(run: RunResult, case: PreprocessedCase, draws: list[dict], refs, ranges, options: EvaluateOptions
              ) -> None:
    """Append the case's per-slice and per-volume rows to the run: each value the mean over the
    draws (`_predictions` of each) of that draw's value."""
    n = len(case.slice_index)
    lesion_px = case.lesion.sum(axis=(1, 2))
    slice_rows = [{"case_id": case.case_id, "slice": int(z), "lesion_pixels": int(lp)}
                  for z, lp in zip(case.slice_index, lesion_px)]
    case_row = {"case_id": case.case_id, "n_slices": n, "lesion_voxels": int(lesion_px.sum()), "draws": len(draws)}
    for scale in SCALES:
        per_draw = [slice_metrics(preds[scale], refs[scale], case.mask, case.lesion, ranges[scale], options)
                    for preds in draws]
        per_slice = _mean_over_draws(per_draw)
        per_volume = _mean_over_draws([volume_metrics(m, ranges[scale]) for m in per_draw])
        for c, channel in enumerate(CHANNELS):
            for metric in METRICS:
                key = column(scale, channel, metric)
                for i in range(n):
                    slice_rows[i][key] = float(per_slice[metric][i, c])
                case_row[key] = float(per_volume[metric][c])
    run.slice_rows.extend(slice_rows)
    run.case_rows.append(case_row)


def _mean_over_draws(values: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Key by key, the mean of the draws' arrays (NaN where undefined stays NaN: a lesion MAE is
    undefined in every draw or in none)."""
    return {key: np.mean([v[key] for v in values], axis=0) for key in values[0]}


def _fid(feature_stats, label: str, unavailable: str) -> dict:
    if feature_stats is None:
        return {"available": False, "reason": unavailable}
    out = {"available": True}
    for ch in CHANNELS:
        ref, pred = feature_stats["reference"][ch], feature_stats[label][ch]
        if min(ref.count, pred.count) < 2:
            return {"available": False, "reason": f"FID needs at least 2 slices, got {pred.count}"}
        out[ch] = fid_from_statistics(ref, pred)
    out["n_slices"] = feature_stats[label][CHANNELS[0]].count
    return out
