"""`python -m analysis.ablations`: a tiny reduction sweep on the digits, its files, and its resume; the commands it
prints for a scheduler and the collection of their run folders; its answers to bad input."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import io
import json
import os
import pathlib
import shlex

import matplotlib

matplotlib.use("Agg")

import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torchvision  # noqa: E402

import analysis.ablations as ablations  # noqa: E402
from analysis.ablations import NO_SE, TABLES, main  # noqa: E402
from tests.helpers import one_line_error  # noqa: E402

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
    assert [v.name for v in TABLES["reduction"][1]] == ["no SE (ResNet-50)", "r=2", "r=4", "r=8", "r=16", "r=32"]
    assert [v.paper.params_m for v in TABLES["stage"][1]] == [25.6, 25.6, 25.7, 26.4, 28.1]
    assert [v.paper.top1_err for v in TABLES["integration"][1]] == [None, 22.28, 22.23, 22.78, 22.20]
    assert {v.overrides.get("position") for v in TABLES["3x3"][1]} == {None, "3x3"}
    assert TABLES["nosqueeze"][1][1].overrides == {"squeeze": "none"} and TABLES["nosqueeze"][1][1].paper.gflops == 4.27
    # every table starts with the no-SE baseline (ResNet-50: 25.6M, 3.86 GFLOPs; no top-1 error in Tables 10-16)
    assert all(variants[0] is NO_SE for _, variants in TABLES.values())
    assert (NO_SE.overrides, NO_SE.paper.params_m, NO_SE.paper.gflops, NO_SE.paper.top1_err) == ({"se": False}, 25.6,
                                                                                                 3.86, None)
    from se_surgery.train import get_recipe

    runs = [item.run.name for item in ablations.plan(list(TABLES), get_recipe(), pathlib.Path("x"))]
    assert runs.count("no-se") == len(TABLES) and len(set(runs)) == 17  # the baseline is trained once, shared


def test_the_papers_numbers_come_from_se_surgery_paper_one_row_per_variant() -> None:
    """Every variant the sweep trains has its row in se_surgery.paper.ABLATIONS and every row a variant; the cost
    check counts rows of the same tables, so no number of the paper is written twice."""
    from se_surgery.paper import ABLATIONS, COST_TABLES, RESNET50

    assert {key: [v.name for v in variants[1:]] for key, (_, variants) in TABLES.items()} == {
        key: list(table.rows) for key, table in ABLATIONS.items()}
    assert all(v.paper is ABLATIONS[key].rows[v.name] for key, (_, vs) in TABLES.items() for v in vs[1:])
    assert NO_SE.paper is RESNET50 and TABLES["3x3"][0] == ABLATIONS["3x3"].title
    for key, variants in COST_TABLES.items():
        assert set(variants) - {"ResNet-50"} <= set(ABLATIONS[key].rows), key


def test_standard_se_config_is_unchanged_and_variants_are_recorded() -> None:
    """Runs trained before the variant fields resume: the standard SE's surgery config keeps its old keys."""
    from se_surgery.train import get_recipe
    from se_surgery.train.models import make_model_config, surgery_dict

    def stored(recipe):  # what a model_config records before the owners are known
        return surgery_dict(recipe.se_config(), recipe.where)

    assert stored(get_recipe()) == {"reduction": 16, "init": "he", "owners": None}
    assert stored(get_recipe(where=["4"], squeeze="max", se_bias=False)) == {
        "reduction": 16, "init": "he", "squeeze": "max", "bias": False, "where": ["4"], "owners": None}
    assert make_model_config(get_recipe(se=False).resolved(), ["a", "b"])["surgery"] is None


FLAGS = ["--seed", "3", "--arch-kwargs", "{}", "--no-bias", *TINY]  # JSON and a negated flag: quoting and --no-*


def printed_commands(out, *args: str) -> list[list[str]]:
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main([*args, "--out", str(out), "--print-commands"]) == 0
    return [shlex.split(line, comments=True) for line in stdout.getvalue().splitlines()]


