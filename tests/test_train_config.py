"""The trainer's facts kept in one place each: the SE flags from SEConfig, the stored surgery, the metrics reader, the
rank, the recipe from flags, the file-system advice and the ``timm:`` prefix."""

import argparse
import errno
import json

import pytest
import torch
from torchvision.models import resnet18

from se_surgery import SEConfig, add_se
from se_surgery.cli import os_advice
from se_surgery.errors import TrainError
from se_surgery.train.checkpoint import _write_failed
from se_surgery.train.cli import build_parser
from se_surgery.train.distributed import is_rank_zero
from se_surgery.train.metrics import MetricsWriter, read_metrics
from se_surgery.train.models import build_model, make_model_config, split_arch
from se_surgery.train.recipe import PAPER, SE_FIELDS, get_recipe, recipe_from_flags
from se_surgery.train.run_lock import _os_message

# --- the SE flags come from SEConfig --------------------------------------------------------------------------------

def test_se_flags_take_their_choices_and_defaults_from_seconfig():
    actions = {a.dest: a for a in build_parser()._actions}
    choices, defaults = SEConfig.choices(), SEConfig.defaults()
    for field, option in SE_FIELDS.items():
        assert actions[field].choices == choices.get(option), field
        assert getattr(PAPER, field) == defaults[option], field
    assert set(choices) <= set(SE_FIELDS.values())  # every option with a choice list is a flag
    assert PAPER.se_config() == SEConfig()


def test_se_flags_that_do_not_fit_together_are_refused_before_any_work():
    with pytest.raises(TrainError, match="se_init='zero': use one of he, identity"):
        get_recipe(se_init="zero").resolved()
    with pytest.raises(TrainError, match="the SE flags do not fit together: init='identity' .* needs bias=True"):
        get_recipe(se_init="identity", se_bias=False).resolved()
    get_recipe(se_init="identity", se_bias=False, se=False).resolved()  # no SE: nothing to fit


# --- a stored surgery builds the model it built before -------------------------------------------------------------

OWNERS = ["layer1.0", "layer1.1", "layer2.0", "layer2.1", "layer3.0", "layer3.1", "layer4.0", "layer4.1"]


def _config(surgery):
    return {"arch": "resnet18", "arch_kwargs": {}, "num_classes": 3, "input_size": 32, "surgery": surgery}


