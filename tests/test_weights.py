"""Weights files in (se_surgery.train.weights): every format the tests write themselves loads into a fresh model
that then computes what the saved one did; EMA weights, wrapper prefixes, plain-vs-SE files, and one-line refusals
(a pickle payload never runs)."""

from __future__ import annotations

import argparse
import pathlib

import pytest
import timm.utils
import torch
import torchvision
from safetensors.torch import save_file
from torch import nn

from se_surgery import add_se
from se_surgery.errors import CheckpointError
from se_surgery.train.checkpoint import save_checkpoint
from se_surgery.train.models import build_model
from se_surgery.train.weights import fit_prefix, holds_se, load_weights, read_weights

from .helpers import Payload

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


class Tiny(nn.Module):
    """A plain network with torchvision-like names and a BatchNorm (whose buffers a weights file carries too)."""

    def __init__(self, num_classes: int = 5) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn1(self.conv1(x))).mean((2, 3)))


class Wrapper(nn.Module):
    """A model whose own keys start with ``model.``: nothing may strip them."""

    def __init__(self) -> None:
        super().__init__()
        self.model = Tiny()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class ExponentialMovingAverage(torch.optim.swa_utils.AveragedModel):
    """torchvision references/classification/utils.py's EMA, as its train.py saves under ``model_ema``."""

    def __init__(self, model: nn.Module, decay: float, device: str = "cpu") -> None:
        def ema_avg(avg_model_param, model_param, num_averaged):
            return decay * avg_model_param + (1 - decay) * model_param

        super().__init__(model, device, ema_avg, use_buffers=True)


def trained(seed: int = 0, model: nn.Module | None = None) -> nn.Module:
    """A model with random weights and non-trivial BatchNorm statistics (one forward in train mode)."""
    torch.manual_seed(seed)
    model = model or Tiny()
    with torch.no_grad():
        model.train()(torch.randn(4, 3, 32, 32) * 2 + 1)
    return model.eval()


def outputs(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(X)


def loaded(path: pathlib.Path, fresh: nn.Module | None = None, **kw) -> nn.Module:
    fresh = fresh or Tiny()
    load_weights(fresh, read_weights(path, **kw), source=path)
    return fresh


def timm_args(**extra) -> argparse.Namespace:
    """Part of what timm's train.py saves as ``args``: strings, numbers, lists, tuples, None."""
    return argparse.Namespace(model="tiny", lr=0.1, epochs=3, data_dir="/data/imagenet", mean=None, input_size=None,
                              crop_pct=None, aa="rand-m9-mstd0.5", mixup=0.2, decay_milestones=[90, 180],
                              betas=(0.9, 0.999), model_ema=True, **extra)


def test_raw_state_dict_and_the_wrapper_prefixes(tmp_path) -> None:
    source = trained()
    for name, prefix in [("raw", ""), ("ddp", "module."), ("lightning", "model."), ("compiled", "_orig_mod."),
                         ("ddp-compiled", "module._orig_mod.")]:
        path = tmp_path / f"{name}.pth"
        torch.save({prefix + k: v for k, v in source.state_dict().items()}, path)
        assert torch.equal(outputs(loaded(path)), outputs(source)), name
    # a model whose own keys start with "model." keeps them; a DDP-wrapped one loses only "module."
    own = trained(1, Wrapper())
    state = own.state_dict()
    assert fit_prefix(state, own.state_dict().keys()).keys() == state.keys()
    ddp = {"module." + k: v for k, v in state.items()}
    assert fit_prefix(ddp, own.state_dict().keys()).keys() == state.keys()
    torch.save(ddp, tmp_path / "wrapped.pth")
    assert torch.equal(outputs(loaded(tmp_path / "wrapped.pth", Wrapper())), outputs(own))
    # and the plain model inside it takes the Wrapper's weights with "model." stripped
    assert fit_prefix(state, Tiny().state_dict().keys()).keys() == Tiny().state_dict().keys()


def test_safetensors_and_a_damaged_one(tmp_path) -> None:
    source = trained()
    path = tmp_path / "model.safetensors"
    save_file(source.state_dict(), path)
    assert torch.equal(outputs(loaded(path)), outputs(source))
    unnamed = tmp_path / "weights.bin"  # told by its header, not only by its suffix
    unnamed.write_bytes(path.read_bytes())
    assert torch.equal(outputs(loaded(unnamed)), outputs(source))
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError) as err:
        read_weights(damaged)
    assert str(err.value) == (f"{damaged} is a damaged .safetensors file (Error while deserializing header: "
                              "incomplete metadata, file not fully covered): download or save it again")
    with pytest.raises(CheckpointError, match=r"holds no EMA weights \(a \.safetensors file holds one set of "
                                              r"weights\): drop --ema$"):
        read_weights(path, ema=True)


