"""Fine-tuning from a weights file: ``--recipe finetune --weights FILE``, a new head, frozen backbones, the schedule."""

import dataclasses
import json
import math
import shutil

import pytest
import torch

from se_surgery.train import get_recipe, train
from se_surgery.train.checkpoint import load_checkpoint, read_checkpoint
from se_surgery.train.cli import main
from se_surgery.train.data import build_dataset
from se_surgery.train.recipe import FINETUNE
from se_surgery.train.schedule import lr_at

# 10 steps of 32 images an epoch; every val image, so that top-1 compares to 0.1 point
SHORT = dict(epochs=1, num_samples=320, batch_size=32, workers=0)
SHORT_FLAGS = ["--epochs", "1", "--num-samples", "320", "--batch-size", "32", "--no-progress"]


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _top1(model, cfg):
    val = build_dataset(cfg["data"], "val", input_size=cfg["input_size"], resize=cfg["resize"], mean=cfg["mean"],
                        classes=cfg["class_names"] if len(cfg["class_names"]) < 10 else None)
    with torch.no_grad():
        images = torch.stack([val[i][0] for i in range(len(val))])
        return 100 * (model(images).argmax(1) == torch.tensor(val.targets)).double().mean().item()


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """A plain ResNet-18 trained for 2 demo epochs (88 steps: fewer leave its BatchNorm statistics at chance in eval);
    its state_dict saved alone with torch.save, and its val top-1."""
    root = tmp_path_factory.mktemp("plain")
    train(get_recipe(se=False, epochs=2, workers=0), root / "run", progress=False)
    model, info = load_checkpoint(root / "run" / "best.pt")
    torch.save(model.state_dict(), root / "plain.pt")
    return root / "plain.pt", _top1(model, info["model_config"]), root / "run"


def test_plain_weights_train_as_se_model_and_epoch_0_equals_the_plain_model(plain, tmp_path):
    weights, top1, _ = plain
    assert 20 < top1 < 100  # the weights learned something: the comparison below is not of two chance levels
    out = tmp_path / "ft"
    assert main(["--recipe", "finetune", "--weights", str(weights), "--out", str(out), *SHORT_FLAGS]) == 0
    rows = _metrics(out)
    assert [r["epoch"] for r in rows] == [0, 1]
    assert rows[0]["val_top1"] == pytest.approx(top1, abs=0.1)  # identity SE: the plain model's outputs
    info = read_checkpoint(out / "last.pt")
    assert info["config"]["se_init"] == "identity" and info["config"]["schedule"] == "cosine"
    assert sum(".se." in k for k in info["model"]) == 32  # 8 blocks x fc1/fc2 x weight/bias
    new = set(info["groups"]["new"])
    assert new and all(".se." in k for k in new) and info["groups"]["frozen"] == []
    groups = info["optimizer"]["param_groups"]
    assert [g["name"] for g in groups] == ["pretrained", "new"]
    # the new parameters at the from-scratch rate, the pretrained ones at a tenth; both on the same schedule
    assert rows[1]["se_lr"] == pytest.approx(10 * rows[1]["lr"])
    assert groups[1]["lr"] == pytest.approx(10 * groups[0]["lr"])


def test_se_weights_load_after_add_se_and_an_ema_or_head_flag_is_checked(plain, tmp_path, capsys):
    weights, _, _ = plain
    first = tmp_path / "first"
    train(get_recipe("finetune", weights=str(weights), **SHORT), first, progress=False)
    se_model, info = load_checkpoint(first / "last.pt")
    se_file = tmp_path / "se.pt"
    torch.save({"state_dict": se_model.state_dict()}, se_file)
    out = tmp_path / "again"
    assert main(["--recipe", "finetune", "--weights", str(se_file), "--out", str(out), *SHORT_FLAGS]) == 0
    assert _metrics(out)[0]["val_top1"] == pytest.approx(_top1(se_model, info["model_config"]), abs=1e-9)
    assert read_checkpoint(out / "last.pt")["groups"]["new"] == []  # the SE came from the file: not new


def test_new_head_on_a_class_subset(plain, tmp_path):
    weights, _, _ = plain
    out = tmp_path / "subset"
    assert main(["--recipe", "finetune", "--weights", str(weights), "--classes", "5", "6", "7", "8", "9",
                 "--out", str(out), *SHORT_FLAGS]) == 0
    info = read_checkpoint(out / "last.pt")
    assert info["model_config"]["class_names"] == ["5", "6", "7", "8", "9"]
    assert info["model"]["fc.weight"].shape == (5, 512)
    assert {"fc.weight", "fc.bias"} <= set(info["groups"]["new"])
    rows = _metrics(out)
    assert rows[0]["epoch"] == 0 and rows[0]["val_top1"] < 60  # a random 5-way head before any step
    model, _ = load_checkpoint(out / "last.pt")
    assert _top1(model, info["model_config"]) == pytest.approx(rows[-1]["val_top1"], abs=1e-9)


