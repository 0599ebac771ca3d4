"""The trainer end to end, on the embedded digits: accuracy, resume, refusals and the Python API."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from se_surgery.train import get_recipe, train
from se_surgery.train.checkpoint import load_checkpoint, read_checkpoint
from se_surgery.train.cli import main
from se_surgery.train.data import build_dataset
from se_surgery.train.models import build_training_model

# A tiny run: 4 steps of 16 images an epoch, 32 val images; ResNet-18 because add_se must handle the real thing.
TINY = ["--epochs", "2", "--num-samples", "64", "--batch-size", "16", "--val-samples", "32", "--no-progress"]
TINY_RECIPE = dict(epochs=2, num_samples=64, batch_size=16, val_samples=32)


def _cli(*args, env=None, **kw):
    return subprocess.run([sys.executable, "-m", "se_surgery.train", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, **kw)


def _metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def _top1(model, dataset):
    """An independent reference: plain argmax over the whole dataset, one image at a time."""
    with torch.no_grad():
        hits = sum(int(model(x[None]).argmax() == y) for x, y in (dataset[i] for i in range(len(dataset))))
    return 100 * hits / len(dataset)


def test_default_run_reaches_97_percent(tmp_path):
    run = _cli("--out", str(tmp_path / "demo"), "--no-progress", timeout=900)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "best val top-1" in run.stdout
    metrics = _metrics(tmp_path / "demo")
    assert metrics[-1]["val_top1"] >= 97.0, metrics[-1]
    assert {"epoch", "lr", "train_loss", "train_top1", "val_loss", "val_top1", "val_top5", "images_per_s",
            "seconds"} <= set(metrics[-1])
    assert json.loads((tmp_path / "demo" / "config.json").read_text())["arch"] == "resnet18"
    model, info = load_checkpoint(tmp_path / "demo" / "best.pt")  # what the analysis tools do
    cfg = info["model_config"]
    val = build_dataset(cfg["data"], "val", input_size=cfg["input_size"], resize=cfg["resize"], mean=cfg["mean"])
    assert _top1(model, val) == pytest.approx(max(m["val_top1"] for m in metrics), abs=1e-9)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A 2-epoch tiny run through the Python API."""
    out = tmp_path_factory.mktemp("tiny") / "run"
    assert train(get_recipe(**TINY_RECIPE), out, progress=False) == out
    return out


def test_run_folder(tiny_run):
    assert {p.name for p in tiny_run.iterdir()} >= {"config.json", "metrics.jsonl", "last.pt", "best.pt"}
    assert [m["epoch"] for m in _metrics(tiny_run)] == [1, 2]
    info = read_checkpoint(tiny_run / "last.pt")
    assert (info["epoch"], info["epoch_step"], info["step"]) == (2, 0, 8)
    assert info["config"] == json.loads((tiny_run / "config.json").read_text())


def test_kill_mid_epoch_then_resume_is_bit_identical(tmp_path, tiny_run):
    out = tmp_path / "killed"
    args = [*TINY, "--ckpt-every", "1", "--out", str(out)]
    proc = subprocess.Popen([sys.executable, "-m", "se_surgery.train", *args], stderr=subprocess.DEVNULL)
    last, seen, stamp = out / "last.pt", 0, None
    while seen < 2 and proc.poll() is None:  # kill after the 2nd checkpoint of epoch 1, wherever the run then is
        if last.exists() and last.stat().st_mtime_ns != stamp:
            stamp, seen = last.stat().st_mtime_ns, seen + 1
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    interrupted = read_checkpoint(last)
    assert (interrupted["epoch"], interrupted["step"]) < (2, 8)
    resumed = _cli(*args, "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = read_checkpoint(tiny_run / "last.pt"), read_checkpoint(last)
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])  # same seed, same bits
    timing = {"images_per_s", "seconds"}
    strip = [{k: v for k, v in m.items() if k not in timing} for m in _metrics(out)]
    assert strip == [{k: v for k, v in m.items() if k not in timing} for m in _metrics(tiny_run)]


