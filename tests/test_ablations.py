"""`python -m analysis.ablations`: a tiny reduction sweep on the digits, its files, and its resume."""

from __future__ import annotations

import contextlib
import io

import matplotlib

matplotlib.use("Agg")

import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torchvision  # noqa: E402

import analysis.ablations as ablations  # noqa: E402
from analysis.ablations import TABLES, main  # noqa: E402

TINY = ["--epochs", "1", "--num-samples", "32", "--batch-size", "32", "--val-samples", "40", "--workers", "0"]


def sweep(out, variants: str, *extra: str, code: int = 0) -> str:
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(["--table", "reduction", "--variants", variants, "--out", str(out), "--no-progress", *TINY,
                     *extra]) == code
    return stdout.getvalue()


class Counting:
    """Wraps the trainer: counts the runs it is asked for, and can fail on the n-th like an interrupted sweep."""

    def __init__(self, fail_on: int | None = None) -> None:
        from se_surgery.train import train

        self.train, self.calls, self.fail_on = train, [], fail_on

    def __call__(self, recipe, out, **kw):
        self.calls.append(recipe.reduction)
        if len(self.calls) == self.fail_on:
            raise KeyboardInterrupt("the sweep is stopped here")
        return self.train(recipe, out, **kw)


def test_reduction_sweep_writes_measured_rows_and_resumes(tmp_path, monkeypatch) -> None:
    import se_surgery.train

    out = tmp_path / "sweep"
    interrupted = Counting(fail_on=2)
    monkeypatch.setattr(se_surgery.train, "train", interrupted)
    sweep(out, "r=8,r=16", code=130)  # Ctrl-C: one line, exit 130, the finished variant kept
    assert interrupted.calls == [8, 16]
    assert pd.read_csv(out / "ablations.csv")["variant"].tolist() == ["r=8"]  # the finished one is on record

    resumed = Counting()
    monkeypatch.setattr(se_surgery.train, "train", resumed)
    printed = sweep(out, "r=8,r=16")
    assert resumed.calls == [16]  # r=8 is never trained again
    again = Counting()
    monkeypatch.setattr(se_surgery.train, "train", again)
    sweep(out, "r=8,r=16")
    assert again.calls == []

    frame = pd.read_csv(out / "ablations.csv")
    assert frame["variant"].tolist() == ["r=8", "r=16"] and frame["run"].tolist() == ["se_reduction=8", "se"]
    assert set(ablations.COLUMNS) <= set(frame.columns)
    from se_surgery import add_se

    for r, params in zip((8, 16), frame["params"]):  # the independent count: add_se on a fresh ResNet-18
        assert params == sum(p.numel() for p in add_se(torchvision.models.resnet18(num_classes=10), r).parameters())
    assert frame["params"].iloc[0] > frame["params"].iloc[1] and (frame["macs"] > 0).all()
    assert frame["top1"].between(0, 100).all() and (frame["top5"] >= frame["top1"]).all()
    assert (frame["seconds"] > 0).all() and frame["paper_params_m"].tolist() == [30.7, 28.1]
    md = (out / "ablations.md").read_text()
    assert "Table 10" in md and "| r=8 |" in md and "30.7" in md and "r=8" in printed
    assert (out / "ablations.png").stat().st_size > 10_000 and (out / "ablations.pdf").read_bytes()[:4] == b"%PDF"


def test_sweep_refuses_another_recipe_in_the_same_folder(tmp_path, capsys) -> None:
    out = tmp_path / "sweep"
    out.mkdir()
    (out / "sweep.json").write_text('{"epochs": 99}\n')
    assert main(["--table", "reduction", "--variants", "r=8", "--out", str(out), *TINY]) == 2
    err = capsys.readouterr().err
    assert "holds a sweep of another recipe" in err and "epochs" in err
    assert main(["--table", "reduction", "--variants", "r=7", "--out", str(tmp_path / "x"), *TINY]) == 2
    assert "unknown variant(s) r=7" in capsys.readouterr().err


def test_every_table_has_the_papers_variants() -> None:
    assert [v.name for v in TABLES["reduction"][1]] == ["r=2", "r=4", "r=8", "r=16", "r=32"]
    assert [v.paper_params_m for v in TABLES["stage"][1]] == [25.6, 25.6, 25.7, 26.4, 28.1]
    assert [v.paper_top1_err for v in TABLES["integration"][1]] == [22.28, 22.23, 22.78, 22.20]
    assert {v.overrides.get("position") for v in TABLES["3x3"][1]} == {None, "3x3"}
    assert TABLES["nosqueeze"][1][1].overrides == {"squeeze": "none"} and TABLES["nosqueeze"][1][1].paper_gmacs == 4.27


def test_standard_se_config_is_unchanged_and_variants_are_recorded() -> None:
    """Runs trained before the variant fields resume: the standard SE's surgery config keeps its old keys."""
    from se_surgery.train import get_recipe
    from se_surgery.train.models import surgery_config

    assert surgery_config(get_recipe()) == {"reduction": 16, "init": "he"}
    assert surgery_config(get_recipe(where=["4"], squeeze="max", se_bias=False)) == {
        "reduction": 16, "init": "he", "where": ["4"], "squeeze": "max", "bias": False}
    assert surgery_config(get_recipe(se=False)) is None