def test_same_class_count_keeps_the_head_unless_new_head(plain, tmp_path):
    weights, top1, _ = plain
    # seed 1: with the pretraining's seed the "new" head would be the very head that pretraining started from
    recipe = get_recipe("finetune", weights=str(weights), new_head=True, seed=1, **{**SHORT, "num_samples": 32})
    train(recipe, tmp_path / "new", progress=False)
    assert {"fc.weight", "fc.bias"} <= set(read_checkpoint(tmp_path / "new" / "last.pt")["groups"]["new"])
    assert abs(_metrics(tmp_path / "new")[0]["val_top1"] - top1) > 5  # a random head: not the plain model's outputs
    train(dataclasses.replace(recipe, new_head=False), tmp_path / "kept", progress=False)
    assert "fc.weight" not in read_checkpoint(tmp_path / "kept" / "last.pt")["groups"]["new"]
    assert _metrics(tmp_path / "kept")[0]["val_top1"] == pytest.approx(top1, abs=0.1)


def test_freeze_backbone_trains_only_se_and_classifier(plain, tmp_path):
    weights, _, _ = plain
    out = tmp_path / "frozen"
    train(get_recipe("finetune", weights=str(weights), freeze_backbone=True, **SHORT), out, progress=False)
    before, after = torch.load(weights, weights_only=True), read_checkpoint(out / "last.pt")["model"]
    backbone = [k for k in before if not k.startswith("fc.")]
    # the BatchNorm before each SE (bn2 of every block) was divided by the gates' start, 0.5, once; nothing else moved
    rescaled = {k for k in backbone if ".bn2." in k and k.endswith(("weight", "bias"))}
    assert len(rescaled) == 16 and all(torch.equal(before[k] / 0.5, after[k]) for k in rescaled)
    assert all(torch.equal(before[k], after[k]) for k in backbone if k not in rescaled)  # running statistics too
    assert not torch.equal(before["fc.weight"], after["fc.weight"])
    se = [k for k in after if ".se." in k]
    assert se and any(after[k].abs().sum() > 0 for k in se if k.endswith("fc2.weight"))  # fc2 moved off 0
    assert len(read_checkpoint(out / "last.pt")["groups"]["frozen"]) == len(
        [k for k, v in before.items() if not k.startswith("fc.") and v.is_floating_point()
         and "running" not in k]
    )


def test_finetune_resume_is_bit_identical(plain, tmp_path, monkeypatch):
    """Stopped after step 2 of epoch 2 and resumed in another folder: the same weights, rates and metrics."""
    weights, _, _ = plain
    import se_surgery.train.loop as loop

    side = tmp_path / "side.pt"
    saving = loop.save_checkpoint

    def keep_copy(path, payload):
        saving(path, payload)
        if path.name == "last.pt" and (payload["epoch"], payload["epoch_step"]) == (1, 2):
            shutil.copy(path, side)

    monkeypatch.setattr(loop, "save_checkpoint", keep_copy)
    recipe = get_recipe("finetune", weights=str(weights), ckpt_every=2, **{**SHORT, "epochs": 2})
    train(recipe, tmp_path / "whole", progress=False)
    monkeypatch.setattr(loop, "save_checkpoint", saving)
    train(recipe, tmp_path / "resumed", resume=side, progress=False)
    a, b = read_checkpoint(tmp_path / "whole" / "last.pt"), read_checkpoint(tmp_path / "resumed" / "last.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    timing = {"images_per_s", "seconds"}
    rows = [[{k: v for k, v in m.items() if k not in timing} for m in _metrics(tmp_path / d)]
            for d in ("whole", "resumed")]
    assert rows[0][-1] == rows[1][-1] and rows[0][-1]["epoch"] == 2


def test_schedule_rates():
    step = get_recipe(lr=0.6, lr_step=2, lr_gamma=0.1, epochs=7).resolved()
    reference = torch.optim.lr_scheduler.StepLR(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.6), 2, 0.1)
    for epoch in range(7):  # the same bits as StepLR, which old checkpoints resume from
        assert lr_at(0.6, step, epoch, 3, 10) == reference.get_last_lr()[0]
        reference.optimizer.step()
        reference.step()
    cosine = get_recipe("finetune", epochs=4).resolved()  # warmup 1 epoch
    assert lr_at(1.0, cosine, 0, 0, 10) == pytest.approx(0.1 * 0.5 * (1 + math.cos(0)))
    assert lr_at(1.0, cosine, 0, 9, 10) == pytest.approx(1.0 * 0.5 * (1 + math.cos(math.pi * 9 / 40)))
    assert lr_at(2.0, cosine, 2, 0, 10) == pytest.approx(1.0)
    assert lr_at(1.0, cosine, 3, 9, 10) == pytest.approx(0.5 * (1 + math.cos(math.pi * 39 / 40)))
    assert FINETUNE["*"]["se_init"] == "identity"
    assert get_recipe("finetune", "/data/x").resolved().std == [0.229, 0.224, 0.225]


