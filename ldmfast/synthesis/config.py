"""The settings of `ldmfast synthesize`: one dataclass read from a TOML file and/or command-line
flags (flags win), checked before any case is read. Errors are ConfigError naming the key."""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ldmfast.data.layouts import LAYOUTS
from ldmfast.diffusion import SPACINGS
from ldmfast.train.config import ConfigError, from_dict, read_toml

#: How synthesized slices are mapped from the model's [-1, 1] back to intensities.
#: "case": the case's own DWI/ADC clip bounds (PAPER.md; needs DWI and ADC files);
#: "unit": the normalized [0, 1] scale; "auto": "case" where the case has DWI and ADC, else the
#: model folder's intensity_stats.json if it has one, else "unit".
SCALES = ("auto", "case", "unit")
DTYPES = ("auto", "float32", "bfloat16", "float16")
#: Optional file of a model folder: {"dwi": [low, high], "adc": [low, high]}, the intensity
#: range that "auto" maps cases without their own DWI/ADC to.
INTENSITY_STATS_NAME = "intensity_stats.json"


@dataclass
class SynthesisConfig:
    """Every key of a synthesis configuration file; a command-line flag of the same name
    (dashes for underscores) overrides it."""

    model: str = ""                 # model folder (ConditionalLDM.save_pretrained)
    input: str = ""                 # data folder (release or ISLES'24 layout) or CSV manifest
    output: str = ""                # output folder: <case>/{dwi,adc}.nii.gz
    layout: str = "auto"
    batch_size: int = 16            # slices per model call, taken across volumes
    steps: int = 50                 # DDIM steps
    eta: float = 0.0                # DDIM eta (0: deterministic given the seed)
    spacing: str = "uniform"        # DDIM timestep spacing
    samples: int = 1                # samples per case; sample k > 0 goes to dwi_s<k>.nii.gz
    seed: int = 0
    device: str = "auto"            # auto, cpu, cuda, cuda:N
    size: tuple[int, int] | None = None  # model slice size (H, W); default: each case's own
    scale: str = "auto"
    dtype: str = "auto"             # sampling precision; auto: bfloat16 on GPU when supported
    cuda_graph: bool | None = None  # None: on for GPU runs when the sampler supports it
    overwrite: bool = False         # redo cases whose outputs are already complete
    prefetch: int | None = None     # cases read ahead in a background thread; None: 2 on a GPU, 0 on
    #                                 the CPU (where the reader would compete with the model for cores)

    def check(self, prefix: str = "") -> None:
        for key in ("model", "input", "output"):
            if not getattr(self, key):
                raise ConfigError(key, f"required: give --{key} or `{key} = ...` in the configuration file")
        for key, choices in (("layout", LAYOUTS), ("spacing", SPACINGS), ("scale", SCALES), ("dtype", DTYPES)):
            if getattr(self, key) not in choices:
                raise ConfigError(key, f"must be one of {', '.join(choices)}, got {getattr(self, key)!r}")
        for key in ("batch_size", "steps", "samples"):
            if getattr(self, key) < 1:
                raise ConfigError(key, f"must be >= 1, got {getattr(self, key)}")
        if self.prefetch is not None and self.prefetch < 0:
            raise ConfigError("prefetch", f"must be >= 0, got {self.prefetch}")
        if not (math.isfinite(self.eta) and self.eta >= 0):
            raise ConfigError("eta", f"must be a finite number >= 0, got {self.eta}")
        if not 0 <= self.seed < 2**63:
            raise ConfigError("seed", f"must be in [0, 2^63), got {self.seed}")
        if self.size is not None and min(self.size) < 1:
            raise ConfigError("size", f"must be two positive integers, got {list(self.size)}")
        try:
            device = torch.device(self.device) if self.device != "auto" else None
        except RuntimeError:
            raise ConfigError("device", f"must be auto, cpu, cuda or cuda:N, got {self.device!r}") from None
        if device is not None and device.type not in ("cpu", "cuda"):
            raise ConfigError("device", f"must be auto, cpu, cuda or cuda:N, got {self.device!r}")


