"""The trainer under bad input: every flag checked before any work, the recipe's own arch_kwargs only where they fit,
Ctrl-C and non-finite stops that say what the run folder holds, and image folders with files that are not images."""

import dataclasses
import hashlib
import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from se_surgery.errors import DataError
from se_surgery.train import get_recipe, image_check, loop, train
from se_surgery.train import recipe as recipe_module
from se_surgery.train.checkpoint import read_checkpoint
from se_surgery.train.cli import main
from se_surgery.train.data import unwrap_worker_error
from se_surgery.train.distributed import Env
from tests.helpers import one_line_error

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--epochs", "2", "--num-samples", "64", "--batch-size", "16", "--val-samples", "32", "--no-progress"]
TINY_RECIPE = dict(epochs=2, num_samples=64, batch_size=16, val_samples=32)
ONE_STEP = ["--epochs", "1", "--num-samples", "8", "--batch-size", "8", "--val-samples", "8", "--no-progress"]


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _epochs(out: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A finished 2-epoch tiny run (4 steps an epoch) through the Python API."""
    out = tmp_path_factory.mktemp("tiny") / "run"
    train(get_recipe(**TINY_RECIPE), out, progress=False)
    return out


@pytest.fixture
def resumable(tmp_path, tiny_run):
    """A copy of the tiny run that ``--resume auto --epochs 3`` extends by one epoch."""
    import shutil

    out = tmp_path / "run"
    shutil.copytree(tiny_run, out)
    return out


# --- every numeric flag, before any work -------------------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["--lr", "0"], "--lr 0.0 must be a positive finite number: pass e.g. --lr 0.1"),
    (["--lr", "-0.1"], "--lr -0.1 must be a positive finite number"),
    (["--lr", "nan"], "--lr nan must be a positive finite number"),
    (["--lr", "inf"], "--lr inf must be a positive finite number"),
    (["--momentum", "-1"], "--momentum -1.0 must be in [0, 1): pass e.g. --momentum 0.9"),
    (["--momentum", "1"], "--momentum 1.0 must be in [0, 1)"),
    (["--weight-decay=-1e-4"], "--weight-decay -0.0001 must be a finite number >= 0"),
    (["--lr-gamma", "0"], "--lr-gamma 0.0 must be in (0, 1]: pass e.g. --lr-gamma 0.1"),
    (["--lr-gamma", "10"], "--lr-gamma 10.0 must be in (0, 1]"),
    (["--workers", "-1"], "--workers -1 must be an integer >= 0: pass e.g. --workers 8"),
    (["--num-samples", "-5"], "--num-samples -5 must be a positive integer"),
    (["--num-samples", "0"], "--num-samples 0 must be a positive integer"),
    (["--val-samples", "-3"], "--val-samples -3 must be a positive integer"),
    (["--val-samples", "0"], "--val-samples 0 must be a positive integer"),
    (["--eval-batch-size", "0"], "--eval-batch-size 0 must be a positive integer"),
    (["--ckpt-every", "-1"], "--ckpt-every -1 must be an integer >= 0: pass e.g. --ckpt-every 0"),
    (["--accum-steps", "3"], "--batch-size 16 does not split into --accum-steps 3 equal micro-batches: pass a "
                             "--batch-size divisible by 3"),
    (["--crop", "0"], "--crop 0 must be a positive integer"),
    (["--seed", "-1"], "--seed -1 must be in [0, 2**63)"),
    (["--mean", "123.7", "116.3", "103.5"], "the mean is in [0, 1] pixel units"),
    (["--arch-kwargs", "{zero"], "--arch-kwargs '{zero': not JSON (Expecting property name"),
    (["--arch-kwargs", "[1]"], "--arch-kwargs '[1]': a JSON list, not an object: pass a JSON object, e.g. "
                               "'{\"zero_init_residual\": true}'"),
])
def test_each_bad_flag_is_one_line_before_any_work(tmp_path, capsys, args, message):
    out = tmp_path / "x"
    err = one_line_error(main, capsys, [*TINY, "--out", str(out), *args])
    assert message in err, err
    assert not out.exists()  # refused before the run folder, the data or the model


def test_a_resumed_run_checks_its_new_flags_too(resumable, capsys):
    before = _digest(resumable / "last.pt")
    err = one_line_error(main, capsys, ["--out", str(resumable), "--resume", "auto", "--epochs", "3", "--lr", "nan"])
    assert "--lr nan must be a positive finite number" in err
    assert _digest(resumable / "last.pt") == before and _epochs(resumable) == [1, 2]


# --- the recipe's own arch_kwargs only where they fit --------------------------------------------------------------

@pytest.fixture
def demo_with_arch_kwargs(monkeypatch):
    """A demo recipe whose defaults carry a ResNet-only keyword, as a recipe of any arch may."""
    demo = dataclasses.replace(recipe_module.DEMO, arch_kwargs={"zero_init_residual": True})
    monkeypatch.setitem(recipe_module.RECIPES, "demo", demo)
    return demo


@pytest.mark.parametrize("arch", ["mobilenet_v2", "timm:resnet18"])
def test_another_arch_trains_without_the_recipes_own_arch_kwargs(tmp_path, caplog, demo_with_arch_kwargs, arch):
    out = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="se_surgery.train.recipe"):
        assert main([*ONE_STEP, "--arch", arch, "--out", str(out)]) == 0
    assert f'note: {arch} does not take the demo recipe\'s arch_kwargs {{"zero_init_residual": true}}' in caplog.text
    info = read_checkpoint(out / "last.pt")
    assert info["epoch"] == 1 and info["model_config"]["arch"] == arch
    assert info["config"]["arch_kwargs"] == {} == json.loads((out / "config.json").read_text())["arch_kwargs"]


def test_the_recipes_arch_kwargs_stay_where_they_fit_and_typed_ones_always(demo_with_arch_kwargs):
    assert get_recipe(arch="resnet34").arch_kwargs == {"zero_init_residual": True}  # a ResNet takes it
    assert get_recipe(arch="mobilenet_v2").arch_kwargs == {}
    typed = get_recipe(arch="mobilenet_v2", arch_kwargs={"zero_init_residual": True})
    assert typed.arch_kwargs == {"zero_init_residual": True}  # the user's own: kept, and refused when built


def test_a_transformer_and_typed_arch_kwargs_it_rejects_are_one_line(tmp_path, capsys, demo_with_arch_kwargs):
    err = one_line_error(main, capsys, [*ONE_STEP, "--arch", "vit_b_16", "--out", str(tmp_path / "vit")])
    assert "VisionTransformer failed on the example input" in err and "zero_init_residual" not in err, err
    assert not (tmp_path / "vit" / "last.pt").exists()
    err = one_line_error(main, capsys, [*ONE_STEP, "--arch", "mobilenet_v2", "--arch-kwargs",
                                        '{"zero_init_residual": true}', "--out", str(tmp_path / "typed")])
    assert ('--arch-kwargs {"zero_init_residual": true} do not fit mobilenet_v2' in err
            and "unexpected keyword argument 'zero_init_residual'" in err), err
    assert not (tmp_path / "typed" / "last.pt").exists()


# --- Ctrl-C and non-finite stops say what the folder holds ---------------------------------------------------------

def _interrupt_at(monkeypatch, name, call):
    """Make the loop's ``name`` raise KeyboardInterrupt (as Ctrl-C does) at its ``call``-th call."""
    real, calls = getattr(loop, name), []

    def stop(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, name, stop)


@pytest.mark.parametrize("name, call, where", [
    ("topk_correct", 3, "interrupted at epoch 3, step 2 of 4"),  # during the 3rd training step
    ("save_checkpoint", 1, "interrupted at epoch 3, step 4 of 4"),  # while last.pt is being written
])
def test_ctrl_c_is_one_line_130_and_last_pt_is_kept(resumable, capsys, monkeypatch, name, call, where):
    before = _digest(resumable / "last.pt")
    _interrupt_at(monkeypatch, name, call)
    assert main(["--out", str(resumable), "--resume", "auto", "--epochs", "3", "--no-progress"]) == 130
    err = capsys.readouterr().err.strip()
    assert err == (f"python -m se_surgery.train: {where}; {resumable / 'last.pt'} holds the end of epoch 2: "
                   "continue with --resume auto"), err
    assert _digest(resumable / "last.pt") == before
    assert not [p.name for p in resumable.iterdir() if ".tmp-" in p.name]
    monkeypatch.undo()
    assert main(["--out", str(resumable), "--resume", "auto", "--epochs", "3", "--no-progress"]) == 0
    assert _epochs(resumable) == [1, 2, 3] and read_checkpoint(resumable / "last.pt")["epoch"] == 3


def test_ctrl_c_before_any_checkpoint_says_so(tmp_path, capsys, monkeypatch):
    out = tmp_path / "fresh"
    _interrupt_at(monkeypatch, "topk_correct", 2)
    assert main([*TINY, "--out", str(out)]) == 130
    err = capsys.readouterr().err.strip()
    assert err == ("python -m se_surgery.train: interrupted at epoch 1, step 1 of 4; no checkpoint was written yet: "
                   "start again with --resume auto"), err
    assert not (out / "last.pt").exists()


def test_non_finite_stops_name_last_pt_only_when_there_is_one(tmp_path, capsys, monkeypatch):
    # a huge (finite) lr: step 1's update blows the weights up, so step 2's loss is NaN, before any checkpoint
    err = one_line_error(main, capsys, [*TINY, "--out", str(tmp_path / "loss"), "--lr", "1e30"])
    assert "the loss became nan at step 2 (epoch 1); no checkpoint was written yet: lower --lr and start again " \
           "with --resume auto" in err, err
    assert "last good" not in err and not (tmp_path / "loss" / "last.pt").exists()

    def inf_step(self, closure=None):  # the weights turn inf at the (only) step of the epoch, before its save
        for group in self.param_groups:
            for p in group["params"]:
                p.data.fill_(float("inf"))

    monkeypatch.setattr(torch.optim.SGD, "step", inf_step)
    err = one_line_error(main, capsys, [*ONE_STEP, "--out", str(tmp_path / "weights")])
    assert "the weights became non-finite by step 1; no checkpoint was written yet" in err, err
    assert not (tmp_path / "weights" / "last.pt").exists()


# --- image folders: headers checked once, decode errors in workers one line -----------------------------------------

def _folder(root: Path, per_class: int = 2) -> Path:
    for split in ("train", "val"):
        for name in ("cat", "dog"):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                pixels = np.random.default_rng(i).integers(0, 255, (36, 36, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")
    return root


def test_files_that_are_not_images_are_counted_and_named_before_training(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    data = _folder(tmp_path / "data")
    (data / "train" / "cat" / "html.jpg").write_text("<html>404</html>")
    (data / "val" / "dog" / "empty.png").write_bytes(b"")
    out = tmp_path / "run"
    err = one_line_error(main, capsys, ["--data", str(data), "--crop", "32", "--resize", "32", "--epochs", "1",
                                        "--batch-size", "4", "--workers", "0", "--out", str(out)])
    assert (f"2 of 10 image files under {data} cannot be read: train/cat/html.jpg (not an image PIL can "
            "read), val/dog/empty.png (not an image PIL can read); delete or replace them") in err, err
    assert not (out / "last.pt").exists()

    # cached by path, size and mtime: a second check opens only what changed
    paths = sorted(str(p) for p in data.rglob("*.*"))
    monkeypatch.setattr(image_check, "_problem", lambda path: pytest.fail(f"re-read {path}"))
    with pytest.raises(DataError, match="2 of 10 image files"):
        image_check.check_image_headers(data, paths, Env())
    Image.fromarray(np.zeros((36, 36, 3), np.uint8)).save(data / "val" / "dog" / "empty.png", format="PNG")
    opened = []
    monkeypatch.setattr(image_check, "_problem", lambda path: opened.append(Path(path).name))
    with pytest.raises(DataError, match=r"^1 of 10 image files .* train/cat/html\.jpg \(not an image"):
        image_check.check_image_headers(data, paths, Env())
    assert opened == ["empty.png"]


def test_an_unwritable_cache_is_skipped(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "file"))  # a file: no folder can be made under it
    data = _folder(tmp_path / "data", per_class=1)
    image_check.check_image_headers(data, [str(p) for p in data.rglob("*.png")], Env())  # all good: no error


_RANK = """
import os, sys, torch.distributed as dist
from se_surgery.errors import DataError
from se_surgery.train import image_check
from se_surgery.train.distributed import setup
env = setup()
if env.rank == 1:  # only rank 0 reads the files
    image_check._problem = lambda path: sys.exit(f"rank 1 read {path}")
try:
    image_check.check_image_headers(sys.argv[1], sys.argv[2:], env)
except DataError as e:
    print(f"rank {env.rank}: {e}")
dist.destroy_process_group()
"""


def test_under_ddp_every_rank_stops_with_rank_0s_verdict(tmp_path):
    data = _folder(tmp_path / "data", per_class=1)
    (data / "train" / "dog" / "bad.png").write_text("no")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
           "XDG_CACHE_HOME": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    paths = sorted(str(p) for p in data.rglob("*.png"))
    procs = [subprocess.Popen([sys.executable, "-c", _RANK, str(data), *paths], cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**env, "RANK": str(r)})
             for r in (0, 1)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    lines = [o.strip() for o, _ in outs]
    assert lines[0].startswith("rank 0: 1 of 5 image files") and "train/dog/bad.png" in lines[0], lines
    assert lines[1] == lines[0].replace("rank 0", "rank 1", 1)


def test_a_decode_error_in_a_worker_is_one_line_naming_the_file(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    data = _folder(tmp_path / "data")
    broken = data / "train" / "dog" / "1.png"
    broken.write_bytes(broken.read_bytes()[:200])  # the header reads, the pixels do not
    err = one_line_error(main, capsys, ["--data", str(data), "--crop", "32", "--resize", "32", "--epochs", "1",
                                        "--batch-size", "4", "--workers", "1", "--out", str(tmp_path / "run")])
    assert err.startswith(f"python -m se_surgery.train: error: cannot read image {broken}: ") and \
           err.endswith("delete or replace the file"), err
    assert "worker" not in err and "Traceback" not in err


def test_unwrap_worker_error_keeps_plain_errors_and_unwraps_wrapped_ones():
    plain = DataError("cannot read image a.png: truncated; delete or replace the file")
    assert unwrap_worker_error(plain) is plain
    wrapped = DataError("Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent call "
                        "last):\n  File \"x.py\", line 1, in f\n    raise DataError(m)\n"
                        f"se_surgery.errors.DataError: {plain}\n")
    again = unwrap_worker_error(wrapped)
    assert type(again) is DataError and str(again) == str(plain)