def test_printed_commands_train_what_the_sweep_trains(tmp_path, monkeypatch) -> None:
    """Each printed line, parsed by the trainer's own parser and recipe builder, is the recipe the in-process sweep
    trains in the same run folder; nothing is trained to print them."""
    import se_surgery.train
    from se_surgery.train import cli as train_cli

    out = tmp_path / "a sweep"  # a space: the lines must be quoted
    trained: dict[pathlib.Path, object] = {}

    def fake_train(recipe, run, **kw):
        assert trained.setdefault(pathlib.Path(run), recipe) == recipe  # a shared folder: always the same recipe

    monkeypatch.setattr(se_surgery.train, "train", fake_train)
    lines = printed_commands(out, "--table", "all", "--launcher", "torchrun --nproc-per-node 2", *FLAGS)
    assert trained == {} and not any(out.glob("*/")) and (out / "sweep.json").exists()

    printed = {}
    for tokens in lines:
        assert tokens[:5] == ["torchrun", "--nproc-per-node", "2", "-m", "se_surgery.train"], tokens
        args = train_cli.build_parser().parse_args(tokens[5:])
        assert args.resume == "auto" and args.no_progress  # a requeued job continues its run
        recipe, start = train_cli._recipe_from(args)
        assert start.state is None and args.out not in printed
        printed[args.out] = recipe

    monkeypatch.setattr(ablations, "_measure", lambda run, recipe: dict.fromkeys(ablations._NUMERIC, 1))
    monkeypatch.setattr(ablations, "_write", lambda frame, out: None)
    with contextlib.redirect_stdout(io.StringIO()):  # the same folder: sweep.json agrees with the printed recipe
        assert main(["--table", "all", "--out", str(out), "--no-progress", *FLAGS]) == 0
    assert len(printed) == len(trained) == 17 and set(printed) == set(trained)
    for run, recipe in trained.items():
        differ = [f.name for f in dataclasses.fields(recipe)
                  if getattr(printed[run], f.name) != getattr(recipe, f.name)]
        assert differ == [], (run.name, differ)
    se, no_se, r2 = (printed[out / name] for name in ("se", "no-se", "se_reduction=2"))
    assert (se.lr_step, se.num_samples, se.epochs, se.seed, se.se_bias, se.arch_kwargs) == (3, 32, 1, 3, False, {})
    assert (no_se.se, r2.reduction, printed[out / "se_where=2"].where) == (False, 2, ["2"])

    plain = printed_commands(tmp_path / "b", "--table", "squeeze", "--variants", "max", *TINY)
    assert len(plain) == 1 and plain[0][:3] == ["python", "-m", "se_surgery.train"] and plain[0][-2:] == ["--squeeze",
                                                                                                        "max"]


def test_collect_measures_finished_runs_and_names_the_missing_ones(tmp_path, monkeypatch) -> None:
    """A job array trains one variant for real; --collect tabulates it and names the two it lacks; a later sweep in
    the same folder agrees on the recipe and never trains the collected one again."""
    import se_surgery.train
    from se_surgery import add_se
    from se_surgery.train import cli as train_cli

    out = tmp_path / "sweep"
    table = ["--table", "reduction", "--variants", "no SE (ResNet-50),r=8,r=16"]
    lines = {tokens[tokens.index("--out") + 1]: tokens for tokens in printed_commands(out, *table, *TINY)}
    assert set(lines) == {str(out / name) for name in ("no-se", "se_reduction=8", "se")}
    with contextlib.redirect_stdout(io.StringIO()):
        assert train_cli.main(lines[str(out / "se_reduction=8")][3:]) == 0  # the job of one variant
    (out / "no-se").mkdir()  # a job that started but has not finished an epoch

    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main([*table, "--out", str(out), "--collect"]) == 0  # no trainer flags: sweep.json has the recipe
    printed = stdout.getvalue()
    assert f"missing: {out / 'se'} (reduction r=16)" in printed
    assert f"unfinished (0 of 1 epochs): {out / 'no-se'} (reduction no SE (ResNet-50))" in printed
    assert "collected 1 of 3 run folder(s); 2 missing or unfinished" in printed and "| r=8 |" in printed
    frame = pd.read_csv(out / "ablations.csv")
    final = json.loads((out / "se_reduction=8" / "metrics.jsonl").read_text().splitlines()[-1])
    assert frame[["variant", "run", "epochs"]].values.tolist() == [["r=8", "se_reduction=8", 1]]
    assert frame["params"][0] == sum(p.numel() for p in add_se(torchvision.models.resnet18(num_classes=10), 8)
                                     .parameters())
    assert frame["top1"][0] == pytest.approx(final["val_top1"]) and frame["macs"][0] > 0
    assert "| r=8 |" in (out / "ablations.md").read_text() and (out / "ablations.png").stat().st_size > 10_000

    stopped = Counting(fail_on=1)  # the sweep of the same folder: r=8 is on record; it goes on with r=16
    monkeypatch.setattr(se_surgery.train, "train", stopped)
    with contextlib.redirect_stdout(io.StringIO()):
        args = ["--table", "reduction", "--variants", "r=8,r=16", "--out", str(out), "--no-progress", *TINY]
        assert main(args) == 130
    assert stopped.calls == [16] and pd.read_csv(out / "ablations.csv")["variant"].tolist() == ["r=8"]


