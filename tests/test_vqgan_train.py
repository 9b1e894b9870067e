"""`ldmfast train vqgan`: configs refused before training, bit-identical resume on the CPU, the
run folder's files, and two processes under torchrun (gloo)."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from ldmfast.cli import main
from ldmfast.models import VQGAN
from ldmfast.train import ConfigError, VQGANTrainConfig, VQGANTrainer, from_dict, latest_checkpoint, load_config
from ldmfast.train.checkpoint import checkpoint_paths
from ldmfast.train.config import read_toml

TINY_TOML = """
output_dir = "{out}"
seed = 3
device = "cpu"

[data]
root = "{root}"
size = [32, 32]
val_fraction = 0.34
augment = {{ max_translation = 4.0 }}

[model]
base_channels = 16
channel_mult = [1, 2]
num_res_blocks = 1
norm_groups = 8
num_codes = 32
dead_code_threshold = 0.5

[loss]
disc_start = 2
disc_channels = 8
disc_layers = 2

[optim]
lr = 1e-3

[train]
batch_size = 4
grad_accum = 2
steps = 4
log_every = 1
val_every = 2
ckpt_every = 0
preview_slices = 2
"""


def write_config(tmp_path, phantom_root, name="run", extra=""):
    path = tmp_path / f"{name}.toml"
    path.write_text(TINY_TOML.format(out=tmp_path / name, root=phantom_root) + extra)
    return path


def state_of(trainer):
    """Every tensor that the next step depends on: parameters, buffers, optimizer states."""
    out = {f"vqgan.{k}": v.clone() for k, v in trainer.model.state_dict().items()}
    out.update({f"disc.{k}": v.clone() for k, v in trainer.disc.state_dict().items()})
    for name, opt in (("opt_g", trainer.opt_g), ("opt_d", trainer.opt_d)):
        for index, entries in opt.state_dict()["state"].items():
            out.update({f"{name}.{index}.{k}": v.clone() for k, v in entries.items()})
    return out


def test_resume_continues_bit_identically(tmp_path, phantom_root):
    """4 steps straight vs 2 steps, a fresh process state, then 2 more from the checkpoint: the
    GAN switches on at step 2, so the resumed half runs the discriminator and adaptive weight."""
    straight_cfg = load_config(write_config(tmp_path, phantom_root, "straight"), VQGANTrainConfig)
    straight = VQGANTrainer(straight_cfg, progress=False)
    straight.run()
    straight_rng = torch.get_rng_state()

    halves_cfg = load_config(write_config(tmp_path, phantom_root, "halves"), VQGANTrainConfig,
                             ["train.steps=2"])
    VQGANTrainer(halves_cfg, progress=False).run()
    torch.manual_seed(12345)  # whatever happened in between must not matter
    halves_cfg.train.steps = 4
    resumed = VQGANTrainer(halves_cfg, resume=True, progress=False)
    assert resumed.step == 2
    resumed.run()
    assert torch.equal(torch.get_rng_state(), straight_rng)

    a, b = state_of(straight), state_of(resumed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    logs = [json.loads(line) for line in (tmp_path / "halves" / "metrics.jsonl").read_text().splitlines()]
    straight_logs = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs] == [r["step"] for r in straight_logs]
    for r, s in zip(logs, straight_logs):
        assert r.get("rec_loss") == s.get("rec_loss") and r.get("psnr") == s.get("psnr")


def test_cli_run_writes_the_run_folder(tmp_path, phantom_root, capsys):
    config = write_config(tmp_path, phantom_root)
    assert main(["train", "vqgan", "--config", str(config), "--quiet", "--set", "train.ckpt_every=2"]) == 0
    run = tmp_path / "run"
    assert json.loads((run / "config.json").read_text())["model"]["base_channels"] == 16
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    val = [r for r in records if r["kind"] == "val"]
    assert [r["step"] for r in train] == [1, 2, 3, 4] and [r["step"] for r in val] == [2, 4]
    assert "d_loss" not in train[1] and "d_loss" in train[2] and train[2]["d_weight"] >= 0
    assert all(v["psnr"] > 0 and v["slices"] > 0 and v["lesion_mae"] is not None for v in val)
    assert (run / "samples" / "step-00000004.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert latest_checkpoint(run / "checkpoints") == checkpoint_paths(run / "checkpoints", 4)[1]
    model = VQGAN.from_pretrained(run / "vqgan")
    assert model.config.num_codes == 32
    # A finished run asked to go on to the same step does nothing; --no-resume refuses it.
    assert main(["train", "vqgan", "--config", str(config), "--quiet"]) == 0
    assert main(["train", "vqgan", "--config", str(config), "--quiet", "--no-resume"]) == 2
    assert "already holds checkpoints" in capsys.readouterr().err


def test_a_killed_checkpoint_write_falls_back_to_the_previous_one(tmp_path, phantom_root):
    cfg = load_config(write_config(tmp_path, phantom_root), VQGANTrainConfig,
                      ["train.steps=2", "train.ckpt_every=1", "train.val_every=0", "loss.disc_start=100"])
    VQGANTrainer(cfg, progress=False).run()
    folder = tmp_path / "run" / "checkpoints"
    # What a kill during step 3's checkpoint leaves: its tensors, no JSON, and a temporary file.
    shutil.copy(checkpoint_paths(folder, 2)[0], checkpoint_paths(folder, 3)[0])
    (folder / ".tmp-123-abcd-step-00000003.json").write_text("{")
    assert latest_checkpoint(folder) == checkpoint_paths(folder, 2)[1]
    cfg.train.steps = 3
    trainer = VQGANTrainer(cfg, progress=False)
    assert trainer.step == 2
    trainer.run()
    assert latest_checkpoint(folder) == checkpoint_paths(folder, 3)[1]
    assert not checkpoint_paths(folder, 1)[1].exists()  # keep_checkpoints = 2


def test_resume_refuses_a_different_model_and_takes_a_new_learning_rate(tmp_path, phantom_root):
    path = write_config(tmp_path, phantom_root)
    cfg = load_config(path, VQGANTrainConfig, ["train.steps=1", "train.val_every=0"])
    VQGANTrainer(cfg, progress=False).run()
    lowered = VQGANTrainer(load_config(path, VQGANTrainConfig, ["optim.lr=2e-4"]), progress=False)
    assert lowered.step == 1
    assert all(g["lr"] == 2e-4 for opt in (lowered.opt_g, lowered.opt_d) for g in opt.param_groups)
    with pytest.raises(ConfigError) as info:
        VQGANTrainer(load_config(path, VQGANTrainConfig, ["model.num_codes=64"]), progress=False)
    assert info.value.key == "model.num_codes"
    # The discriminator's shape is in the checkpoint too.
    for override, key in [("loss.disc_channels=16", "loss.disc_channels"), ("loss.disc_layers=3", "loss.disc_layers")]:
        with pytest.raises(ConfigError, match="shapes") as info:
            VQGANTrainer(load_config(path, VQGANTrainConfig, [override]), progress=False)
        assert info.value.key == key


def test_resume_applies_the_configured_betas(tmp_path, phantom_root):
    path = write_config(tmp_path, phantom_root)
    VQGANTrainer(load_config(path, VQGANTrainConfig, ["train.steps=1", "train.val_every=0"]), progress=False).run()
    resumed = VQGANTrainer(load_config(path, VQGANTrainConfig, ["optim.betas=[0.8, 0.95]"]), progress=False)
    assert resumed.step == 1
    assert all(g["betas"] == (0.8, 0.95) for opt in (resumed.opt_g, resumed.opt_d) for g in opt.param_groups)


def _exported_matches_checkpoint(run, step):
    from safetensors.torch import load_file
    checkpoint = load_file(str(checkpoint_paths(run / "checkpoints", step)[0]))
    model = load_file(str(run / "vqgan" / "model.safetensors"))
    return all(torch.equal(v, checkpoint[f"module.vqgan.{k}"]) for k, v in model.items())


def test_a_run_killed_in_its_last_export_exports_again_when_rerun(tmp_path, phantom_root, monkeypatch):
    path = write_config(tmp_path, phantom_root)
    overrides = ["train.steps=2", "train.ckpt_every=1", "train.val_every=0", "loss.disc_start=100"]
    export = VQGANTrainer.export

    def killed_at_step_2(self):
        if self.step == 2:
            raise KeyboardInterrupt
        export(self)

    monkeypatch.setattr(VQGANTrainer, "export", killed_at_step_2)
    with pytest.raises(KeyboardInterrupt):
        VQGANTrainer(load_config(path, VQGANTrainConfig, overrides), progress=False).run()
    monkeypatch.setattr(VQGANTrainer, "export", export)
    run = tmp_path / "run"
    # No checkpoint claims step 2 while its model folder is unwritten: the rerun trains it again.
    assert latest_checkpoint(run / "checkpoints") == checkpoint_paths(run / "checkpoints", 1)[1]
    assert VQGANTrainer(load_config(path, VQGANTrainConfig, overrides), progress=False).run()["step"] == 2
    assert _exported_matches_checkpoint(run, 2)
    # A finished run's model folder that is stale (as an older version left it) is exported again.
    shutil.copy(run / "vqgan" / "model.safetensors", tmp_path / "step2.safetensors")
    (run / "vqgan" / "model.safetensors").unlink()
    summary = VQGANTrainer(load_config(path, VQGANTrainConfig, overrides), progress=False).run()
    assert summary["step"] == 2 and _exported_matches_checkpoint(run, 2)


def test_sec_per_step_leaves_out_validation_and_checkpoints(tmp_path, phantom_root, monkeypatch):
    """A fake clock: each step takes 1 s, each validation 100 s, each checkpoint 1000 s."""
    from types import SimpleNamespace

    from ldmfast.train import stage
    now = [0.0]
    monkeypatch.setattr(stage, "time", SimpleNamespace(perf_counter=lambda: now[0]))
    cfg = load_config(write_config(tmp_path, phantom_root), VQGANTrainConfig,
                      ["train.log_every=2", "train.val_every=1", "train.ckpt_every=1", "loss.disc_start=100"])
    trainer = VQGANTrainer(cfg, progress=False)

    def taking(seconds, method):
        def timed(*args):
            now[0] += seconds
            return method(*args)
        return timed

    trainer.train_step = taking(1.0, trainer.train_step)
    trainer.validate = taking(100.0, trainer.validate)
    trainer.save = taking(1000.0, trainer.save)
    trainer.run()
    train = [r for r in (json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
             if r["kind"] == "train"]
    assert [r["step"] for r in train] == [2, 4]
    assert all(r["sec_per_step"] == 1.0 and r["samples_per_sec"] == 8.0 for r in train), train


@pytest.mark.parametrize("override, key", [
    ("model.base_width=64", "model.base_width"),
    ("train.batchsize=3", "train.batchsize"),
    ("data.size=[31, 32]", "data.size"),
    ("model.channel_mult=[1, 2, 4, 8, 8, 8, 8]", "data.size"),
    ("model.norm_groups=12", "model.norm_groups"),
    ("model.in_channels=3", "model.in_channels"),
    ("model.attn_resolutions=[8]", "model.attn_resolutions"),
    ("loss.perceptual_weight=0.1", "loss.perceptual_weights"),
    ("train.amp='fp8'", "train.amp"),
    ("train.steps=0", "train.steps"),
    ("optim.betas=[0.5]", "optim.betas"),
    ("optim.schedule='linear'", "optim.schedule"),
    ("optim.min_lr_ratio=2.0", "optim.min_lr_ratio"),
    ("data.val_fraction=1.5", "data.val_fraction"),
    ("data.root='/nonexistent/folder'", "data.root"),
    ("data.phantom={cases=4}", "data.root"),
    ("data.layout='bids'", "data.layout"),
    ("data.cache_dir='{file}'", "data.cache_dir"),          # a file where a folder must be
    ("data.cache_dir='{file}/cache'", "data.cache_dir"),    # a folder under a file
    ("seed='zero'", "seed"),
    ("loss.codebook_weight=nan", "loss.codebook_weight"),
    ("loss.disc_weight=inf", "loss.disc_weight"),
    ("optim.lr=nan", "optim.lr"),
    ("optim.lr=inf", "optim.lr"),
    ("optim.base_lr=inf", "optim.base_lr"),
    ("data.augment.max_translation=inf", "data.augment.max_translation"),
    ("model.beta=inf", "model.beta"),
    ("model.dead_code_threshold=inf", "model.dead_code_threshold"),
])
def test_bad_configs_are_refused_before_training_naming_the_key(tmp_path, phantom_root, override, key):
    (tmp_path / "a_file").write_text("")
    override = override.replace("{file}", str(tmp_path / "a_file"))
    with pytest.raises(ConfigError) as info:
        load_config(write_config(tmp_path, phantom_root), VQGANTrainConfig, [override])
    assert info.value.key == key
    assert not (tmp_path / "run").exists()  # nothing was started


def test_the_cli_names_the_bad_key(tmp_path, phantom_root, capsys):
    config = write_config(tmp_path, phantom_root, extra="\n[extra]\nx = 1\n")
    assert main(["train", "vqgan", "--config", str(config)]) == 2
    assert "extra: unknown key" in capsys.readouterr().err


def test_a_batch_larger_than_the_data_is_refused(tmp_path, phantom_root):
    cfg = load_config(write_config(tmp_path, phantom_root), VQGANTrainConfig, ["train.batch_size=500"])
    with pytest.raises(ConfigError) as info:
        VQGANTrainer(cfg, progress=False)
    assert info.value.key == "train.batch_size"


def test_example_configs_load():
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    demo = load_config(os.path.join(repo, "ldmfast", "configs", "vqgan_demo.toml"), VQGANTrainConfig)
    assert demo.data.phantom is not None and demo.data.size == (64, 64)
    release = from_dict(VQGANTrainConfig, {**read_toml(os.path.join(repo, "configs", "vqgan_release.toml")),
                                           "data": {"phantom": {}, "size": [192, 224]}})
    assert release.model.num_codes == 8192 and release.loss.disc_start == 30000
    assert release.optim.lr is None and release.optim.betas == (0.5, 0.9)


def test_two_processes_under_torchrun(tmp_path, phantom_root):
    """DDP on gloo: both processes train in step, rank 0 alone writes the run folder."""
    config = write_config(tmp_path, phantom_root, extra="")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    result = subprocess.run(torchrun + ["-m", "ldmfast", "train", "vqgan", "--config", str(config), "--quiet",
                                        "--set", "train.batch_size=2"],
                            capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4]
    val = [r for r in records if r["kind"] == "val"]
    assert val[-1]["slices"] > 0
    info = json.loads(latest_checkpoint(run / "checkpoints").read_text())
    assert info["meta"]["world_size"] == 2 and info["step"] == 4