def load_synthesis_config(path: str | os.PathLike | None, overrides: dict) -> SynthesisConfig:
    """The configuration file at `path` (TOML; None: none), with `overrides` (command-line values;
    None entries are "not given") on top, converted and checked."""
    data = read_toml(path) if path is not None else {}
    data.update({k: v for k, v in overrides.items() if v is not None})
    return from_dict(SynthesisConfig, data)


def model_multiple(model_config: dict) -> int:
    """The factor a slice's height and width must be divisible by: the autoencoder's
    downsampling times the UNet's."""
    return 2 ** int(model_config["halvings"]) * 2 ** (len(model_config["unet"]["channel_mult"]) - 1)


def read_model_config(model_dir: str | os.PathLike) -> dict:
    """A model folder's config.json, refused (ConfigError on `model`) unless it is a ConditionalLDM's."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ConfigError("model", f"{path} not found; expected a folder written by ConditionalLDM.save_pretrained")
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError("model", f"{path}: cannot read: {err}") from None
    if data.get("model") != "ConditionalLDM":
        raise ConfigError("model", f"{path}: not a ConditionalLDM folder (model = {data.get('model')!r})")
    if not (Path(model_dir) / "autoencoder").is_dir():
        raise ConfigError("model", f"{model_dir}: has no autoencoder/ folder, which decoding needs")
    try:  # the entries synthesis reads before loading the model
        int(data["diffusion"]["num_train_steps"])
        model_multiple(data)
    except (KeyError, TypeError, ValueError) as err:
        problem = f"no entry {err.args[0]!r}" if isinstance(err, KeyError) else f"a bad entry: {err}"
        raise ConfigError("model", f"{path}: not a complete ConditionalLDM config ({problem})") from None
    return data


def check_against_model(config: SynthesisConfig, model_config: dict) -> None:
    """Settings that depend on the model: the number of DDIM steps and the slice size."""
    train_steps = int(model_config["diffusion"]["num_train_steps"])
    if config.steps > train_steps:
        raise ConfigError("steps", f"must be <= the model's {train_steps} training timesteps, got {config.steps}")
    multiple = model_multiple(model_config)
    if config.size is not None and any(s % multiple for s in config.size):
        raise ConfigError("size", f"height and width must be divisible by {multiple} for this model, "
                                  f"got {list(config.size)}")


def check_paths(config: SynthesisConfig) -> None:
    """The input exists, and the output is neither the input nor inside it (outputs named
    dwi.nii.gz in the input's case folders would replace the reference images)."""
    source, out = Path(config.input).resolve(), Path(config.output).resolve()
    if not source.exists():
        raise ConfigError("input", f"{config.input} not found")
    # A manifest names its files; a data folder's every subfolder is a case, so an output inside
    # it would be read as one. (Overlap with a manifest's files: check_output_overlap.)
    if source.is_dir() and (out == source or source in out.parents):
        raise ConfigError("output", f"{config.output} is (inside) the input folder {source}; choose another folder")
    if out.exists() and not out.is_dir():
        raise ConfigError("output", f"{config.output} exists and is not a folder")


def check_output_overlap(config: SynthesisConfig, cases) -> None:
    """No case's output folder may hold its input files (its dwi.nii.gz would be replaced)."""
    out = Path(config.output).resolve()
    for case in cases:
        folders = {p.resolve().parent for p in case.files().values()}
        if (out / case.case_id) in folders:
            raise ConfigError("output", f"{config.output}: case {case.case_id!r} would be written into the folder of "
                                        "its input files; choose another folder")


def read_intensity_stats(model_dir: str | os.PathLike) -> dict[str, tuple[float, float]] | None:
    """The model folder's intensity_stats.json as {"dwi": (low, high), "adc": (low, high)}, or None."""
    path = Path(model_dir) / INTENSITY_STATS_NAME
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        stats = {name: (float(data[name][0]), float(data[name][1])) for name in ("dwi", "adc")}
    except (OSError, ValueError, KeyError, TypeError, IndexError) as err:
        raise ConfigError("model", f"{path}: expected {{\"dwi\": [low, high], \"adc\": [low, high]}} ({err})") from None
    for name, (low, high) in stats.items():
        if not (math.isfinite(low) and math.isfinite(high) and high > low):
            raise ConfigError("model", f"{path}: {name} needs finite low < high, got {[low, high]}")
    return stats
