"""`ldmfast train posttrain`: starts from a cLDM folder, trains with the lesion-aware loss, keeps
the autoencoder frozen, stops early on its metric and resumes exactly."""
import json

import pytest
import torch

from ldmfast.cli import main
from ldmfast.models import VQGAN, ConditionalLDM, UNetConfig, VQGANConfig
from ldmfast.train import ConfigError, load_config
from ldmfast.train.distributed import DistInfo
from ldmfast.train.posttrain import PostTrainer
from ldmfast.train.posttrain_config import PostTrainConfig
from ldmfast.train.step_in_backward import StepInBackward

TINY_TOML = """
output_dir = "{out}"
init = "{init}"
seed = 3
device = "cpu"

[data]
root = "{root}"
size = [32, 32]
val_fraction = 0.34

[optim]
lr = 1e-3

[train]
batch_size = 4
steps = 4
log_every = 1
val_every = 2
ckpt_every = 0
preview_slices = 2
"""


@pytest.fixture(scope="module")
def init_dir(tmp_path_factory):
    torch.manual_seed(0)
    vqgan = VQGAN(VQGANConfig(base_channels=16, channel_mult=[1, 2, 2], num_res_blocks=1, norm_groups=8,
                              num_codes=32))
    unet = UNetConfig(in_channels=18, out_channels=3, base_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                      attention_levels=(1,), head_channels=16, norm_groups=8)
    path = tmp_path_factory.mktemp("cldm")
    ConditionalLDM(unet, autoencoder=vqgan).save_pretrained(path)
    return path


def write_config(tmp_path, phantom_root, init_dir, name="run"):
    path = tmp_path / f"{name}.toml"
    path.write_text(TINY_TOML.format(out=tmp_path / name, root=phantom_root, init=init_dir))
    return path


