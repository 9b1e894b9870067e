"""`ldmfast train ldm`: the run folder, exact resume, EMA, the latent cache, DDP under torchrun,
configuration errors naming the key, and the loss going down on phantom data."""
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

from ldmfast.cli import main
from ldmfast.models import VQGAN, ConditionalLDM, VQGANConfig
from ldmfast.train import ConfigError, latest_checkpoint, load_config
from ldmfast.train.ldm import LDMTrainer
from ldmfast.train.ldm_config import LDMTrainConfig

TINY_TOML = """
output_dir = "{out}"
autoencoder = "{ae}"
seed = 3
device = "cpu"

[data]
root = "{root}"
size = [32, 32]
val_fraction = 0.34

[unet]
base_channels = 16
channel_mult = [1, 2]
num_res_blocks = 1
attention_levels = [1]
head_channels = 16
norm_groups = 8

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


def save_autoencoder(path, seed):
    """A small untrained VQGAN folder whose weights depend on `seed`."""
    torch.manual_seed(seed)
    VQGAN(VQGANConfig(base_channels=16, channel_mult=[1, 2, 2], num_res_blocks=1, norm_groups=8,
                      num_codes=32)).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def autoencoder_dir(tmp_path_factory):
    return save_autoencoder(tmp_path_factory.mktemp("vqgan"), 0)


def write_config(tmp_path, phantom_root, autoencoder_dir, name="run", extra=""):
    path = tmp_path / f"{name}.toml"
    path.write_text(TINY_TOML.format(out=tmp_path / name, root=phantom_root, ae=autoencoder_dir) + extra)
    return path


def records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_cli_run_writes_a_loadable_model(tmp_path, phantom_root, autoencoder_dir, capsys):
    config = write_config(tmp_path, phantom_root, autoencoder_dir)
    assert main(["train", "ldm", "--config", str(config), "--quiet", "--set", "train.val_sample_steps=2",
                 "--set", "train.ema_decay=0.9"]) == 0
    run = tmp_path / "run"
    logs = records(run)
    assert [r["step"] for r in logs if r["kind"] == "train"] == [1, 2, 3, 4]
    val = [r for r in logs if r["kind"] == "val"]
    assert [r["step"] for r in val] == [2, 4]
    assert all(v["latent_loss"] > 0 and v["mae"] > 0 and v["slices"] > 0 for v in val)
    assert (run / "samples" / "step-00000004.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(list((run / "cache").glob("latents-*.safetensors"))) == 1
    model = ConditionalLDM.from_pretrained(run / "ldm")
    assert model.unet.config.in_channels == 3 + 15 and model.autoencoder is not None
    images = model.generate(torch.randn(2, 15, 32, 32), [0, 1], steps=2)
    assert images.shape == (2, 2, 32, 32) and torch.isfinite(images).all()


def test_exported_model_holds_the_ema_weights(tmp_path, phantom_root, autoencoder_dir):
    config = load_config(write_config(tmp_path, phantom_root, autoencoder_dir), LDMTrainConfig,
                         ["train.ema_decay=0.5", "train.steps=3"])
    trainer = LDMTrainer(config, progress=False)
    trainer.run()
    exported = ConditionalLDM.from_pretrained(tmp_path / "run" / "ldm")
    live = dict(trainer.model.named_parameters())
    for name, value in exported.denoiser_state_dict().items():
        if name in trainer.ema.names:
            torch.testing.assert_close(value, getattr(trainer.ema, name.replace(".", "__")))
    moved = [n for n in trainer.ema.names if not torch.equal(exported.state_dict()[n], live[n].detach())]
    assert moved, "with decay 0.5 over 3 steps, the average differs from the live weights"


def _state(trainer):
    out = {k: v.clone() for k, v in trainer.model.denoiser_state_dict().items()}
    for index, entries in trainer.opt.state_dict()["state"].items():
        out.update({f"opt.{index}.{k}": v.clone() for k, v in entries.items()})
    if trainer.ema is not None:
        out.update({f"ema.{k}": v.clone() for k, v in trainer.ema.state_dict().items()})
    return out


def test_resume_continues_bit_identically(tmp_path, phantom_root, autoencoder_dir):
    straight_cfg = load_config(write_config(tmp_path, phantom_root, autoencoder_dir, "straight"), LDMTrainConfig,
                               ["train.ema_decay=0.9"])
    straight = LDMTrainer(straight_cfg, progress=False)
    straight.run()
    halves = write_config(tmp_path, phantom_root, autoencoder_dir, "halves")
    LDMTrainer(load_config(halves, LDMTrainConfig, ["train.ema_decay=0.9", "train.steps=2",
                                                    "train.ckpt_every=2"]), progress=False).run()
    resumed = LDMTrainer(load_config(halves, LDMTrainConfig, ["train.ema_decay=0.9"]), resume=True, progress=False)
    assert resumed.step == 2
    resumed.run()
    a, b = _state(straight), _state(resumed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    val = lambda run: [r["latent_loss"] for r in records(run) if r["kind"] == "val"]  # noqa: E731
    assert val(tmp_path / "straight") == val(tmp_path / "halves")


def test_a_run_that_finds_its_latents_cached_trains_as_one_that_encodes_them(tmp_path, phantom_root,
                                                                             autoencoder_dir):
    # (Encoding once drew from the global RNG, so the noise of a resumed demo stage differed.)
    import shutil

    trainers = []
    for name in ("encodes", "finds"):
        if name == "finds":  # the first run's latents, where the second run looks for them
            shutil.copytree(tmp_path / "encodes" / "cache", tmp_path / "finds" / "cache", dirs_exist_ok=True)
        trainers.append(LDMTrainer(load_config(write_config(tmp_path, phantom_root, autoencoder_dir, name),
                                               LDMTrainConfig, ["train.steps=2"]), progress=False))
        trainers[-1].run()
    a, b = (_state(t) for t in trainers)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_loss_goes_down_on_phantom_data(tmp_path, phantom_root, autoencoder_dir):
    config = load_config(write_config(tmp_path, phantom_root, autoencoder_dir), LDMTrainConfig,
                         ["train.steps=30", "train.grad_accum=1", "train.val_every=0", "train.log_every=5",
                          "optim.lr=2e-3"])
    LDMTrainer(config, progress=False).run()
    losses = [r["loss"] for r in records(tmp_path / "run") if r["kind"] == "train"]
    assert sum(losses[-2:]) / 2 < 0.7 * losses[0], losses


@pytest.mark.parametrize("override, key", [
    ("unet.channel_mult=[1, 0]", "unet.base_channels"),
    ("unet.norm_groups=5", "unet.norm_groups"),
    ("diffusion.parameterization=\"score\"", "diffusion.parameterization"),
    ("train.ema_decay=1.5", "train.ema_decay"),
    ("optim.weight_decay=-1", "optim.weight_decay"),
    ("autoencoder=\"/nonexistent\"", "autoencoder"),
    ("unet.norm_groups=0", "unet.norm_groups"),
    ("unet.head_channels=0", "unet.head_channels"),
    ("unet.num_res_blocks=-1", "unet.num_res_blocks"),
    ("unet.dropout=2.0", "unet.dropout"),
    ("unet.dropout=nan", "unet.dropout"),
    ("optim.lr=nan", "optim.lr"),
    ("optim.lr=inf", "optim.lr"),
    ("optim.weight_decay=inf", "optim.weight_decay"),
    ("train.ema_decay=nan", "train.ema_decay"),
])
def test_bad_configs_are_refused_naming_the_key(tmp_path, phantom_root, autoencoder_dir, override, key):
    with pytest.raises(ConfigError) as err:
        load_config(write_config(tmp_path, phantom_root, autoencoder_dir), LDMTrainConfig, [override])
    assert err.value.key == key


def test_a_slice_size_the_autoencoder_cannot_halve_is_refused(tmp_path, phantom_root, autoencoder_dir, capsys):
    config = write_config(tmp_path, phantom_root, autoencoder_dir)
    assert main(["train", "ldm", "--config", str(config), "--quiet", "--set", "data.size=[30, 32]"]) == 2
    assert "data.size" in capsys.readouterr().err


def test_resume_refuses_a_different_unet(tmp_path, phantom_root, autoencoder_dir):
    path = write_config(tmp_path, phantom_root, autoencoder_dir)
    LDMTrainer(load_config(path, LDMTrainConfig, ["train.steps=1", "train.val_every=0"]), progress=False).run()
    with pytest.raises(ConfigError, match="unet.base_channels"):
        LDMTrainer(load_config(path, LDMTrainConfig, ["unet.base_channels=32"]), progress=False)


def test_resume_takes_a_moved_autoencoder_and_refuses_another(tmp_path, phantom_root, autoencoder_dir):
    """A run tree moved to another disk or machine resumes with its autoencoder at the new path
    (the checkpoint keeps the folder's fingerprint); another autoencoder is refused, at another path
    or replacing the one at the same path."""
    moved = tmp_path / "moved_vqgan"
    shutil.copytree(autoencoder_dir, moved)
    path = write_config(tmp_path, phantom_root, moved)
    LDMTrainer(load_config(path, LDMTrainConfig, ["train.steps=1", "train.val_every=0"]), progress=False).run()
    shutil.move(str(moved), tmp_path / "elsewhere")
    again = write_config(tmp_path, phantom_root, tmp_path / "elsewhere")
    resumed = LDMTrainer(load_config(again, LDMTrainConfig, ["train.steps=2", "train.val_every=0"]), resume=True,
                         progress=False)
    assert resumed.step == 1
    resumed.run()
    other = save_autoencoder(tmp_path / "other_vqgan", 1)
    with pytest.raises(ConfigError, match="autoencoder: .*another model"):
        LDMTrainer(load_config(write_config(tmp_path, phantom_root, other), LDMTrainConfig), progress=False)
    shutil.rmtree(tmp_path / "elsewhere")
    shutil.copytree(other, tmp_path / "elsewhere")
    again = write_config(tmp_path, phantom_root, tmp_path / "elsewhere")
    with pytest.raises(ConfigError, match="now holds another model"):
        LDMTrainer(load_config(again, LDMTrainConfig), progress=False)


def test_a_head_dim_beyond_the_attention_kernel_is_refused(tmp_path, phantom_root, autoencoder_dir):
    overrides = ["unet.base_channels=1024", "unet.channel_mult=[1]", "unet.attention_levels=[0]",
                 "unet.head_channels=1024"]
    with pytest.raises(ConfigError, match="head dim") as err:
        load_config(write_config(tmp_path, phantom_root, autoencoder_dir), LDMTrainConfig, overrides)
    assert err.value.key == "unet.head_channels"


def test_sampled_validation_needs_slices(tmp_path, phantom_root, autoencoder_dir):
    from ldmfast.train.val_metrics import ImageErrorSums
    path = write_config(tmp_path, phantom_root, autoencoder_dir)
    with pytest.raises(ConfigError) as err:
        load_config(path, LDMTrainConfig, ["train.val_sample_steps=2", "train.val_sample_slices=0"])
    assert err.value.key == "train.val_sample_slices"
    assert load_config(path, LDMTrainConfig, ["train.val_sample_slices=0"]).train.val_sample_steps == 0
    # No slice measured: no number to stop early on, rather than a perfect 0.
    metrics = ImageErrorSums(torch.device("cpu")).reduce()
    assert metrics["slices"] == 0 and all(math.isnan(metrics[k]) for k in ("mae", "psnr", "lesion_mae"))


def test_resume_takes_the_configured_optimizer_and_refuses_switching_ema(tmp_path, phantom_root, autoencoder_dir):
    path = write_config(tmp_path, phantom_root, autoencoder_dir)
    LDMTrainer(load_config(path, LDMTrainConfig, ["train.steps=1", "train.val_every=0", "train.ema_decay=0.9"]),
               progress=False).run()
    changed = ["train.ema_decay=0.99", "optim.weight_decay=0.05", "optim.betas=[0.8, 0.99]"]
    resumed = LDMTrainer(load_config(path, LDMTrainConfig, changed), progress=False)
    assert resumed.step == 1 and resumed.ema.decay == 0.99
    assert all(g["weight_decay"] == 0.05 and g["betas"] == (0.8, 0.99) for g in resumed.opt.param_groups)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["optim"]["weight_decay"] == 0.05
    # EMA on or off is what the checkpoint holds: switching it is refused, naming the key.
    with pytest.raises(ConfigError, match="EMA off") as err:
        LDMTrainer(load_config(path, LDMTrainConfig, ["train.ema_decay=0"]), progress=False)
    assert err.value.key == "train.ema_decay"


def test_example_configs_load(autoencoder_dir):
    from ldmfast.train.config import from_dict, read_toml
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    demo = from_dict(LDMTrainConfig, {**read_toml(os.path.join(repo, "ldmfast", "configs", "ldm_demo.toml")),
                                      "autoencoder": str(autoencoder_dir)})
    assert demo.data.phantom is not None and demo.train.val_sample_steps > 0
    release = from_dict(LDMTrainConfig, {**read_toml(os.path.join(repo, "configs", "ldm_release.toml")),
                                         "autoencoder": str(autoencoder_dir), "data": {"phantom": {}}})
    assert release.unet.channel_mult == (1, 4, 8) and release.unet.base_channels == 224
    assert release.optim.lr is None and release.optim.base_lr == 2e-6 and release.train.batch_size == 48


@pytest.mark.slow
def test_two_processes_under_torchrun(tmp_path, phantom_root, autoencoder_dir):
    config = write_config(tmp_path, phantom_root, autoencoder_dir)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    result = subprocess.run(torchrun + ["-m", "ldmfast", "train", "ldm", "--config", str(config), "--quiet",
                                        "--set", "train.batch_size=2"],
                            capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "run"
    assert [r["step"] for r in records(run) if r["kind"] == "train"] == [1, 2, 3, 4]
    info = json.loads(latest_checkpoint(run / "checkpoints").read_text())
    assert info["meta"]["world_size"] == 2 and info["step"] == 4