def test_timm_train_checkpoint_written_by_timms_saver(tmp_path) -> None:
    source, ema_source = trained(0), trained(1)
    ema = timm.utils.ModelEmaV3(source)
    ema.module.load_state_dict(ema_source.state_dict())
    optimizer = torch.optim.SGD(source.parameters(), lr=0.1, momentum=0.9)
    source(X).sum().backward()
    optimizer.step()  # a momentum buffer in the optimizer's state
    source.eval()
    saver = timm.utils.CheckpointSaver(source, optimizer, args=timm_args(), model_ema=ema,
                                       checkpoint_dir=str(tmp_path), recovery_dir=str(tmp_path))
    saver.save_checkpoint(epoch=2, metric=51.5)
    path = tmp_path / "last.pth.tar"
    payload = torch.load(path, weights_only=False)  # the control: timm's layout, with a Namespace under args
    assert {"state_dict", "state_dict_ema", "optimizer", "epoch", "arch", "version", "metric", "args"} <= set(payload)
    assert isinstance(payload["args"], argparse.Namespace)
    with pytest.raises(Exception, match="Namespace"):
        torch.load(path, weights_only=True)  # what the allowlist is for
    assert torch.equal(outputs(loaded(path)), outputs(source))
    assert torch.equal(outputs(loaded(path, ema=True)), outputs(ema_source))
    assert not torch.equal(outputs(source), outputs(ema_source))


def test_torchvision_reference_checkpoint(tmp_path) -> None:
    source, ema_source = trained(0), trained(1)
    model_ema = ExponentialMovingAverage(source, decay=0.99)
    model_ema.module.load_state_dict(ema_source.state_dict())
    optimizer = torch.optim.SGD(source.parameters(), lr=0.1, momentum=0.9)
    lr_scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 30)
    args = argparse.Namespace(model="resnet18", lr=0.1, epochs=90, data_path="/data", weights=None, amp=False,
                              ra_reps=3, model_ema=True, model_ema_decay=0.99998, val_resize_size=256)
    torch.save({"model": source.state_dict(), "optimizer": optimizer.state_dict(), "lr_scheduler":
                lr_scheduler.state_dict(), "epoch": 5, "args": args, "model_ema": model_ema.state_dict()},
               path := tmp_path / "checkpoint.pth")
    ema_keys = list(model_ema.state_dict())
    assert ema_keys[0] == "n_averaged" and all(k.startswith("module.") for k in ema_keys[1:])
    assert torch.equal(outputs(loaded(path)), outputs(source))
    state = read_weights(path, ema=True)
    assert "n_averaged" not in state and state.keys() == source.state_dict().keys()
    assert torch.equal(outputs(loaded(path, ema=True)), outputs(ema_source))
    plain = tmp_path / "no-ema.pth"
    torch.save({"model": source.state_dict(), "epoch": 5, "args": args}, plain)
    with pytest.raises(CheckpointError) as err:
        read_weights(plain, ema=True)
    assert str(err.value) == (f"{plain} holds no EMA weights (it holds a dict of model, epoch, args; no "
                              "state_dict_ema or model_ema): drop --ema")


