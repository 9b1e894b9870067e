"""The reusable training pieces: TOML config loading, checkpoints and RNG states, the resumable
sharded sampler, the metrics log and the preview PNG."""
import json
import random
import struct
import zlib
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

from ldmfast.train.checkpoint import (capture_rng_state, checkpoint_paths, latest_checkpoint, load_checkpoint,
                                      restore_rng_state, save_checkpoint)
from ldmfast.train.config import ConfigError, from_dict, load_config, set_dotted, to_dict
from ldmfast.train.distributed import ShardedSampler
from ldmfast.train.metrics_log import MetricsLog
from ldmfast.train.preview import reconstruction_grid, write_png_grey


# ---- config --------------------------------------------------------------------------------

@dataclass
class Inner:
    size: tuple[int, int] = (4, 4)
    name: str | None = None
    scale: float = 1.0

    def check(self, prefix):
        if self.scale <= 0:
            raise ConfigError(f"{prefix}.scale", "must be > 0")


@dataclass
class Outer:
    out: str
    steps: int = 10
    flags: list[bool] = field(default_factory=list)
    inner: Inner = field(default_factory=Inner)
    optional: Inner | None = None


def test_from_dict_builds_nested_dataclasses():
    cfg = from_dict(Outer, {"out": "x", "steps": 3, "inner": {"size": [2, 3], "scale": 2}, "optional": {}})
    assert cfg.inner == Inner(size=(2, 3), scale=2.0) and cfg.optional == Inner()
    assert to_dict(cfg)["inner"]["size"] == [2, 3]


@pytest.mark.parametrize("data, key, message", [
    ({"out": "x", "stepz": 3}, "stepz", "unknown key"),
    ({"out": "x", "inner": {"sise": [1, 2]}}, "inner.sise", "unknown key"),
    ({"out": "x", "steps": 2.5}, "steps", "integer"),
    ({"out": "x", "steps": True}, "steps", "integer"),
    ({"out": "x", "inner": {"size": [1, 2, 3]}}, "inner.size", "2 values"),
    ({"out": "x", "inner": {"size": [1, "a"]}}, "inner.size[1]", "integer"),
    ({"out": "x", "flags": [True, 1]}, "flags[1]", "true or false"),
    ({"out": "x", "inner": {"scale": -1}}, "inner.scale", "> 0"),
    ({"out": "x", "optional": {"scale": 0}}, "optional.scale", "> 0"),
    ({"out": "x", "inner": 3}, "inner", "table"),
    ({}, "out", "required"),
])
def test_bad_values_name_the_dotted_key(data, key, message):
    with pytest.raises(ConfigError, match=message) as info:
        from_dict(Outer, data)
    assert info.value.key == key