def test_old_checkpoint_with_a_step_scheduler_still_resumes(plain, tmp_path):
    """A checkpoint written before the per-step rates: a ``scheduler`` state, no ``groups``, older recipe fields."""
    _, _, run = plain
    out = tmp_path / "old"
    shutil.copytree(run, out)
    payload = torch.load(out / "last.pt", weights_only=True)
    payload.pop("groups")
    payload["scheduler"] = {"step_size": 30, "gamma": 0.1, "base_lrs": [0.1], "last_epoch": 1, "_step_count": 2}
    for key in ("weights", "ema", "new_head", "freeze_backbone", "se_lr", "schedule", "warmup_epochs", "std",
                "classes"):
        payload["config"].pop(key)
    for group in payload["optimizer"]["param_groups"]:
        group.pop("name")
    torch.save(payload, out / "last.pt")
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k in payload["config"]}))
    assert main(["--out", str(out), "--resume", "auto", "--epochs", "2", "--no-progress"]) == 0
    assert [r["epoch"] for r in _metrics(out)] == [1, 2]
    assert _metrics(out)[1]["lr"] == pytest.approx(0.1)


@pytest.mark.parametrize("args, message", [
    (["--weights", "w.pt", "--pretrained"], "both give the starting weights"),
    (["--ema"], "--ema picks the EMA weights of a --weights file"),
    (["--freeze-backbone"], "--freeze-backbone keeps pretrained weights fixed"),
    (["--new-head"], "--new-head replaces the classifier"),
    (["--se-lr", "-1"], "--se-lr -1.0 must be a positive finite number"),
    (["--warmup-epochs", "nan"], "--warmup-epochs nan must be a finite number >= 0"),
    (["--classes", "3", "3"], "name each class folder once"),
    (["--classes", "x"], "--classes x: no such class in digits"),
])
def test_bad_fine_tuning_flags_are_one_line(tmp_path, capsys, args, message):
    assert main(["--out", str(tmp_path / "r"), "--no-progress", *SHORT_FLAGS, *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


class _Payload:
    """Pickled, it would create ``self.marker`` on load: what a stranger's weights file could do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_trainer_reads_safetensors_and_refuses_a_pickle_payload(plain, tmp_path, capsys):
    from safetensors.torch import save_file

    weights, top1, _ = plain
    file = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in torch.load(weights, weights_only=True).items()}, str(file))
    out = tmp_path / "st"
    assert main(["--recipe", "finetune", "--weights", str(file), "--out", str(out), *SHORT_FLAGS,
                 "--num-samples", "32"]) == 0
    assert _metrics(out)[0]["val_top1"] == pytest.approx(top1, abs=0.1)
    marker, evil = tmp_path / "ran", tmp_path / "evil.pt"
    torch.save({"state_dict": torch.load(weights, weights_only=True), "extra": _Payload(marker)}, evil)
    capsys.readouterr()
    assert main(["--recipe", "finetune", "--weights", str(evil), "--out", str(tmp_path / "evil"),
                 *SHORT_FLAGS]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "refusing to run its code" in err[0], err
    assert not marker.exists() and not (tmp_path / "evil" / "last.pt").exists()


def test_gates_that_start_at_one_hardly_learn_those_at_one_half_do(plain, tmp_path):
    """The sigmoid's slope s (1 - s) is 5e-5 at identity init's s = 1: --gate-start 0.5 is the recipe's for that."""
    weights, top1, _ = plain
    moved = {}
    for start in (1.0, 0.5):
        out = tmp_path / f"gates{start}"
        train(get_recipe("finetune", weights=str(weights), gate_start=start, **SHORT), out, progress=False)
        assert _metrics(out)[0]["val_top1"] == pytest.approx(top1, abs=0.1)  # both keep the plain model's outputs
        state = read_checkpoint(out / "last.pt")["model"]
        moved[start] = max(float(v.abs().max()) for k, v in state.items() if k.endswith("se.fc2.weight"))
    assert moved[1.0] < 1e-4 and moved[0.5] > 1e-3 and moved[0.5] > 1000 * moved[1.0], moved


def test_a_run_on_some_classes_is_studied_on_those(plain, tmp_path):
    """analysis.excitations --ckpt of a --classes run reads the same classes (and std) the run was trained on."""
    import pandas as pd

    from analysis.excitations import main as excitations

    weights, _, _ = plain
    out = tmp_path / "subset"
    train(get_recipe("finetune", weights=str(weights), classes=["5", "6", "7"], std=[0.5, 0.5, 0.5],
                     **{**SHORT, "num_samples": 32}), out, progress=False)
    assert excitations(["--ckpt", str(out / "last.pt"), "--per-class", "3", "--out", str(tmp_path / "study"),
                        "--no-progress"]) == 0
    csv = pd.read_csv(tmp_path / "study" / "excitations.csv")
    assert set(csv[csv["class"] != "all"]["class"].astype(str)) == {"5", "6", "7"}