def test_our_checkpoint_holds_se_weights_that_load_after_add_se(tmp_path) -> None:
    config = {"arch": "resnet18", "arch_kwargs": {}, "num_classes": 3, "input_size": 32,
              "surgery": {"reduction": 8, "init": "he", "owners": ["layer3.0", "layer3.1"]}}
    torch.manual_seed(0)
    source = build_model(config).eval()
    path = save_checkpoint(tmp_path / "best.pt", {"model": source.state_dict(), "model_config": config, "epoch": 1})
    state = read_weights(path)
    plain = torchvision.models.resnet18(num_classes=3)
    assert holds_se(state, plain)
    with pytest.raises(CheckpointError, match=r"unexpected layer3\.0\.se\.fc1\.weight"):
        load_weights(plain, state, source=path)  # SE weights do not go into the plain model
    fresh = build_model(config)
    load_weights(fresh, state, source=path)
    assert torch.equal(outputs(fresh), outputs(source))
    with pytest.raises(CheckpointError, match=r"holds no EMA weights \(it holds a dict of model, model_config, epoch"):
        read_weights(path, ema=True)


def test_holds_se_on_plain_and_se_state_dicts() -> None:
    plain = torchvision.models.resnet18(num_classes=5)
    se = add_se(torchvision.models.resnet18(num_classes=5), example_input=torch.zeros(2, 3, 32, 32))
    assert not holds_se(plain.state_dict(), plain)
    assert holds_se(se.state_dict(), plain)
    assert holds_se({"module." + k: v for k, v in se.state_dict().items()}, plain)  # after fit_prefix
    assert not holds_se({**plain.state_dict(), "aux.weight": torch.zeros(1)}, plain)  # extra keys, but no SE block
    assert not holds_se({**se.state_dict(), "aux.weight": torch.zeros(1)}, plain)


def test_mismatch_is_one_line_and_skip_leaves_the_new_head(tmp_path) -> None:
    source = trained()
    state = source.state_dict()
    with pytest.raises(CheckpointError) as err:
        load_weights(Tiny(num_classes=10), state, source="w.pth")
    assert str(err.value) == ("w.pth does not fit Tiny: wrong shape fc.weight (5, 8) vs (10, 8), fc.bias (5,) vs "
                              "(10,): pass the --arch (and --arch-kwargs) these weights were saved from; a classifier "
                              "for another class count is a new head")
    resnet = torchvision.models.resnet18()
    with pytest.raises(CheckpointError) as err:
        load_weights(resnet, state, source="w.pth", fix="pass --model X")
    message = str(err.value)
    assert "\n" not in message and message.endswith(": pass --model X")
    assert message.startswith("w.pth does not fit ResNet: missing layer1.0.conv1.weight, layer1.0.bn1.weight, "
                              "layer1.0.bn1.bias (+")
    assert "; unexpected " not in message  # conv1, bn1, fc are resnet18's names too
    assert "; wrong shape conv1.weight (8, 3, 3, 3) vs (64, 3, 7, 7), bn1.weight (8,) vs (64,), bn1.bias (8,) vs " \
           "(64,) (+" in message
    extra = {**state, "head.weight": torch.zeros(1), "head.bias": torch.zeros(1), "x.a": torch.zeros(1),
             "x.b": torch.zeros(1)}
    with pytest.raises(CheckpointError, match=r"^w\.pth does not fit Tiny: unexpected head\.weight, head\.bias, x\.a "
                                              r"\(\+1 more\): "):
        load_weights(Tiny(), extra, source="w.pth")
    fresh = Tiny(num_classes=10)
    head = fresh.fc.weight.detach().clone()
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    load_weights(fresh, state, source="w.pth", skip=["fc.weight", "fc.bias"])
    assert torch.equal(fresh.fc.weight, head)  # the new head is left as it was
    assert torch.equal(fresh.conv1.weight, source.conv1.weight) and torch.equal(fresh.bn1.running_var,
                                                                                 source.bn1.running_var)
    assert not torch.equal(before["conv1.weight"], fresh.conv1.weight)
    # an older file without BatchNorm's num_batches_tracked counter loads, as load_state_dict takes it
    old = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    load_weights(fresh := Tiny(), old, source="old.pth")
    assert torch.equal(outputs(fresh), outputs(source))


