"""Training: config files, hold-out splits, warm starts that keep a model's function, and `idfzip train`
end to end (train, resume, use the model at once)."""

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import photo, roundtrip
from PIL import Image

from idfzip.cli import cli
from idfzip.errors import IdfzipError
from idfzip.flows import HierarchicalIDF, IDFConfig
from idfzip.train import GREY_CHANNEL, TrainConfig, load_config, load_images, split_holdout, warm_start
from idfzip.zoo import load, save_model

TINY = {"levels": 2, "prior_hidden": 8, "mixtures": 2, "channel_ar": True}


def write_config(path, model=None, **train):
    t = {"crop": 16, "batch": 2, "steps": 4, "ema": 0.9, "val_every": 2, "val_images": 1, "warmup": 2, **train}
    path.write_text(json.dumps({"model": model or TINY, "train": t}))
    return path


def test_load_config_and_its_errors(tmp_path):
    m, t = load_config(write_config(tmp_path / "c.json", optimizer="adamax"))
    assert m == IDFConfig(**TINY) and t.optimizer == "adamax" and t.crop == 16
    for bad in ({"model": {"levels": 2, "nope": 1}}, {"train": {"lr": -1}}, {"extra": {}}, {"model": {"context": "x"}}):
        (tmp_path / "bad.json").write_text(json.dumps(bad))
        with pytest.raises(ValueError):
            load_config(tmp_path / "bad.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="JSON"):
        load_config(tmp_path / "bad.json")


def test_split_holdout_spread_covers_the_whole_set():
    items = list(range(100))
    train, val = split_holdout(items, 10, "spread")
    assert len(val) == 10 and val[0] == 0 and val[-1] == 99 and len(train) == 90
    assert not set(train) & set(val)
    assert split_holdout(items, 10, "last") == (items[:90], items[90:])


def test_load_images_from_folder_zip_and_file(tmp_path):
    for i in range(2):
        Image.fromarray(photo(20, 12, seed=i)).save(tmp_path / f"{i}.png")
    with zipfile.ZipFile(tmp_path / "z.zip", "w") as zf:
        zf.write(tmp_path / "0.png", "sub/a.png")
        zf.writestr("notes.txt", "not an image")
    ims = load_images([tmp_path, tmp_path / "z.zip", tmp_path / "1.png"])
    assert len(ims) == 4 and all(im.shape == (12, 20, 3) for im in ims)
    assert np.array_equal(ims[0], ims[2])


def test_warm_start_into_a_checkerboard_model_keeps_the_function(tmp_path):
    torch.manual_seed(0)
    old = HierarchicalIDF(IDFConfig(**TINY))
    with torch.no_grad():
        for p in old.parameters():
            p.add_(0.05 * torch.randn_like(p))
    save_model(old, tmp_path / "old.safetensors", "old")
    new = HierarchicalIDF(IDFConfig(**TINY, context="checkerboard"))
    assert warm_start(new, tmp_path / "old.safetensors") == len(old.state_dict())
    x = torch.from_numpy(photo(32, 32)).permute(2, 0, 1)[None].float()
    with torch.no_grad():
        assert float(new(x)) == pytest.approx(float(old(x)), rel=1e-6)


def test_warm_start_into_a_deeper_wider_model_keeps_the_function(tmp_path):
    torch.manual_seed(1)
    cfg = {**TINY, "context": "checkerboard"}
    old = HierarchicalIDF(IDFConfig(**cfg))
    with torch.no_grad():
        for p in old.parameters():
            p.add_(0.05 * torch.randn_like(p))
    save_model(old, tmp_path / "old.safetensors", "old")
    new = HierarchicalIDF(IDFConfig(**{**cfg, "prior_layers": 4, "prior_hidden": 12}))
    assert warm_start(new, tmp_path / "old.safetensors") == len(old.state_dict())
    assert len(new.priors[0][0].convs) == 5 and new.priors[0][0].convs[2].weight.shape == (12, 12, 3, 3)
    x = torch.from_numpy(photo(32, 32)).permute(2, 0, 1)[None].float()
    with torch.no_grad():
        assert float(new(x)) == pytest.approx(float(old(x)), rel=1e-6)
    # the exact (coding) path gives the very same parameters
    ctx = torch.randint(-40, 40, (1, 3 * 2, 8, 8)).double()
    zj = torch.randint(-9, 9, (1, 3, 8, 8)).double()
    for group in (0, 1):
        assert torch.equal(new.prior_raw(0, 1, ctx, zj, group), old.prior_raw(0, 1, ctx, zj, group))


def test_train_command_resume_and_use(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for i in range(4):
        Image.fromarray(photo(40, 36, seed=i)).save(data / f"{i}.png")
    cfg = write_config(tmp_path / "c.json", {**TINY, "context": "checkerboard"})
    out = tmp_path / "mine.safetensors"
    runner = CliRunner()
    r = runner.invoke(cli, ["train", str(data), "--config", str(cfg), "--out", str(out)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "4 training images" not in r.output and "3 training images" in r.output
    model = load(str(out))
    assert model.name == "mine" and model.flow.config.context == "checkerboard"
    roundtrip(Image.fromarray(photo(70, 66)), model)  # usable at once
    # an existing output is not overwritten by a new run; --resume continues the old one
    with pytest.raises(IdfzipError, match="exists"):
        runner.invoke(cli, ["train", str(data), "--config", str(cfg), "--out", str(out)], catch_exceptions=False)
    args = ["train", str(data), "--config", str(cfg), "--out", str(out), "--resume", "--steps", "6"]
    r = runner.invoke(cli, args, catch_exceptions=False)
    assert r.exit_code == 0 and "resumed at step 4" in r.output, r.output
    assert torch.load(str(out) + ".ckpt", weights_only=True)["step"] == 6


def test_warm_start_of_a_grey_model_takes_the_luma(tmp_path):
    """A 1-channel model started from a 3-channel one with the colour transform gets the weights of its luma
    (channel GREY_CHANNEL of (V, Y, U)): the top's mixture, the coupling filters from and to it, and the prior
    networks' inputs (the kept and earlier slots' luma, the slot's luma anchors, the anchor mask) and outputs."""
    cfg, K, Y = {**TINY, "context": "checkerboard"}, TINY["mixtures"], GREY_CHANNEL
    torch.manual_seed(0)
    old = HierarchicalIDF(IDFConfig(**cfg))
    with torch.no_grad():
        for p in old.parameters():
            p.normal_()
    save_model(old, tmp_path / "old.safetensors", "old")
    new = HierarchicalIDF(IDFConfig(**{**cfg, "channels": 1, "color": "none", "channel_ar": False}))
    weights = [k for k in new.state_dict() if not k.startswith("perms.") and not k.endswith(".act_exp")]
    assert warm_start(new, tmp_path / "old.safetensors") == len(weights)  # the permutations are its own
    assert torch.equal(new.top, old.top.view(3, 3 * K)[Y])
    for a, b in zip(new.couplings[1][0].nets, old.couplings[1][0].nets):
        assert torch.equal(a.linear.weight, b.linear.weight[Y : Y + 1, Y::3]) and a.linear.bias == b.linear.bias[Y]
    outs = slice(Y * 3 * K, (Y + 1) * 3 * K)
    for j, (a, b) in enumerate(zip(new.priors[1], old.priors[1])):
        ins = [g * 3 + Y for g in range(1 + j)] + [(1 + j) * 3 + Y, (2 + j) * 3]
        assert torch.equal(a.linear.weight, b.linear.weight[outs][:, ins])
        assert torch.equal(a.convs[0].weight, b.convs[0].weight[:, ins])
        assert torch.equal(a.convs[1].weight, b.convs[1].weight)
        assert torch.equal(a.convs[-1].weight, b.convs[-1].weight[outs])
        assert torch.equal(a.convs[-1].bias, b.convs[-1].bias[outs])
    with pytest.raises(ValueError, match="cannot start"):
        warm_start(HierarchicalIDF(IDFConfig(**{**cfg, "channels": 2, "color": "none"})), tmp_path / "old.safetensors")


def test_train_a_grey_model(tmp_path):
    """A 1-channel config trains on the images as L, and its model codes L images at once."""
    for i in range(3):
        Image.fromarray(photo(40, 36, seed=i)).save(tmp_path / f"{i}.png")
    ims = load_images([tmp_path], channels=1)
    assert ims[0].shape == (36, 40, 1) and np.array_equal(ims[0][:, :, 0], Image.open(tmp_path / "0.png").convert("L"))
    grey = {**TINY, "channels": 1, "color": "none", "channel_ar": False}
    cfg = write_config(tmp_path / "c.json", grey)
    out = tmp_path / "g.safetensors"
    r = CliRunner().invoke(cli, ["train", str(tmp_path), "--config", str(cfg), "--out", str(out)])
    assert r.exit_code == 0, r.output
    model = load(str(out))
    assert model.flow.config.channels == 1 and model.flow.integer
    roundtrip(Image.fromarray(photo(70, 66)).convert("L"), model)


def test_train_command_errors(tmp_path):
    Image.fromarray(photo(40, 36)).save(tmp_path / "a.png")
    cfg = write_config(tmp_path / "c.json")
    runner = CliRunner()
    base = ["train", str(tmp_path / "a.png"), "--config", str(cfg)]
    with pytest.raises(IdfzipError, match="checkpoint"):
        runner.invoke(cli, [*base, "--out", str(tmp_path / "m.safetensors"), "--resume"], catch_exceptions=False)
    with pytest.raises(IdfzipError, match="more than 1 images"):
        runner.invoke(cli, [*base, "--out", str(tmp_path / "m.safetensors")], catch_exceptions=False)
    r = runner.invoke(cli, [*base, "--out", str(tmp_path / "m.pt")])
    assert r.exit_code != 0 and not (tmp_path / "m.pt").exists()
    assert TrainConfig().optimizer == "adam"


def test_torchrun_two_processes_match_one(tmp_path):
    """`idfzip train` under torchrun (2 CPU processes, gloo, 2 crops each) takes the steps of one process on
    the same global batch of 4: the exported weights agree to float rounding, and they did move."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    data = tmp_path / "data"
    data.mkdir()
    for i in range(4):
        Image.fromarray(photo(40, 36, seed=i)).save(data / f"{i}.png")
    cfg = write_config(tmp_path / "c.json", batch=4, steps=3, val_every=3, ema=0.0, lr=1e-2, threads=1)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    outs = {}
    for procs in (1, 2):
        out = tmp_path / f"m{procs}.safetensors"
        train = ["-m", "idfzip.cli", "train", str(data), "--config", str(cfg), "--out", str(out)]
        if procs == 1:
            cmd = [sys.executable, *train]
        else:
            run = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
            cmd = [sys.executable, *run, *train]
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, check=False)
        assert r.returncode == 0, r.stderr[-3000:]
        assert ("data parallel over 2 processes" in r.stderr) == (procs == 2), r.stderr[-3000:]
        outs[procs] = load_file(str(out))
    init = HierarchicalIDF(IDFConfig.from_dict(TINY)).state_dict()
    moved = max(float((v - init[k]).abs().max()) for k, v in outs[1].items() if v.is_floating_point())
    apart = max(float((v - outs[2][k]).abs().max()) for k, v in outs[1].items() if v.is_floating_point())
    assert moved > 1e-2 and apart < 1e-3 * moved  # Adam turns float noise in a near-zero gradient into steps


def test_amp_training_exports_a_float32_calibrated_model(tmp_path):
    """amp (bfloat16 autocast of the priors' hidden layers) trains; the export is float32, calibrated, codes."""
    data = tmp_path / "data"
    data.mkdir()
    for i in range(3):
        Image.fromarray(photo(40, 36, seed=i)).save(data / f"{i}.png")
    cfg = write_config(tmp_path / "c.json", amp=True, steps=2)
    out = tmp_path / "amp.safetensors"
    r = CliRunner().invoke(cli, ["train", str(data), "--config", str(cfg), "--out", str(out)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    model = load(str(out))
    assert all(v.dtype != torch.bfloat16 for v in model.flow.state_dict().values())
    assert model.flow.integer and not any(getattr(m, "amp", False) for m in model.flow.modules())
    roundtrip(Image.fromarray(photo(70, 66)), model)


@pytest.mark.parametrize(
    "path", sorted((Path(__file__).parent.parent / "scripts" / "configs").glob("*.json")), ids=lambda p: p.name
)
def test_shipped_recipes_parse_and_build(path):
    """Every config under scripts/configs (the recipes the docs point training runs at) parses and builds a model
    that the integer mode's width limit allows, so a GPU slot is not lost on a recipe that cannot start."""
    config, _ = load_config(path)
    HierarchicalIDF(config)


def test_zero_config_training_fine_tunes_the_shipped_model_and_reports_what_it_saves(tmp_path, monkeypatch):
    """No --config: the shipped natural model is fine-tuned (its architecture), a tenth of the files (at least
    one) is held out and named, and the end report codes the held-out files with both models; the model is
    then found by hash once installed."""
    monkeypatch.setenv("IDFZIP_MODELS", str(tmp_path / "store"))
    data = tmp_path / "lab"
    data.mkdir()
    for i in range(5):
        Image.fromarray(photo(48, 40, seed=i)).save(data / f"t{i}.png")
    out = tmp_path / "lab.safetensors"
    runner = CliRunner()
    r = runner.invoke(cli, ["train", str(data), "--out", str(out), "--steps", "2"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "4 training images, 1 validation images (held out: t0.png)" in r.output
    assert "step 0 validation" in r.output and "(the start)" in r.output
    report = r.output[r.output.index("What it saves") :]
    assert "held-out file (t0.png)" in report and "lab (new)" in report and "natural (before)" in report
    assert "every file exact" in report and ("smaller than natural" in report or "LARGER than natural" in report)
    model = load(str(out))
    natural = load("natural")
    assert model.flow.config == natural.flow.config and model.sha256 != natural.sha256
    assert runner.invoke(cli, ["models", "add", str(out), "-q"]).exit_code == 0
    im = Image.fromarray(photo(64, 64, seed=9))
    (tmp_path / "x.png").unlink(missing_ok=True)
    im.save(tmp_path / "x.png")
    assert runner.invoke(cli, ["compress", "--model", "lab", "-q", str(tmp_path / "x.png")]).exit_code == 0
    r = runner.invoke(cli, ["decompress", "-o", str(tmp_path / "y.png"), str(tmp_path / "x.idfz")])
    assert r.exit_code == 0, r.output
    assert Image.open(tmp_path / "y.png").tobytes() == im.tobytes()


def test_auto_config_picks_the_model_crop_and_holdout(tmp_path):
    from idfzip.imagefile import find_images
    from idfzip.train import AUTO, auto_config, auto_holdout

    for i in range(3):
        Image.fromarray(photo(40, 36, seed=i)).convert("L").save(tmp_path / f"g{i}.png")
    model, tc, start = auto_config(find_images([tmp_path]))
    assert start.stem == "grey" and model.channels == 1 and tc.crop == 32 and tc.batch == 128
    Image.fromarray(photo(300, 200)).save(tmp_path / "c.png")
    model, tc, start = auto_config(find_images([tmp_path / "c.png", tmp_path / "g0.png"]))
    assert start.stem == "natural" and model.channels == 3 and tc.val_images == 1 and tc.holdout == "spread"
    assert tc.minutes == AUTO.minutes and tc.patience > 0
    assert [auto_holdout(n) for n in (2, 14, 15, 30, 1000)] == [1, 1, 2, 3, 8]
    assert auto_holdout(5000, 32 * 32) == 500 and auto_holdout(20000, 32 * 32) == 1024 and auto_holdout(30, 512**2) == 3
    with pytest.raises(ValueError, match="at least 2"):
        auto_holdout(1)


def test_early_stop_when_validation_stops_improving(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for i in range(3):
        Image.fromarray(photo(40, 36, seed=i)).save(data / f"{i}.png")
    cfg = write_config(tmp_path / "c.json", steps=200, val_every=1, lr=1e-12, warmup=1, patience=2, ema=0.0)
    out = tmp_path / "m.safetensors"
    r = CliRunner().invoke(cli, ["train", str(data), "--config", str(cfg), "--out", str(out), "--no-report"])
    assert r.exit_code == 0, r.output
    assert "has not improved for 2 checks: stopping" in r.output
    assert torch.load(str(out) + ".ckpt", weights_only=True)["step"] < 200


def test_ctrl_c_writes_the_best_model_so_far(tmp_path, monkeypatch):
    """Exports wait for EXPORT_PERIOD (calibration is costly); a run interrupted before then still writes its
    best validated model."""
    import idfzip.train as training

    for i in range(3):
        Image.fromarray(photo(40, 36, seed=i)).save(tmp_path / f"{i}.png")
    monkeypatch.setattr(training, "EXPORT_PERIOD", 1e9)
    _, tc = load_config(write_config(tmp_path / "c.json", steps=50, val_every=1, ema=0.0))
    out = tmp_path / "m.safetensors"

    def stop(step, running, val):
        if step == 3 and val is None:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        training.train(IDFConfig(**TINY), tc, [tmp_path], out, "m", log=lambda line: None, progress=stop)
    assert int(load(str(out)).metadata["step"]) in (1, 2)
