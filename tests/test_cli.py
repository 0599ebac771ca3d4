"""Every CLI ends the same way: one line on stderr and exit 2 for a usage error argparse itself finds."""

import importlib

import pytest

from analysis import ablations, excitations
from se_surgery.train import cli as train_cli

describe = importlib.import_module("se_surgery.describe")


@pytest.mark.parametrize("main, args, message", [
    (train_cli.main, ["--epochs", "abc"], "argument --epochs: invalid int value: 'abc'"),
    (train_cli.main, ["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (describe.main, ["resnet50", "--reduction", "x"], "argument --reduction/-r: invalid int value: 'x'"),
    (excitations.main, ["--ckpt", "a.pt", "--batch-size", "many"], "argument --batch-size: invalid int value"),
    (excitations.main, [], "one of the arguments --ckpt --model is required"),
    (ablations.main, ["--table", "nope"], "argument --table: invalid choice: 'nope'"),
    (ablations.main, ["--table", "reduction", "--epochs", "two"], "argument --epochs: invalid int value: 'two'"),
])
def test_usage_errors_are_one_line_and_exit_2(main, args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2
    assert len(err.splitlines()) == 1 and message in err and err.endswith("--help)"), err
