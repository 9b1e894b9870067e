"""Model folders as `save_pretrained` writes them: config.json (with the model's name under
"model") and model.safetensors, each written atomically; read back with errors that name the file."""
from __future__ import annotations

import hashlib
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


def model_files(model_dir: str | os.PathLike) -> list[list]:
    """The model folder's weight files as [name, bytes, digest of 16 evenly spaced 64 KiB pieces of
    the tensor data]: a model retrained in the same folder tells its outputs from the earlier
    model's (all its weights change), while exporting the same weights again (a finished training
    run resumed) does not (safetensors' JSON header is left out: its key order varies from one save
    to the next), and reading 1 MiB per file keeps this instant for multi-GB models."""
    root, piece, pieces = Path(model_dir), 1 << 16, 16
    out = []
    for path in sorted(root.rglob("*.safetensors")):
        size = path.stat().st_size
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            start = 8 + int.from_bytes(f.read(8), "little")  # the header's length, then the header
            span = max(size - start - piece, 0)
            for i in range(pieces):
                f.seek(start + span * i // (pieces - 1))
                digest.update(f.read(piece))
        out.append([str(path.relative_to(root)), size, digest.hexdigest()[:16]])
    return out


def folder_fingerprint(model_dir: str | os.PathLike) -> dict:
    """What identifies the model(s) in a folder wherever it lies: model_files, and a digest of each
    config.json below it (architecture and settings). Equal for a copy or a move of the folder."""
    root = Path(model_dir)
    configs = [[str(path.relative_to(root)), hashlib.sha256(path.read_bytes()).hexdigest()[:16]]
               for path in sorted(root.rglob(CONFIG_NAME))]
    return {"model_files": model_files(root), "configs": configs}
