"""Training checkpoints: safetensors for every tensor, JSON for everything else, both written
atomically, enough to continue a run bit-identically (models, optimizers, step, RNG states).

A checkpoint is the pair `step-NNNNNNNN.safetensors` + `step-NNNNNNNN.json` in a folder. The JSON
is written last and marks the pair complete: a run killed while writing leaves at most a stray
safetensors file, and `latest_checkpoint` still finds the previous complete pair.
"""
from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ldmfast.data.atomic import atomic_path

from .adamw8bit import AdamW8bit
from .config import ConfigError
from .optim import IMPLEMENTATION_KEYS

_NAME = re.compile(r"^step-(\d{8})\.json$")


def save_safetensors_atomic(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                            metadata: dict[str, str] | None = None) -> Path:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return Path(path)


def write_json_atomic(obj, path: str | os.PathLike) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1) + "\n")
    return Path(path)


# ---- RNG states -------------------------------------------------------------------------------

def capture_rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    """torch (CPU and every CUDA device), numpy and python RNG states as (tensors, JSON)."""
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = state
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss = random.getstate()
    return tensors, {"numpy": [kind, keys.tolist(), pos, has_gauss, cached],
                     "python": [version, list(py_state), gauss]}


def restore_rng_state(tensors: dict[str, torch.Tensor], state: dict) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("rng.cuda.")),
                                       key=lambda k: int(k.rsplit(".", 1)[1]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[:torch.cuda.device_count()])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state), gauss))


# ---- optimizers ------------------------------------------------------------------------------

def _optimizer_state(name: str, optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensor entries of the optimizer state under `optim.<name>.<param>.<key>`; the rest as JSON."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, entries in sd["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{name}.{index}.{key}"] = value
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _takes_8bit_state(optimizer) -> bool:
    parts = getattr(optimizer, "optimizers", [optimizer])  # (StepInBackward's, one per parameter)
    return all(isinstance(opt, AdamW8bit) for opt in parts)


def _load_optimizer_state(name: str, optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                          meta: dict) -> None:
    state: dict[int, dict] = {}
    prefix = f"optim.{name}."
    for full, value in tensors.items():
        if full.startswith(prefix):
            index, key = full[len(prefix):].split(".", 1)
            state.setdefault(int(index), {})[key] = value
    for index, entries in meta["scalars"].items():
        state.setdefault(int(index), {}).update(entries)
    if any("m_codes" in entries for entries in state.values()) and not _takes_8bit_state(optimizer):
        raise ConfigError("optim.state_bits", f"the checkpoint holds 8-bit AdamW moments (optimizer {name!r}); "
                                              "resume it with optim.state_bits = 8")
    # JSON turned tuples (Adam's betas) into lists; the optimizer expects what it was given.
    groups = [{k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in g.items()}
              for g in meta["param_groups"]]
    for group, own in zip(groups, optimizer.param_groups):
        group.update({k: own[k] for k in IMPLEMENTATION_KEYS if k in own})
    optimizer.load_state_dict({"state": state, "param_groups": groups})


# ---- checkpoints -----------------------------------------------------------------------------

def checkpoint_paths(folder: str | os.PathLike, step: int) -> tuple[Path, Path]:
    folder = Path(folder)
    return folder / f"step-{step:08d}.safetensors", folder / f"step-{step:08d}.json"


def latest_checkpoint(folder: str | os.PathLike) -> Path | None:
    """The JSON file of the newest complete checkpoint in `folder`, or None."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    steps = sorted(int(m.group(1)) for p in folder.iterdir() if (m := _NAME.match(p.name)))
    for step in reversed(steps):
        tensors_path, json_path = checkpoint_paths(folder, step)
        if tensors_path.is_file():
            return json_path
    return None


def save_checkpoint(folder: str | os.PathLike, step: int, *, modules: dict[str, nn.Module],
                    optimizers: dict[str, torch.optim.Optimizer], meta: dict, keep_last: int = 2) -> Path:
    """Write the checkpoint of `step` and delete all but the newest `keep_last` ones."""
    tensors_path, json_path = checkpoint_paths(folder, step)
    tensors, info = {}, {"step": step, "meta": meta, "optimizers": {}}
    for name, module in modules.items():
        tensors.update({f"module.{name}.{k}": v for k, v in module.state_dict().items()})
    for name, optimizer in optimizers.items():
        opt_tensors, info["optimizers"][name] = _optimizer_state(name, optimizer)
        tensors.update(opt_tensors)
    rng_tensors, info["rng"] = capture_rng_state()
    tensors.update(rng_tensors)
    save_safetensors_atomic(tensors, tensors_path)
    write_json_atomic(info, json_path)
    _prune(Path(folder), keep_last)
    return json_path


def _prune(folder: Path, keep_last: int) -> None:
    steps = sorted(int(m.group(1)) for p in folder.iterdir() if (m := _NAME.match(p.name)))
    for step in steps[:-keep_last] if keep_last > 0 else []:
        tensors_path, json_path = checkpoint_paths(folder, step)
        json_path.unlink(missing_ok=True)  # first: the pair stops counting as complete
        tensors_path.unlink(missing_ok=True)


def load_checkpoint(json_path: str | os.PathLike, *, modules: dict[str, nn.Module],
                    optimizers: dict[str, torch.optim.Optimizer], restore_rng: bool = True) -> dict:
    """Load a checkpoint into `modules` and `optimizers` (and the RNGs); return its JSON dict
    (`step`, `meta`)."""
    json_path = Path(json_path)
    info = json.loads(json_path.read_text())
    tensors = load_file(str(json_path.with_suffix(".safetensors")))
    for name, module in modules.items():
        prefix = f"module.{name}."
        module.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
    for name, optimizer in optimizers.items():
        _load_optimizer_state(name, optimizer, tensors, info["optimizers"][name])
    if restore_rng:
        restore_rng_state(tensors, info["rng"])
    return info
