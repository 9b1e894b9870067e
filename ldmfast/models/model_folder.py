"""Model folders as `save_pretrained` writes them: config.json (with the model's name under
"model") and model.safetensors, each written atomically; read back with errors that name the file."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ldmfast.data.atomic import atomic_path

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def write_model_folder(path: str | os.PathLike, tensors: dict[str, torch.Tensor], config: dict,
                       model_name: str) -> Path:
    """Write `tensors` (as contiguous CPU copies) and {"model": model_name, **config} into `path`."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path / WEIGHTS_NAME) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", "model": f"ldmfast.{model_name}"})
    with atomic_path(path / CONFIG_NAME) as tmp:
        tmp.write_text(json.dumps({"model": model_name, **config}, indent=1) + "\n")
    return path


def read_model_config(path: str | os.PathLike, model_name: str, *, unnamed_ok: bool = True) -> dict:
    """The config of a folder that `model_name.save_pretrained` wrote, without its "model" key.
    FileNotFoundError names a missing file; ValueError a folder of another model (or, with
    `unnamed_ok=False`, one whose config names none)."""
    path = Path(path)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path / name}: not found; expected a folder written by "
                                    f"{model_name}.save_pretrained")
    data = json.loads((path / CONFIG_NAME).read_text())
    kind = data.pop("model", model_name if unnamed_ok else None)
    if kind != model_name:
        raise ValueError(f"{path / CONFIG_NAME}: the folder of a {kind!r} model, expected a {model_name}")
    return data


def read_model_weights(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    return load_file(str(Path(path) / WEIGHTS_NAME), device=str(device))