def no_training(monkeypatch) -> None:
    import se_surgery.train

    def refuse(*args, **kwargs):
        raise AssertionError("bad input must be refused before any training")

    monkeypatch.setattr(se_surgery.train, "train", refuse)


@pytest.mark.parametrize("mode", [[], ["--print-commands"], ["--collect"]])
def test_bad_input_gets_one_line_before_any_training(tmp_path, capsys, monkeypatch, mode) -> None:
    no_training(monkeypatch)

    def error(out, *args: str) -> str:
        return one_line_error(main, capsys, ["--table", "reduction", "--out", str(out), *mode, *TINY, *args])

    def folder(name: str, **files: str | bytes) -> pathlib.Path:
        path = tmp_path / name
        path.mkdir()
        for file, text in files.items():
            (path / file.replace("_", ".")).write_bytes(text if isinstance(text, bytes) else text.encode())
        return path

    fix = "move it away and run again: the finished runs in"
    assert f"ablations.csv is not an ablations table (No columns to parse from file): {fix}" in error(
        folder("empty", ablations_csv=""))
    assert "ablations.csv is not an ablations table (" in error(folder("binary", ablations_csv=b"\x00\xff\xfe garbage"))
    assert "ablations.csv is not an ablations table (no table, variant, run column)" in error(
        folder("other", ablations_csv="a,b\n1,2\n"))
    assert "ablations.csv is not an ablations table (unknown table 'foo')" in error(
        folder("rows", ablations_csv=",".join(ablations.COLUMNS) + "\nfoo,r=8,x,1,1,1,1,1,1,,,\n"))
    broken = "sweep.json is not a sweep's recipe (not JSON): delete it if the run folders in"
    assert broken in error(folder("json", sweep_json="{not json"))
    assert "sweep.json is not a sweep's recipe (JSON, but a list" in error(folder("list", sweep_json="[1, 2]"))

    assert error(tmp_path / "v", "--reduction", "4").endswith(
        "--reduction is what Table 10 (reduction ratio r) varies, each variant sets it: drop it, "
        "or pick another --table")
    assert "--se/--no-se is what every table varies (each has the no-SE baseline row): drop it" in error(
        tmp_path / "v", "--no-se")
    assert "--where is what Table 13 (SE in one stage) varies" in one_line_error(
        main, capsys, ["--table", "all", "--out", str(tmp_path / "v"), *mode, "--where", "4"])
    assert not (tmp_path / "v").exists()

    (tmp_path / "file").write_text("not a folder")
    if mode == ["--collect"]:
        assert "file/sweep is not a sweep folder: run --print-commands" in error(tmp_path / "file" / "sweep")
    else:
        assert error(tmp_path / "file" / "sweep").endswith(
            "(Not a directory): a part of the path is a file, not a folder: pick another path")
        assert error(tmp_path / "file").endswith(
            "(File exists): the path exists and is not a folder: pick another path")
    assert (tmp_path / "file").read_text() == "not a folder"


def test_a_read_only_out_gets_one_line_before_any_training(tmp_path, capsys, monkeypatch) -> None:
    no_training(monkeypatch)
    locked = tmp_path / "locked"
    locked.mkdir()
    real = pathlib.Path.write_text

    def read_only(path, *args, **kwargs):  # what a read-only folder answers, also to root (who may write anyway)
        if locked in path.parents:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real(path, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(pathlib.Path, "write_text", read_only)
        for mode in ([], ["--print-commands"], ["--collect"]):
            err = one_line_error(main, capsys, ["--table", "reduction", "--out", str(locked), *mode, *TINY])
            assert err.endswith(f"cannot use {locked / 'sweep.json'} (Permission denied): pick a folder you can write "
                                "to, or fix its permissions"), err
    assert list(locked.iterdir()) == []
    locked.chmod(0o555)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as root: a folder's mode does not stop writes (the patched case above ran)")
        err = one_line_error(main, capsys, ["--table", "reduction", "--out", str(locked), "--print-commands", *TINY])
        assert "(Permission denied): pick a folder you can write to" in err
    finally:
        locked.chmod(0o755)
