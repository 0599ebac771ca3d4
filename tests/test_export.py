"""``python -m se_surgery.export``: the SE model's weights as safetensors with the config that rebuilds it beside
them, a round trip through ``load_checkpoint``, timm's SE twins loading the file strict, and the refusals."""

from __future__ import annotations

import errno
import json
import os
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from se_surgery import SEConfig, export, se_blocks
from se_surgery.errors import CheckpointError, UntrustedFactory
from se_surgery.train import exported
from se_surgery.train.checkpoint import load_checkpoint, save_checkpoint
from se_surgery.train.models import build_model, surgery_dict

timm = pytest.importorskip("timm")


def _payload(arch: str, num_classes: int, size: int, **se) -> tuple[dict, torch.nn.Module]:
    """A checkpoint payload as the trainer writes it, of ``arch`` with SE in every block, random BN statistics."""
    config = {"arch": arch, "arch_kwargs": {}, "num_classes": num_classes, "class_names": list("abcde")[:num_classes],
              "input_size": size, "resize": size, "data": "digits", "mean": [0.5, 0.5, 0.5],
              "surgery": surgery_dict(SEConfig(**se))}
    torch.manual_seed(0)
    model = build_model(config)
    config["surgery"]["owners"] = list(dict.fromkeys(name.rsplit(".", 1)[0] for name in se_blocks(model)))
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):  # so that a statistic loaded into the wrong layer shows
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return {"model": model.state_dict(), "model_config": config, "config": {"arch": arch}, "epoch": 2, "step": 20,
            "metrics": {"val_top1": 40.0}, "optimizer": {"state": {}, "param_groups": []}}, model.eval()


def _error(capsys, args: list[str]) -> str:
    """The CLI on bad input: exit 2 and one line on stderr, no traceback; returns the line."""
    try:
        code = export.main(args)
    except SystemExit as exit_info:  # argparse's own usage errors
        code = exit_info.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def _export(tmp_path, capsys, payload: dict, name: str = "se") -> tuple:
    ckpt, out = tmp_path / f"{name}.pt", tmp_path / f"{name}.safetensors"
    save_checkpoint(ckpt, payload)
    assert export.main([str(ckpt), str(out)]) == 0
    return ckpt, out, capsys.readouterr().out


@pytest.mark.parametrize("arch, twin, se", [("resnet50", "seresnet50", {}), ("resnet18", "seresnet18", {"divisor": 8})])
def test_export_round_trips_and_loads_strict_into_timms_twin(tmp_path, capsys, arch, twin, se) -> None:
    payload, original = _payload(arch, 5, 64, **se)
    ckpt, out, printed = _export(tmp_path, capsys, payload)
    assert f"wrote {out} (" in printed and f"{out.with_suffix('.json')} ({arch}, 5 classes)" in printed
    assert f"timm.create_model('{twin}', num_classes=5)" in printed
    state = load_file(out)
    assert sorted(state) == sorted(payload["model"])
    assert all(torch.equal(state[k], v) for k, v in payload["model"].items())
    side = json.loads(out.with_suffix(".json").read_text())
    assert side["model_config"] == payload["model_config"] and side["epoch"] == 2 and "optimizer" not in side
    x = torch.randn(2, 3, 64, 64)
    model, info = load_checkpoint(out)  # the round trip: rebuilt from the config beside the weights
    with torch.no_grad():
        assert torch.equal(model(x), original(x)) and not model.training
        assert info["metrics"] == {"val_top1": 40.0} and info["model_config"] == payload["model_config"]
        timm_model = timm.create_model(twin, num_classes=5)
        timm_model.load_state_dict(state, strict=True)
        assert torch.allclose(timm_model.eval()(x), original(x), atol=1e-5, rtol=1e-4)


def test_without_timms_rounding_resnet18_has_no_twin(tmp_path, capsys) -> None:
    payload, _ = _payload("resnet18", 5, 64)
    _, out, printed = _export(tmp_path, capsys, payload)
    assert "timm.create_model" not in printed and exported.timm_twin(payload["model_config"]) is None
    with pytest.raises(RuntimeError, match=r"layer1.0.se.fc1.weight: .*torch.Size\(\[4, 64, 1, 1\]\).*\[8, 64, 1, 1\]"):
        timm.create_model("seresnet18", num_classes=5).load_state_dict(load_file(out))  # C // 16 = 4, timm's 8


