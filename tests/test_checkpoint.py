"""Checkpoints: rebuild + reload round trip, weights_only safety, clear errors, and crash-safe (atomic) writes."""

import subprocess
import sys
import textwrap

import pytest
import torch

from se_surgery import se_blocks
from se_surgery.errors import CheckpointError
from se_surgery.train.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from se_surgery.train.models import build_model, make_model_config
from se_surgery.train.recipe import DEMO


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """An SE-ResNet-18 for 3 classes with SE in stage 4 only, saved as the trainer does."""
    recipe = DEMO.resolved()
    config = {"arch": "resnet18", "arch_kwargs": {}, "num_classes": 3, "input_size": 32,
              "surgery": {"reduction": 8, "init": "he", "owners": ["layer3.0", "layer3.1"]}}
    torch.manual_seed(0)
    model = build_model(config)
    recipe = type(recipe)(**{**recipe.to_dict(), "reduction": 8})
    model_config = make_model_config(recipe, ["a", "b", "c"], owners=["layer3.0", "layer3.1"])
    path = tmp_path_factory.mktemp("ckpt") / "last.pt"
    save_checkpoint(path, {"model": model.state_dict(), "model_config": model_config, "config": recipe.to_dict(),
                           "epoch": 3, "step": 30, "metrics": {"val_top1": 50.0}})
    return path, model


def test_round_trip_rebuilds_the_same_model(saved):
    path, original = saved
    model, info = load_checkpoint(path)
    assert list(se_blocks(model)) == list(se_blocks(original)) == ["layer3.0.se", "layer3.1.se"]
    assert info["model_config"]["surgery"]["owners"] == ["layer3.0", "layer3.1"]
    assert info["model_config"]["class_names"] == ["a", "b", "c"] and info["epoch"] == 3 and "model" not in info
    x = torch.randn(2, 3, 32, 32)
    original.eval()
    assert torch.equal(model(x), original(x)) and not model.training
    assert set(info) >= {"model_config", "epoch", "step", "metrics", "config"}
    assert set(info["model_config"]) >= {"arch", "arch_kwargs", "surgery", "num_classes", "class_names", "data",
                                         "input_size", "resize", "mean"}


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_bad_files_raise_one_line_errors(tmp_path, saved):
    cases = {"missing": "no checkpoint", "code": "more than tensors", "truncated": "damaged",
             "foreign": "not an se-surgery checkpoint"}
    torch.save({"model": {}, "model_config": Evil()}, tmp_path / "code")
    (tmp_path / "truncated").write_bytes(saved[0].read_bytes()[:5000])
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign")
    for name, match in cases.items():
        with pytest.raises(CheckpointError, match=match) as err:
            load_checkpoint(tmp_path / name)
        assert "\n" not in str(err.value) and str(tmp_path / name) in str(err.value)


# The child saves v1, then dies by SIGKILL in the middle of saving v2: while torch.save is writing, or after the
# bytes are written but before the rename.
_CHILD = """
import os, signal, sys, torch
from se_surgery.train import checkpoint
path = sys.argv[1]
checkpoint.save_checkpoint(path, {"model": {"w": torch.ones(1000)}, "model_config": {}, "version": 1})
real_save = torch.save
if sys.argv[2] == "writing":
    def dying_save(obj, f):
        f.write(b"PK\\x03\\x04 half a zip")
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    checkpoint.torch.save = dying_save
else:
    real_replace = os.replace
    checkpoint.os.replace = lambda a, b: os.kill(os.getpid(), signal.SIGKILL)
checkpoint.save_checkpoint(path, {"model": {"w": torch.zeros(1000)}, "model_config": {}, "version": 2})
"""


@pytest.mark.parametrize("moment", ["writing", "renaming"])
def test_killed_mid_save_leaves_the_previous_checkpoint(tmp_path, moment):
    path = tmp_path / "last.pt"
    run = subprocess.run([sys.executable, "-c", textwrap.dedent(_CHILD), str(path), moment])
    assert run.returncode == -9  # it really died in the middle
    assert len(list(tmp_path.iterdir())) == 2  # last.pt and the dead writer's temp file
    payload = read_checkpoint(path)
    assert payload["version"] == 1 and torch.equal(payload["model"]["w"], torch.ones(1000))
    save_checkpoint(path, {**payload, "version": 3})  # the next save is unaffected by the leftover
    assert read_checkpoint(path)["version"] == 3