def test_resume_refuses_another_model_stops_on_nan_and_takes_speed_flags(tmp_path, tiny_run, capsys,
                                                                                 monkeypatch):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(tiny_run, out)
    assert main(["--out", str(out), "--resume", "auto", "--arch", "resnet34", "--no-progress"]) == 2
    assert "another arch" in capsys.readouterr().err
    assert main(["--out", str(out), "--resume", "auto", "--epochs", "3", "--lr", "1e30", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "at step 10 " in err and "last good checkpoint" in err, err  # lr 1e30: step 9 makes the weights blow up
    kept = read_checkpoint(out / "last.pt")
    assert kept["epoch"] == 2 and all(torch.isfinite(t).all() for t in kept["model"].values())
    flags = ["--amp", "--channels-last", "--sync-bn"]  # --compile: see test_speed_flags (a compile costs minutes here)
    reads, load = [], torch.load
    monkeypatch.setattr(torch, "load", lambda f, *a, **kw: reads.append(Path(f).name) or load(f, *a, **kw))
    assert main(["--out", str(out), "--resume", "auto", "--epochs", "3", *flags, "--no-progress"]) == 0
    assert reads == ["last.pt"]  # the CLI (for the run's recipe) and the trainer (for its states) share one read
    assert [m["epoch"] for m in _metrics(out)] == [1, 2, 3]


@pytest.mark.parametrize("args, message", [
    (["--accum-steps", "3"], "divisible by 3"),
    (["--data", "/nonexistent/imagenet"], "does not exist"),
    (["--num-samples", "8"], "less than one batch"),
])
def test_bad_input_is_refused_with_a_clear_message(tmp_path, capsys, args, message):
    assert main([*TINY, "--out", str(tmp_path / "x"), *args]) == 2
    assert message in capsys.readouterr().err


def test_out_holding_another_run_is_refused(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{}")
    assert main([*TINY, "--out", str(tmp_path)]) == 2
    assert "already holds a run" in capsys.readouterr().err


def test_pretrained_offline_fails_clearly(tmp_path):
    offline = {"TORCH_HOME": str(tmp_path / "hub"), "https_proxy": "http://127.0.0.1:9", "HTTPS_PROXY":
               "http://127.0.0.1:9", "no_proxy": "", "NO_PROXY": ""}
    run = _cli(*TINY, "--pretrained", "--out", str(tmp_path / "p"), env=offline)
    assert run.returncode == 2 and "--pretrained" in run.stderr and "checkpoints" in run.stderr, run.stderr


def test_evaluation_gives_each_module_its_own_flag_back():
    from torch import nn

    from se_surgery.modes import eval_mode

    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)).train()
    model[1].eval()  # frozen while fine-tuning
    with eval_mode(model):
        assert not any(m.training for m in model.modules())
    assert model.training and model[0].training and not model[1].training


def test_two_accumulated_micro_batches_take_the_step_of_one_big_batch(tmp_path):
    """``--batch-size 32 --accum-steps 2`` (2 x 16 images) takes the same SGD step as ``--batch-size 32`` (1 x 32).

    The mean loss over 32 images is the mean of the two 16-image means, so the gradients agree up to float rounding,
    for a model whose output for an image does not depend on the rest of its batch. BatchNorm in training mode
    normalises by the batch's statistics, so with it 2 x 16 and 1 x 32 are different functions (and a different
    step); timm's ResNet-18 with GroupNorm (per-image statistics) keeps the residual blocks and their SE and drops
    that dependence. Both runs draw the same 32 images with the same augmentations: the sampler and the
    augmentation seeds follow positions in the global stream, not micro-batches.
    """
    kw = dict(arch="timm:resnet18", arch_kwargs={"norm_layer": "groupnorm"}, epochs=1, num_samples=32,
              batch_size=32, val_samples=8, reduction=4)
    one = read_checkpoint(train(get_recipe(**kw), tmp_path / "one", progress=False) / "last.pt")
    two = read_checkpoint(train(get_recipe(**kw, accum_steps=2), tmp_path / "two", progress=False) / "last.pt")
    assert (one["step"], two["step"]) == (1, 1) and one["model_config"] == two["model_config"]
    torch.manual_seed(0)  # the recipe's seed: both runs start from these weights
    init, _ = build_training_model(get_recipe(**kw).resolved(), one["model_config"]["class_names"])
    start = init.state_dict()
    params = [name for name, _ in init.named_parameters()]
    step_one = torch.cat([(one["model"][k] - start[k]).flatten() for k in params])
    step_two = torch.cat([(two["model"][k] - start[k]).flatten() for k in params])
    assert step_one.norm() > 1e-3  # a real step was taken ...
    assert (step_two - step_one).norm() <= 1e-4 * step_one.norm()  # ... and the same one, to float rounding