def records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_cli_post_trains_and_keeps_the_autoencoder(tmp_path, phantom_root, init_dir):
    config = write_config(tmp_path, phantom_root, init_dir)
    assert main(["train", "posttrain", "--config", str(config), "--quiet", "--set", "train.val_sample_steps=2"]) == 0
    run = tmp_path / "run"
    train = [r for r in records(run) if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert all(r["latent"] > 0 and r["image"] > 0 and r["lesion"] >= 0 for r in train)
    val = [r for r in records(run) if r["kind"] == "val"]
    assert all(v["latent_loss"] > 0 and v["lesion_mae"] is not None and v["x0_lesion_mae"] > 0 for v in val)
    before, after = ConditionalLDM.from_pretrained(init_dir), ConditionalLDM.from_pretrained(run / "ldm")
    for (name, a), b in zip(before.autoencoder.state_dict().items(), after.autoencoder.state_dict().values()):
        assert torch.equal(a, b), f"autoencoder {name} changed"
    changed = [k for k, v in before.denoiser_state_dict().items() if not torch.equal(v, after.denoiser_state_dict()[k])]
    assert changed, "the UNet and condition module are trained"


def test_early_stopping_exports_the_best_model_and_resumes(tmp_path, phantom_root, init_dir):
    path = write_config(tmp_path, phantom_root, init_dir)
    # lr so large the latent loss can only get worse after the first validation: stops at the 2nd.
    overrides = ["train.steps=12", "train.val_every=1", "train.early_stop_patience=2", "optim.lr=0.5",
                 "train.ckpt_every=1"]
    summary = PostTrainer(load_config(path, PostTrainConfig, overrides), progress=False).run()
    val = [r for r in records(tmp_path / "run") if r["kind"] == "val"]
    assert summary["stopped_early"] and summary["step"] < 12
    best = min(range(len(val)), key=lambda i: val[i]["latent_loss"])
    assert summary["best_step"] == val[best]["step"]
    resumed = PostTrainer(load_config(path, PostTrainConfig, overrides), progress=False)
    assert resumed.best == summary["best"] and resumed.best_step == summary["best_step"]


def test_a_rerun_of_an_early_stopped_run_trains_nothing_and_reports_the_best(tmp_path, phantom_root, init_dir,
                                                                              capsys):
    path = write_config(tmp_path, phantom_root, init_dir)
    overrides = ["train.steps=12", "train.val_every=1", "train.early_stop_patience=2", "optim.lr=0.5",
                 "train.ckpt_every=0"]
    summary = PostTrainer(load_config(path, PostTrainConfig, overrides), progress=False).run()
    assert summary["stopped_early"] and summary["step"] < 12
    run = tmp_path / "run"
    log, model = (run / "metrics.jsonl").read_text(), (run / "ldm" / "model.safetensors").read_bytes()
    args = ["train", "posttrain", "--config", str(path)] + [a for o in overrides for a in ("--set", o)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert (run / "metrics.jsonl").read_text() == log, "the stopped run trained on"
    assert (run / "ldm" / "model.safetensors").read_bytes() == model, "the best model was replaced"
    assert f"trained to step {summary['step']} (stopped early)" in out
    assert f"the model is the best: latent_loss {summary['best']:.4g} at step {summary['best_step']}" in out
    # More patience than ran out: the run goes on from where it stopped.
    patient = [o if not o.startswith("train.early_stop_patience") else "train.early_stop_patience=50"
               for o in overrides]
    assert PostTrainer(load_config(path, PostTrainConfig, patient), progress=False).run()["step"] == 12


def test_a_metric_that_is_never_finite_stops_and_exports_the_latest_model(tmp_path, phantom_root, init_dir,
                                                                         monkeypatch):
    validate = PostTrainer.validate
    monkeypatch.setattr(PostTrainer, "validate", lambda self: {**validate(self), "latent_loss": float("nan")})
    path = write_config(tmp_path, phantom_root, init_dir)
    trainer = PostTrainer(load_config(path, PostTrainConfig, ["train.steps=6", "train.val_every=1",
                                                               "train.early_stop_patience=2"]), progress=False)
    with pytest.warns(RuntimeWarning, match="never finite"):
        summary = trainer.run()
    assert summary["stopped_early"] and summary["step"] == 2 and summary["best"] is None
    exported = ConditionalLDM.from_pretrained(tmp_path / "run" / "ldm").denoiser_state_dict()
    for key, value in trainer.model.denoiser_state_dict().items():
        assert torch.equal(exported[key], value), key


def test_a_step_without_brain_pixels_is_logged_as_skipped(tmp_path, phantom_root, init_dir, monkeypatch):
    from ldmfast.train import posttrain
    real_loss, calls = posttrain.posttrain_loss, []

    def no_brain_in_the_first_batch(*args, **kwargs):
        args = list(args)
        if not calls:
            args[5] = torch.zeros_like(args[5])  # the brain mask
        calls.append(1)
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(posttrain, "posttrain_loss", no_brain_in_the_first_batch)
    path = write_config(tmp_path, phantom_root, init_dir)
    with pytest.warns(RuntimeWarning, match="brain"):
        PostTrainer(load_config(path, PostTrainConfig, ["train.steps=2", "train.val_every=0"]), progress=False).run()
    first, second = [r for r in records(tmp_path / "run") if r["kind"] == "train"]
    assert first["skipped"] == 1.0 and first["loss"] is None and first["lesion"] is None
    assert second["skipped"] == 0.0 and second["loss"] > 0


@pytest.fixture
def one_process_group():
    """A gloo group of this one process: the trainer's DDP code path (DistInfo says 2 processes;
    DDP and the all-reduces run over the one)."""
    import socket

    import torch.distributed as dist
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield DistInfo(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("ddp", [False, True], ids=["one-process", "ddp"])
def test_a_skipped_micro_batch_is_left_out_of_the_step_mean(tmp_path, phantom_root, init_dir, monkeypatch, ddp,
                                                            request):
    # grad_accum = 2, the first micro-batch without brain pixels: the step's loss (and gradient) is
    # the other one's, not half of it. Under DDP the skipped micro-batch runs a zero loss through the
    # model (to keep in step with the other processes), which must not count as measured.
    from ldmfast.train import posttrain
    dist_info = request.getfixturevalue("one_process_group") if ddp else None
    real_loss, totals, own_grads = posttrain.posttrain_loss, [], []
    path = write_config(tmp_path, phantom_root, init_dir)
    config = load_config(path, PostTrainConfig, ["train.steps=1", "train.val_every=0", "train.grad_accum=2",
                                                 "train.batch_size=2"])
    trainer = PostTrainer(config, progress=False, dist_info=dist_info)
    params = [p for p in trainer.model.parameters() if p.requires_grad]

    def no_brain_in_the_first_batch(*args, **kwargs):
        args = list(args)
        if not totals:
            args[5] = torch.zeros_like(args[5])  # the brain mask
        out = real_loss(*args, **kwargs)
        totals.append(None if out is None else out.total.item())
        if out is not None:  # the measured micro-batch's own gradient
            own_grads.extend(torch.autograd.grad(out.total, params, retain_graph=True, allow_unused=True))
        return out

    monkeypatch.setattr(posttrain, "posttrain_loss", no_brain_in_the_first_batch)
    stepped = []
    trainer.opt.step = lambda *a, _step=trainer.opt.step: stepped.append(
        [None if p.grad is None else p.grad.clone() for p in params]) or _step(*a)
    with pytest.warns(RuntimeWarning, match="brain"):
        trainer.run()
    (record,) = [r for r in records(tmp_path / "run") if r["kind"] == "train"]
    assert totals[0] is None
    if not ddp:  # (the stand-in group's logs are averaged over the 2 processes DistInfo names)
        assert record["skipped"] == 0.5 and record["loss"] == pytest.approx(totals[1], rel=1e-6)
    compared = [(g, own) for g, own in zip(stepped[0], own_grads) if own is not None and g is not None]
    assert compared
    for g, own in compared:
        torch.testing.assert_close(g, own, rtol=1e-5, atol=1e-7)


def test_init_folder_without_weights_and_a_missing_gpu_are_config_errors(tmp_path, phantom_root, init_dir):
    import shutil

    broken = tmp_path / "cldm"
    shutil.copytree(init_dir, broken)
    (broken / "model.safetensors").unlink()
    path = write_config(tmp_path, phantom_root, broken)
    with pytest.raises(ConfigError) as err:  # a FileNotFoundError traceback from the CLI before
        PostTrainer(load_config(path, PostTrainConfig, []), progress=False)
    assert err.value.key == "init" and "model.safetensors" in str(err.value)
    if not torch.cuda.is_available():
        from ldmfast.train.distributed import resolve_device
        with pytest.raises(ConfigError) as err:
            resolve_device("cuda")
        assert err.value.key == "device"


def test_decoder_checkpointing_may_be_switched_on_when_resuming(tmp_path, phantom_root, init_dir):
    path = write_config(tmp_path, phantom_root, init_dir)
    common = ["train.val_every=0", "train.ckpt_every=2"]
    PostTrainer(load_config(path, PostTrainConfig, [*common, "train.steps=2"]), progress=False).run()
    trainer = PostTrainer(load_config(path, PostTrainConfig, [*common, "posttrain.decoder_checkpoint=true"]),
                          progress=False)
    assert trainer.step == 2
    with pytest.raises(ConfigError) as err:  # a setting of the loss itself still refuses
        PostTrainer(load_config(path, PostTrainConfig, [*common, "posttrain.lambda_les=0.5"]), progress=False)
    assert err.value.key == "posttrain.lambda_les"


def test_bad_configs_are_refused_naming_the_key(tmp_path, phantom_root, init_dir):
    path = write_config(tmp_path, phantom_root, init_dir)
    for override, key in [("posttrain.image_loss=\"l3\"", "posttrain.image_loss"),
                          ("train.early_stop_metric=\"lesion_mae\"", "train.early_stop_metric"),
                          (f"init=\"{tmp_path}\"", "init"),
                          ("posttrain.min_snr_gamma=inf", "posttrain.min_snr_gamma")]:
        with pytest.raises(ConfigError) as err:
            load_config(path, PostTrainConfig, [override])
        assert err.value.key == key
    with pytest.raises(ConfigError) as err:
        load_config(path, PostTrainConfig, ["train.step_in_backward=true", "train.grad_accum=2"])
    assert err.value.key == "train.step_in_backward"
    # Under DDP (refused before any collective, so no process group is needed here).
    two_processes = DistInfo(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"))
    with pytest.raises(ConfigError) as err:
        PostTrainer(load_config(path, PostTrainConfig, ["train.step_in_backward=true"]), progress=False,
                    dist_info=two_processes)
    assert err.value.key == "train.step_in_backward"


def test_step_in_backward_trains_as_the_plain_step_and_resumes_into_it(tmp_path, phantom_root, init_dir):
    """Updates inside the backward (UNet checkpointed too) give the plain run's model; a checkpoint
    it wrote resumes a plain run, which ends where an uninterrupted plain run does."""
    path = write_config(tmp_path, phantom_root, init_dir)
    runs = {"plain": [], "inside": ["train.step_in_backward=true", "train.unet_checkpoint=true"]}
    models = {}
    for name, extra in runs.items():
        overrides = [f"output_dir=\"{tmp_path / name}\"", "train.val_every=0", "train.ckpt_every=2", *extra]
        trainer = PostTrainer(load_config(path, PostTrainConfig, overrides), progress=False)
        assert isinstance(trainer.opt, StepInBackward) == bool(extra)
        trainer.run()
        models[name] = ConditionalLDM.from_pretrained(tmp_path / name / "ldm").denoiser_state_dict()
    # Resume the "inside" run's step-2 checkpoint as a plain run.
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    for f in (tmp_path / "inside" / "checkpoints").glob("step-00000002.*"):
        (resumed / "checkpoints" / f.name).write_bytes(f.read_bytes())
    overrides = [f"output_dir=\"{resumed}\"", "train.val_every=0", "train.ckpt_every=2"]
    trainer = PostTrainer(load_config(path, PostTrainConfig, overrides), progress=False)
    assert trainer.step == 2
    trainer.run()
    models["resumed"] = ConditionalLDM.from_pretrained(resumed / "ldm").denoiser_state_dict()
    for name in ("inside", "resumed"):
        for key, value in models["plain"].items():
            torch.testing.assert_close(models[name][key], value, rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"{name} {key}: {m}")


def test_8bit_moments_train_alike_inside_the_backward_and_resume(tmp_path, phantom_root, init_dir):
    """optim.state_bits = 8: a run with updates inside the backward ends where the plain 8-bit run
    does (the same rounding streams); its checkpoint resumes an 8-bit run exactly, a float32 run's
    resumes as 8-bit, and an 8-bit one refuses a float32 run with the setting to change."""
    path = write_config(tmp_path, phantom_root, init_dir)
    common = ["train.val_every=0", "train.ckpt_every=2", "optim.state_bits=8"]
    models = {}
    for name, extra in {"plain8": [], "inside8": ["train.step_in_backward=true", "train.unet_checkpoint=true"]}.items():
        trainer = PostTrainer(load_config(path, PostTrainConfig, [f"output_dir=\"{tmp_path / name}\"", *common,
                                                                  *extra]), progress=False)
        trainer.run()
        assert any("m_codes" in s for s in trainer.opt.state_dict()["state"].values())
        models[name] = ConditionalLDM.from_pretrained(tmp_path / name / "ldm").denoiser_state_dict()
    for key, value in models["plain8"].items():
        torch.testing.assert_close(models["inside8"][key], value, rtol=1e-5, atol=1e-6, msg=lambda m: f"{key}: {m}")

    def resume(source, name, overrides):
        folder = tmp_path / name
        (folder / "checkpoints").mkdir(parents=True)
        for f in (tmp_path / source / "checkpoints").glob("step-00000002.*"):
            (folder / "checkpoints" / f.name).write_bytes(f.read_bytes())
        return PostTrainer(load_config(path, PostTrainConfig, [f"output_dir=\"{folder}\"", "train.val_every=0",
                                                               "train.ckpt_every=2", *overrides]), progress=False)

    trainer = resume("inside8", "resumed8", ["optim.state_bits=8"])
    trainer.run()
    resumed = ConditionalLDM.from_pretrained(tmp_path / "resumed8" / "ldm").denoiser_state_dict()
    for key, value in models["plain8"].items():
        torch.testing.assert_close(resumed[key], value, rtol=1e-5, atol=1e-6, msg=lambda m: f"{key}: {m}")
    with pytest.raises(ConfigError, match="state_bits = 8") as refused:  # a traceback from the CLI before
        resume("plain8", "refused", [])
    assert refused.value.key == "optim.state_bits"
    PostTrainer(load_config(path, PostTrainConfig, [f"output_dir=\"{tmp_path / 'plain32'}\"", "train.val_every=0",
                                                    "train.ckpt_every=2"]), progress=False).run()
    trainer = resume("plain32", "from32", ["optim.state_bits=8"])
    assert trainer.step == 2 and any("m_codes" in s for s in trainer.opt.state_dict()["state"].values())
    with pytest.raises(ConfigError) as err:
        load_config(path, PostTrainConfig, ["optim.state_bits=16"])
    assert err.value.key == "optim.state_bits"


def test_recast_weight_copies_trains_as_without(tmp_path, phantom_root, init_dir, monkeypatch):
    """train.recast_weight_copies under bfloat16 autocast (train.amp = "bf16", here on the CPU):
    the same model as without it, with the updates inside the backward too; and its hooks were
    in effect (weight copies were recast)."""
    from ldmfast.train import recast
    made = []
    original = recast._Recast.__init__

    def spy(self, *args):
        made.append(1)
        original(self, *args)

    monkeypatch.setattr(recast._Recast, "__init__", spy)
    path = write_config(tmp_path, phantom_root, init_dir)
    models = {}
    for name, extra in {"kept": [], "recast": ["train.recast_weight_copies=true"]}.items():
        overrides = [f"output_dir=\"{tmp_path / name}\"", "train.val_every=0", "train.amp=\"bf16\"",
                     "train.step_in_backward=true", *extra]
        PostTrainer(load_config(path, PostTrainConfig, overrides), progress=False).run()
        assert bool(made) == bool(extra)
        models[name] = ConditionalLDM.from_pretrained(tmp_path / name / "ldm").denoiser_state_dict()
    for key, value in models["kept"].items():
        assert torch.equal(models["recast"][key], value), key