def test_export_refusals_are_one_line(tmp_path, capsys) -> None:
    payload, _ = _payload("resnet18", 3, 32, reduction=8)
    ckpt, out, _ = _export(tmp_path, capsys, payload)
    before = out.read_bytes()
    err = _error(capsys, [str(ckpt), str(out)])
    assert f"{out} and {out.with_suffix('.json')} already exist: pass --force to replace them, or pick another OUT" \
        in err and out.read_bytes() == before
    assert export.main([str(ckpt), str(out), "--force"]) == 0
    capsys.readouterr()
    err = _error(capsys, [str(ckpt), str(tmp_path / "se.pt")])
    assert f"OUT {tmp_path / 'se.pt'} must end in .safetensors" in err and f"pass e.g. {tmp_path / 'se.safetensors'}" \
        in err
    err = _error(capsys, [str(tmp_path / "missing.pt"), str(tmp_path / "m.safetensors")])
    assert "no checkpoint at" in err and not (tmp_path / "m.safetensors").exists()
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    err = _error(capsys, [str(tmp_path / "foreign.pt"), str(tmp_path / "f.safetensors")])
    assert "not an se-surgery checkpoint" in err
    err = _error(capsys, [str(ckpt)])
    assert "the following arguments are required: OUT" in err


def test_exported_weights_without_their_config_or_damaged_are_refused(tmp_path, capsys) -> None:
    payload, _ = _payload("resnet18", 3, 32, reduction=8)
    _, out, _ = _export(tmp_path, capsys, payload)
    beside = out.with_suffix(".json")
    text = beside.read_text()
    beside.unlink()
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(out)
    assert str(err.value) == (f"{out} has no config beside it (se.json, which rebuilds its model): put the se.json "
                              "that python -m se_surgery.export wrote next to it, or export again")
    beside.write_text(json.dumps({"epoch": 1}))
    with pytest.raises(CheckpointError, match="holds no model_config"):
        load_checkpoint(out)
    beside.write_text(text)
    out.write_bytes(out.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="is damaged or not a safetensors file") as err:
        load_checkpoint(out)
    assert "\n" not in str(err.value)
    with pytest.raises(CheckpointError, match="no exported weights at"):
        load_checkpoint(tmp_path / "none.safetensors")


def test_a_failed_write_keeps_the_previous_export(tmp_path, capsys, monkeypatch) -> None:
    payload, _ = _payload("resnet18", 3, 32, reduction=8)
    ckpt, out, _ = _export(tmp_path, capsys, payload)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def full_disk(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(exported.os, "replace", full_disk)
    err = _error(capsys, [str(ckpt), str(out), "--force"])
    assert f"cannot write {out} (No space left on device): it keeps what it held; free some disk space" in err
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no temporary file left either


def test_checkpoints_written_before_exports_and_factories_still_load_and_export(tmp_path, capsys) -> None:
    """A payload of an older trainer: its config lacks arch_kwargs, class_names and the SE owners."""
    old = {"arch": "resnet18", "num_classes": 3, "input_size": 32, "surgery": {"reduction": 8, "init": "he"}}
    torch.manual_seed(0)
    original = build_model(old).eval()
    ckpt = tmp_path / "old.pt"
    torch.save({"model": original.state_dict(), "model_config": old, "epoch": 8}, ckpt)
    x = torch.randn(2, 3, 32, 32)
    model, info = load_checkpoint(ckpt)
    assert torch.equal(model(x), original(x)) and info == {"model_config": old, "epoch": 8}
    assert export.main([str(ckpt), str(tmp_path / "old.safetensors")]) == 0
    model, info = load_checkpoint(tmp_path / "old.safetensors")
    assert torch.equal(model(x), original(x)) and info == {"model_config": old, "epoch": 8}


_MARKED = """
import pathlib

pathlib.Path(__file__).with_name("imported").write_text("the module's code ran")

from tests.factories import small_resnet as build
"""


def test_export_never_imports_a_factory_and_its_file_keeps_the_trust_rule(tmp_path, capsys, monkeypatch) -> None:
    name = f"exported_strangers_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(_MARKED))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)
    from .factories import small_resnet

    torch.manual_seed(0)
    original = small_resnet(3).eval()
    config = {"arch": f"{name}:build", "arch_kwargs": {}, "num_classes": 3, "surgery": None, "input_size": 32}
    _, out, printed = _export(tmp_path, capsys, {"model": original.state_dict(), "model_config": config})
    assert f"load_checkpoint('{out}', factory='{name}:build')" in printed
    assert not (tmp_path / "imported").exists() and name not in sys.modules
    with pytest.raises(UntrustedFactory, match=f"{out} builds its model with the factory {name}:build, which"):
        load_checkpoint(out)
    assert not (tmp_path / "imported").exists()
    model, _ = load_checkpoint(out, factory=f"{name}:build")
    x = torch.randn(2, 3, 32, 32)
    assert (tmp_path / "imported").exists() and torch.equal(model(x), original(x))
    assert os.path.exists(out.with_suffix(".json"))