def test_load_config_with_overrides(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('out = "run"\n[inner]\nsize = [8, 8]\n')
    cfg = load_config(path, Outer, ["steps=7", "inner.name=hello", "inner.size=[2, 2]", "optional.scale=0.5"])
    assert (cfg.steps, cfg.inner.name, cfg.inner.size, cfg.optional.scale) == (7, "hello", (2, 2), 0.5)
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        set_dotted({}, "steps")
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.toml", Outer)
    (tmp_path / "bad.toml").write_text("out = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(tmp_path / "bad.toml", Outer)


# ---- checkpoints ----------------------------------------------------------------------------

def _trained(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, betas=(0.5, 0.9))
    for _ in range(3):
        model(torch.randn(5, 4)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def _continue(model, opt, steps=3):
    for _ in range(steps):
        x = torch.randn(5, 4)
        noise = np.random.rand() + random.random()
        (model(x).square().mean() * noise).backward()
        opt.step()
        opt.zero_grad()
    return [p.detach().clone() for p in model.parameters()]


def test_checkpoint_round_trip_continues_identically(tmp_path):
    model, opt = _trained()
    save_checkpoint(tmp_path, 3, modules={"m": model}, optimizers={"m": opt}, meta={"note": "hi"})
    expected = _continue(model, opt)

    other, other_opt = _trained(seed=1)  # different weights, states and RNG position
    torch.manual_seed(99)
    info = load_checkpoint(checkpoint_paths(tmp_path, 3)[1], modules={"m": other}, optimizers={"m": other_opt})
    assert info["step"] == 3 and info["meta"] == {"note": "hi"}
    assert other_opt.param_groups[0]["betas"] == (0.5, 0.9)
    for a, b in zip(expected, _continue(other, other_opt)):
        assert torch.equal(a, b)


def test_rng_states_round_trip():
    tensors, state = capture_rng_state()
    json.dumps(state)  # JSON-able
    first = (torch.rand(3), np.random.rand(3), random.random())
    restore_rng_state(tensors, state)
    second = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(first[0], second[0]) and np.array_equal(first[1], second[1]) and first[2] == second[2]


def test_latest_checkpoint_needs_both_files_and_pruning_keeps_the_newest(tmp_path):
    model, opt = _trained()
    assert latest_checkpoint(tmp_path / "none") is None
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, modules={"m": model}, optimizers={"m": opt}, meta={}, keep_last=2)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["step-00000002.json", "step-00000002.safetensors",
                     "step-00000003.json", "step-00000003.safetensors"]
    checkpoint_paths(tmp_path, 3)[0].unlink()  # tensors lost: the pair is incomplete
    assert latest_checkpoint(tmp_path) == checkpoint_paths(tmp_path, 2)[1]


# ---- sampler ---------------------------------------------------------------------------------

def test_sharded_sampler_splits_and_resumes():
    shards = [list(ShardedSampler(11, rank=r, world_size=3, seed=4)) for r in range(3)]
    assert all(len(s) == 3 for s in shards)
    flat = sum(shards, [])
    assert len(set(flat)) == 9 and set(flat) <= set(range(11))
    sampler = ShardedSampler(11, seed=4)
    sampler.set_epoch(2)
    full = list(sampler)
    sampler.set_epoch(2, start=5)
    assert list(sampler) == full[5:] and len(sampler) == 6
    sampler.set_epoch(3)
    assert list(sampler) != full and sorted(sampler) == sorted(full)


# ---- metrics log and preview --------------------------------------------------------------

def test_metrics_log_drops_lines_past_the_resumed_step(tmp_path):
    log = MetricsLog(tmp_path / "m.jsonl")
    for step in (1, 2, 3):
        log.write(step, "train", {"loss": 0.5, "bad": float("nan")})
    log.close()
    with open(tmp_path / "m.jsonl", "a") as f:
        f.write('{"step": 4, "kind": "tr')  # cut short by a kill
    log = MetricsLog(tmp_path / "m.jsonl", resume_step=2)
    log.write(3, "train", {"loss": 0.25})
    log.close()
    records = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in records] == [(1, 0.5), (2, 0.5), (3, 0.25)]
    assert records[0]["bad"] is None


def test_preview_png_is_a_valid_greyscale_png(tmp_path):
    targets = np.random.rand(2, 2, 6, 5).astype(np.float32) * 2 - 1
    lesions = np.zeros((2, 1, 6, 5), dtype=np.float32)
    lesions[0, 0, 1:5, 1:4] = 1
    grid = reconstruction_grid(targets, targets, lesions)
    assert grid.shape == (2 * 6 + 2, 5 * 5 + 4 * 2)
    path = write_png_grey(grid, tmp_path / "p.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert (height, width) == grid.shape
    idat_len = struct.unpack(">I", data[33:37])[0]
    raw = zlib.decompress(data[41:41 + idat_len])
    assert len(raw) == height * (width + 1)


def test_lr_schedule():
    from ldmfast.train.lr_schedule import lr_at
    assert lr_at(0, 1e-3, 100) == lr_at(99, 1e-3, 100) == 1e-3
    assert lr_at(0, 1.0, 100, "cosine", warmup_steps=10) == 0.1
    assert lr_at(9, 1.0, 100, "cosine", warmup_steps=10) == 1.0
    assert lr_at(10, 1.0, 100, "cosine", warmup_steps=10) == 1.0
    assert abs(lr_at(55, 1.0, 100, "cosine", warmup_steps=10) - 0.5) < 1e-12
    assert abs(lr_at(100, 1.0, 100, "cosine", min_lr_ratio=0.1) - 0.1) < 1e-12
    with pytest.raises(ValueError, match="schedule"):
        lr_at(5, 1.0, 100, "linear")


def test_optimizers_fuse_on_cuda_only_and_a_resume_keeps_its_own_implementation(tmp_path):
    from ldmfast.train import optim
    model = torch.nn.Linear(4, 3)
    assert optim.adamw(model.parameters()).param_groups[0]["fused"] is None  # CPU: torch's default
    fused = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)  # as a GPU run saves it
    model(torch.randn(5, 4)).sum().backward()
    fused.step()
    save_checkpoint(tmp_path, 1, modules={"m": model}, optimizers={"m": fused}, meta={})
    plain = optim.adamw(model.parameters(), lr=1e-3)
    load_checkpoint(checkpoint_paths(tmp_path, 1)[1], modules={"m": model}, optimizers={"m": plain})
    assert plain.param_groups[0]["fused"] is None and plain.param_groups[0]["lr"] == 1e-2
    assert torch.equal(plain.state[model.weight]["exp_avg"], fused.state[model.weight]["exp_avg"])


def test_training_autocast_keeps_no_weight_cache():
    """The trainers' autocast casts each weight where it is used, keeping no 16-bit copy of every
    weight through the forward (with UNet checkpointing that copy was the largest part of a
    post-training step's memory), and casts as asked."""
    from types import SimpleNamespace

    from ldmfast.train.stage import StageTrainer
    trainer = SimpleNamespace(device=torch.device("cpu"), amp_dtype=torch.bfloat16)
    with StageTrainer._autocast(trainer):
        assert torch.is_autocast_enabled("cpu") and not torch.is_autocast_cache_enabled()
        assert torch.nn.functional.linear(torch.ones(2, 3), torch.ones(4, 3)).dtype == torch.bfloat16