def test_a_pickle_payload_never_runs(tmp_path) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    torch.save({"conv1.weight": Payload(marker)}, evil)
    with pytest.raises(CheckpointError) as err:
        read_weights(evil)
    assert not marker.exists()
    assert str(err.value) == (
        f"{evil} holds more than tensors and plain data (getattr); refusing to run its code: save its weights alone "
        "where you trust the file: torch.save(torch.load(FILE, weights_only=False)['state_dict'], 'weights.pth') "
        "(['model'] for a torchvision checkpoint)")
    inside = tmp_path / "evil-args.pth.tar"  # a timm-like checkpoint whose args carry the payload
    torch.save({"state_dict": trained().state_dict(), "args": timm_args(hook=Payload(marker))}, inside)
    with pytest.raises(CheckpointError, match="refusing to run its code"):
        read_weights(inside)
    assert not marker.exists()
    torch.load(evil, weights_only=False)  # the control: a loader that trusts the file does run the payload
    assert marker.exists()


def test_a_namespace_holding_other_objects_is_named(tmp_path) -> None:
    path = tmp_path / "path-args.pth.tar"
    torch.save({"state_dict": trained().state_dict(), "args": timm_args(output=pathlib.Path("/runs"))}, path)
    with pytest.raises(CheckpointError) as err:
        read_weights(path)
    assert str(err.value).startswith(
        f"{path} holds more than tensors and plain data (pathlib.PosixPath, e.g. in its args: an argparse.Namespace "
        "loads, with plain data in it only); refusing to run its code: save its weights alone where you trust the "
        "file: torch.save(torch.load(FILE, weights_only=False)['state_dict'], 'weights.pth')")


@pytest.mark.parametrize(("payload", "holds"), [
    ({"epoch": 3, "optimizer": {"state": {}, "param_groups": []}}, "a dict of epoch, optimizer, without a dict of "
                                                                   "tensors"),
    ({"state_dict": {"a": 1}, "epoch": 3}, "a dict of state_dict, epoch, whose state_dict is not a dict of tensors"),
    ([torch.zeros(2)] * 3, "a list of 3 items"),
    (torch.zeros(2, 3), "a single tensor of shape (2, 3)"),
    ({}, "an empty dict"),
])
def test_a_file_without_a_state_dict(tmp_path, payload, holds) -> None:
    path = tmp_path / "w.pth"
    torch.save(payload, path)
    with pytest.raises(CheckpointError) as err:
        read_weights(path)
    assert str(err.value) == (f"{path} holds no state_dict (it holds {holds}): pass a state_dict saved with "
                              "torch.save, a .safetensors file, or a timm, torchvision-reference or se-surgery "
                              "training checkpoint")


def test_missing_foreign_and_truncated_files(tmp_path) -> None:
    with pytest.raises(CheckpointError, match=r"^no weights file at .*missing\.pth: pass a state_dict"):
        read_weights(tmp_path / "missing.pth")
    text = tmp_path / "notes.pth"
    text.write_text("not weights")
    with pytest.raises(CheckpointError, match=r"notes\.pth is not a torch weights file \(it holds text\): pass a "):
        read_weights(text)
    torch.save(trained().state_dict(), whole := tmp_path / "whole.pth")
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(whole.read_bytes()[:2000])
    with pytest.raises(CheckpointError, match=r"truncated\.pth is damaged or not a torch weights file \(.*\): save "
                                              r"the weights again$"):
        read_weights(truncated)
