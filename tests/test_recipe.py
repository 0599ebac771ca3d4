"""The recipe: the paper's numbers, the demo's scaling, validation, and one CLI flag per field."""

import dataclasses

import pytest

from se_surgery.errors import TrainError
from se_surgery.train.cli import build_parser
from se_surgery.train.recipe import DEMO, PAPER, Recipe, get_recipe


def test_paper_recipe_numbers():
    r = get_recipe("paper", "/data/imagenet").resolved()
    assert (r.arch, r.epochs, r.batch_size, r.lr, r.momentum, r.weight_decay) == ("resnet50", 100, 1024, 0.6, 0.9, 1e-4)
    assert (r.lr_step, r.lr_gamma, r.input_size, r.resize, r.min_scale, r.flip) == (30, 0.1, 224, 256, 0.08, True)
    assert r.class_aware and r.se and r.se_init == "he" and r.reduction == 16
    assert get_recipe("paper", batch_size=256).resolved().lr == pytest.approx(0.15)  # 0.6 x B / 1024
    assert r.mean == [0.485, 0.456, 0.406]


def test_default_recipe_follows_the_data():
    assert get_recipe().arch == DEMO.arch == "resnet18" and get_recipe().data == "digits"
    assert get_recipe(data="/data/imagenet") == dataclasses.replace(PAPER, data="/data/imagenet")
    with pytest.raises(TrainError, match="unknown recipe"):
        get_recipe("fast")


@pytest.mark.parametrize("change, match", [({"epochs": 0}, "epochs"), ({"min_scale": 0}, "min-scale"),
                                           ({"se_init": "zero"}, "se_init"), ({"mean": [0.5]}, "three")])
def test_bad_values_are_refused(change, match):
    with pytest.raises(TrainError, match=match):
        dataclasses.replace(DEMO, **change).resolved()


def test_round_trip_and_unknown_fields():
    r = DEMO.resolved()
    assert Recipe.from_dict(r.to_dict()) == r
    with pytest.raises(TrainError, match="unknown recipe field"):
        Recipe.from_dict({**r.to_dict(), "lr_warmup": 5})


def test_every_field_is_a_flag():
    parser = build_parser()
    dests = {a.dest for a in parser._actions}
    assert {f.name for f in dataclasses.fields(Recipe)} <= dests
    args = parser.parse_args(["--crop", "299", "--resize", "352", "--no-class-aware", "--mean", "0.1", "0.2", "0.3",
                              "--arch-kwargs", '{"zero_init_residual": true}'])
    assert (args.input_size, args.resize, args.class_aware, args.mean) == (299, 352, False, [0.1, 0.2, 0.3])
    assert args.arch_kwargs == {"zero_init_residual": True} and not hasattr(args, "epochs")  # unset: recipe decides