@pytest.mark.parametrize("surgery, where, keywords", [
    ({"reduction": 16, "init": "he", "owners": OWNERS}, None, {}),  # a config from before the SE variants
    ({"reduction": 4, "init": "he", "where": ["4"], "squeeze": "max", "bias": False,
      "owners": ["layer4.0", "layer4.1"]},
     None, {"reduction": 4, "squeeze": "max", "bias": False}),
    ({"reduction": 8, "init": "he", "where": ["3"], "position": "pre", "excitation": "tanh", "owners": None},
     [3], {"reduction": 8, "position": "pre", "excitation": "tanh"}),
    ({"reduction": 16, "init": "he", "position": "standard", "squeeze": "avg", "excitation": "sigmoid", "bias": True,
      "owners": OWNERS}, None, {}),  # every option written out
])
def test_a_stored_surgery_builds_the_model_add_se_built(surgery, where, keywords):
    torch.manual_seed(0)
    built = build_model(_config(surgery)).eval()
    torch.manual_seed(0)
    owners = surgery["owners"]
    wanted = set(owners).__contains__ if owners is not None else where
    expected = add_se(resnet18(num_classes=3), where=wanted, example_input=torch.zeros(2, 3, 32, 32), inplace=True,
                      init=surgery["init"], **keywords).eval()
    assert list(built.state_dict()) == list(expected.state_dict())
    assert any(".se." in key for key in built.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(built(x), expected(x))


def test_the_standard_se_is_stored_as_before_and_the_variants_by_what_differs():
    recipe = get_recipe().resolved()
    assert make_model_config(recipe, ["a"], ["layer1.0"])["surgery"] == {"reduction": 16, "init": "he",
                                                                          "owners": ["layer1.0"]}
    variant = get_recipe(squeeze="max", se_bias=False, where=["4"], reduction=8).resolved()
    assert make_model_config(variant, ["a"])["surgery"] == {"reduction": 8, "init": "he", "squeeze": "max",
                                                            "bias": False, "where": ["4"], "owners": None}


# --- metrics.jsonl --------------------------------------------------------------------------------------------------

def _lines(*rows):
    return "".join(json.dumps(r) + "\n" for r in rows)


def test_the_metrics_reader_skips_a_torn_last_line_and_keeps_garbage_as_an_empty_row(tmp_path):
    assert read_metrics(tmp_path) == []
    (tmp_path / "metrics.jsonl").write_text(_lines({"epoch": 1}, {"epoch": 2}) + '{"epoch": 3, "val_to')  # a kill
    assert read_metrics(tmp_path) == [{"epoch": 1}, {"epoch": 2}]
    (tmp_path / "metrics.jsonl").write_text(_lines({"epoch": 1}) + "garbage\n\n" + _lines({"epoch": 2}))
    assert read_metrics(tmp_path) == [{"epoch": 1}, {}, {"epoch": 2}]
    (tmp_path / "metrics.jsonl").write_text(_lines({"epoch": 1}) + '{"epoch": 2}')  # whole, but for its newline
    assert read_metrics(tmp_path) == [{"epoch": 1}, {"epoch": 2}]


def test_a_resumed_writer_drops_a_torn_line_and_the_epochs_after_the_checkpoint(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(_lines({"epoch": 1}, {"epoch": 2}, {"epoch": 3}) + '{"epoch": 4, "lr')
    writer = MetricsWriter(tmp_path, keep_until=2)
    writer.write({"epoch": 2})  # already there: not written twice
    writer.write({"epoch": 3, "val_top1": 50.0})
    expected = _lines({"epoch": 1}, {"epoch": 2}, {"epoch": 3, "val_top1": 50.0})
    assert (tmp_path / "metrics.jsonl").read_text() == expected


# --- rank, recipe from flags, file-system advice, timm: prefix -----------------------------------------------------

def test_rank_zero_is_read_from_torchrun_s_environment(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    assert is_rank_zero()
    monkeypatch.setenv("RANK", "3")
    assert not is_rank_zero()


def test_recipe_from_flags_puts_given_flags_on_the_named_recipe_or_the_resumed_one():
    args = build_parser().parse_args(["--epochs", "3", "--squeeze", "max"])
    recipe = recipe_from_flags(args)
    assert (recipe.arch, recipe.epochs, recipe.squeeze, recipe.lr_step) == ("resnet18", 3, "max", 6)  # the demo's
    assert recipe_from_flags(args, defaults={"lr_step": 2, "epochs": 9}).lr_step == 2  # given flags win
    assert recipe_from_flags(args, defaults={"epochs": 9}).epochs == 3
    saved = get_recipe("paper", "/data/x", batch_size=256).to_dict()
    resumed = recipe_from_flags(args, saved=saved)
    assert (resumed.arch, resumed.batch_size, resumed.epochs, resumed.data) == ("resnet50", 256, 3, "/data/x")
    assert recipe_from_flags({"recipe": "paper", "data": "/data/x"}) == get_recipe("paper", "/data/x")
    assert recipe_from_flags(argparse.Namespace(recipe=None, out="x")) == get_recipe()


def test_one_file_system_advice_for_the_cli_the_checkpoint_and_the_lock(tmp_path):
    full, denied = OSError(errno.ENOSPC, "No space left on device"), OSError(errno.EACCES, "Permission denied")
    assert os_advice(full) == "free some disk space (or pick another --out)"
    assert os_advice(denied, folder="runs/a") == "make runs/a writable again"
    path = tmp_path / "last.pt"
    assert _write_failed(path, denied, replaced=False) == (
        f"cannot write the checkpoint {path} (Permission denied): no last.pt was written; make {tmp_path} writable "
        "again, then resume with --resume auto")
    assert _os_message(tmp_path, OSError(errno.EROFS, "Read-only file system")) == (
        f"cannot write to --out {tmp_path} (Read-only file system): pick a folder on a writable file system (this one "
        "is read-only)")


def test_split_arch():
    assert split_arch("timm:legacy_seresnet50") == ("timm", "legacy_seresnet50")
    assert split_arch("resnet50") == ("torchvision", "resnet50")
