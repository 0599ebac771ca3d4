"""`python -m analysis.ablations --table reduction|...|all`: the SENet paper's ablation Tables 10-16 as one command.

Each variant of a table is trained through the trainer (:func:`se_surgery.train.train`) with one recipe and one seed
(the trainer's flags pass through: ``--data``, ``--arch``, ``--epochs``, ...; run it under ``torchrun`` for many
GPUs), then measured: parameters, multiply-adds at the recipe's input size, final val top-1 / top-5 (%), training
seconds. ``--out`` (default ``runs/ablations``) gets one run folder per distinct variant (the standard SE is trained
once and shared by every table that has it), ``ablations.csv``, ``ablations.md`` (our numbers beside the paper's)
and ``ablations.{png,pdf}``. A sweep resumes where it stopped: a variant with a row in ``ablations.csv`` is never
trained again, and a half-trained one continues from its ``last.pt``.

On a cluster, ``--print-commands`` prints one trainer command per run folder (for a job array or any scheduler) and
trains nothing; once the jobs have run, ``--collect`` measures the run folders that have finished, writes the same
three files, and names the runs still missing. Both record the base recipe in ``sweep.json`` like a sweep, so the
commands, the collection and an in-process sweep of one folder agree on it.

Every table also has the no-SE baseline (``no-se``, trained once and shared, like the standard SE). The paper's
numbers are SE-ResNet-50 (and ResNet-50 for the baseline) on ImageNet, from its Tables 10-16: parameters in
millions, GFLOPs (multiply-adds) and top-1 error (%), where the paper gives them (:data:`se_surgery.paper.ABLATIONS`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import pandas as pd

from analysis.errors import AnalysisError
from se_surgery.cli import ArgumentParser, run_cli
from se_surgery.paper import ABLATIONS, RESNET50, Reported

__all__ = ["TABLES", "Variant", "collect", "commands", "main", "sweep"]


@dataclass(frozen=True)
class Variant:
    """One row of a paper table: the recipe fields it changes (what to train), and the paper's numbers for it."""

    name: str
    overrides: dict[str, Any] = field(default_factory=dict)
    paper: Reported = Reported()


NO_SE = Variant("no SE (ResNet-50)", {"se": False}, RESNET50)
"""The baseline of every table, trained once and shared."""

_TRAINED: dict[str, dict[str, dict[str, Any]]] = {
    "reduction": {f"r={r}": {"reduction": r} for r in (2, 4, 8, 16, 32)},
    "squeeze": {"avg": {"squeeze": "avg"}, "max": {"squeeze": "max"}},
    "excitation": {"relu": {"excitation": "relu"}, "tanh": {"excitation": "tanh"},
                   "sigmoid": {"excitation": "sigmoid"}},
    "stage": {"SE stage 2": {"where": ["2"]}, "SE stage 3": {"where": ["3"]}, "SE stage 4": {"where": ["4"]},
              "SE all": {}},
    "integration": {"SE": {"position": "standard"}, "SE-PRE": {"position": "pre"}, "SE-POST": {"position": "post"},
                    "SE-Identity": {"position": "identity"}},
    "3x3": {"SE": {}, "SE 3x3": {"position": "3x3"}},
    "nosqueeze": {"NoSqueeze": {"squeeze": "none"}, "SE": {}},
}
"""What the sweep trains: per table of :data:`se_surgery.paper.ABLATIONS`, each variant's recipe fields."""

TABLES: dict[str, tuple[str, list[Variant]]] = {
    key: (ABLATIONS[key].title, [NO_SE, *(Variant(name, fields, ABLATIONS[key].rows[name])
                                          for name, fields in variants.items())])
    for key, variants in _TRAINED.items()
}
"""Per ``--table``: the paper's title and its variants, the no-SE baseline first."""

ALL = "all"

DIGITS_SWEEP = {"epochs": 4, "lr_step": 3, "num_samples": 960}
"""A "table on digits" default: the demo recipe cut to 4 epochs of 960 images (120 steps a variant); every flag
given on the command line wins."""

COLUMNS = ["table", "variant", "run", "params", "macs", "top1", "top5", "seconds", "epochs",
           "paper_top1_err", "paper_params_m", "paper_gmacs"]
_NUMERIC = ["params", "macs", "top1", "top5", "seconds", "epochs"]
# What a run may differ in from its variant's recipe and still be that variant: speed and checkpointing options.
_MACHINERY = ("workers", "amp", "channels_last", "compile", "sync_bn", "ckpt_every", "eval_batch_size", "epochs")
TRAINER = "se_surgery.train"


@dataclass(frozen=True)
class Planned:
    """One variant of one table: its run folder and the recipe trained there."""

    table: str
    variant: Variant
    run: Path
    recipe: Any


def _changed(overrides: dict[str, Any], base: Any) -> dict[str, Any]:
    return {k: v for k, v in overrides.items() if getattr(base, k) != v}


def _run_name(overrides: dict[str, Any], base: Any) -> str:
    """The run folder of a variant: the recipe fields it changes from ``base`` (``se`` = the standard SE)."""
    changed = _changed(overrides, base)
    if changed.get("se") is False:
        return "no-se"
    parts = [f"{k}={'+'.join(map(str, v)) if isinstance(v, list) else v}" for k, v in sorted(changed.items())]
    return "se" + "".join(f"_{p}" for p in parts)


def plan(tables: Sequence[str], recipe: Any, out: Path, variants: Sequence[str] | None = None) -> list[Planned]:
    """Every variant of ``tables`` (only ``variants``, if given), in table order, with its run folder and recipe."""
    return [Planned(table, v, out / _run_name(v.overrides, recipe), dataclasses.replace(recipe, **v.overrides))
            for table in tables for v in TABLES[table][1] if not variants or v.name in variants]


def _epochs_done(run: Path) -> int:
    """The last finished epoch in ``run/metrics.jsonl`` (0: none; a torn last line counts as not written)."""
    from se_surgery.train.metrics import read_metrics

    done = 0
    for row in read_metrics(run):
        try:
            done = max(done, int(row["epoch"]))
        except (ValueError, KeyError, TypeError):
            continue
    return done


def _finished(run: Path, epochs: int) -> bool:
    return _epochs_done(run) >= epochs


def _measure(run: Path, recipe: Any) -> dict[str, Any]:
    """Parameters, multiply-adds, final val top-1/top-5 and training seconds of a finished run."""
    from se_surgery.surgery.cost import count_macs, count_parameters
    from se_surgery.train.checkpoint import load_checkpoint
    from se_surgery.train.metrics import read_metrics

    model, _ = load_checkpoint(run / "last.pt", map_location="cpu", factory=recipe.arch)  # the user named --arch
    epochs = [row for row in read_metrics(run) if row.get("epoch", 0) > 0]  # a run from weights has an epoch-0 row
    final = epochs[-1]
    return {
        "params": count_parameters(model),
        "macs": count_macs(model, (1, 3, recipe.input_size, recipe.input_size)),
        "top1": final["val_top1"],
        "top5": final["val_top5"],
        "seconds": round(sum(e["seconds"] for e in epochs), 1),
        "epochs": final["epoch"],
    }


def _row(item: Planned) -> dict[str, Any]:
    v = item.variant
    return {"table": item.table, "variant": v.name, "run": item.run.name, **_measure(item.run, item.recipe.resolved()),
            "paper_top1_err": v.paper.top1_err, "paper_params_m": v.paper.params_m, "paper_gmacs": v.paper.gflops}


def _read_sweep_json(out: Path) -> dict[str, Any] | None:
    """The base recipe recorded in ``out/sweep.json`` (``None``: no such file); a damaged one is refused."""
    path = out / "sweep.json"
    if not path.exists():
        return None
    try:
        saved = json.loads(path.read_text())
        problem = None if isinstance(saved, dict) else f"JSON, but a {type(saved).__name__}, not a recipe's object"
    except ValueError:  # a JSONDecodeError, or bytes that are not UTF-8
        problem = "not JSON"
    if problem:
        raise AnalysisError(f"{path} is not a sweep's recipe ({problem}): delete it if the run folders in {out} were "
                            "trained with these flags (the next command records them again), or pick another --out")
    return saved


def _check_same_recipe(out: Path, recipe: Any) -> None:
    """A sweep folder holds runs of one base recipe: refuse to mix in runs of another; record it in sweep.json."""
    saved = _read_sweep_json(out)
    mine = json.loads(json.dumps(recipe.to_dict()))
    if saved is not None and saved != mine:
        diff = sorted(k for k in set(saved) | set(mine) if saved.get(k) != mine.get(k))
        raise AnalysisError(f"{out} holds a sweep of another recipe ({', '.join(diff)} differ): pass the same trainer "
                            "flags to resume it, or another --out")
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps(mine, indent=2) + "\n")


def _read_rows(out: Path) -> list[dict[str, Any]]:
    """The rows of ``out/ablations.csv`` (none if it does not exist); a damaged file is refused, not overwritten."""
    csv = out / "ablations.csv"
    if not csv.exists():
        return []
    fix = (f"move it away and run again: the finished runs in {out} are measured again from their folders, nothing "
           "is retrained")
    try:
        frame = pd.read_csv(csv, dtype={"variant": str})
    except (ValueError, UnicodeDecodeError, pd.errors.ParserError) as error:  # EmptyDataError is a ValueError
        raise AnalysisError(f"{csv} is not an ablations table ({' '.join(str(error).split())[:80]}): {fix}") from None
    missing = [c for c in COLUMNS if c not in frame.columns]
    if missing:
        raise AnalysisError(f"{csv} is not an ablations table (no {', '.join(missing[:3])} column): {fix}")
    unknown = sorted(set(frame["table"].astype(str)) - set(TABLES))
    bad = [c for c in _NUMERIC if not pd.api.types.is_numeric_dtype(frame[c])]
    if unknown or bad:
        what = f"unknown table {unknown[0]!r}" if unknown else f"non-numeric {bad[0]}"
        raise AnalysisError(f"{csv} is not an ablations table ({what}): {fix}")
    return frame[COLUMNS].to_dict("records")


def _merge(rows: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``rows`` with each of ``new`` in place of the row of the same table and variant (appended if none)."""
    key = {(r["table"], r["variant"]): r for r in new}
    merged = [key.pop((r["table"], r["variant"]), r) for r in rows]
    return merged + [r for r in new if (r["table"], r["variant"]) in key]


def sweep(tables: Sequence[str], recipe: Any, out: Path, *, variants: Sequence[str] | None = None,
          progress: bool = True) -> pd.DataFrame:
    """Train and measure every variant of ``tables`` (skipping those already in ``out/ablations.csv``).

    Args:
        tables: Keys of :data:`TABLES`.
        recipe: The base recipe (a :class:`se_surgery.train.Recipe`); each variant changes a few fields.
        out: The sweep folder.
        variants: Only these variant names (e.g. ``["r=8", "r=16"]``); ``None`` = all.
        progress: The trainer's tqdm bars.

    Returns:
        Every row of ``ablations.csv`` (the ones of earlier invocations too).
    """
    from se_surgery.train import train
    from se_surgery.train.distributed import is_rank_zero

    writer = is_rank_zero()
    rows = _read_rows(out)
    if writer:
        _check_same_recipe(out, recipe)
    out.mkdir(parents=True, exist_ok=True)
    done = {(r["table"], r["variant"]) for r in rows}
    todo = [item for item in plan(tables, recipe, out, variants) if (item.table, item.variant.name) not in done]
    for item in todo:
        if not _finished(item.run, item.recipe.epochs):
            train(item.recipe, item.run, resume="auto", progress=progress)
        rows.append(_row(item))
        if writer:
            _write(pd.DataFrame(rows, columns=COLUMNS), out)
    frame = pd.DataFrame(rows, columns=COLUMNS)
    if writer and rows:
        _write(frame, out)
    return frame


def _why_not_done(item: Planned) -> str | None:
    """``None`` for a run that has finished its variant's recipe, else what it lacks."""
    run, epochs = item.run, item.recipe.epochs
    if not run.exists():
        return "missing"
    done = _epochs_done(run)
    if done < epochs:
        return f"unfinished ({done} of {epochs} epochs)"
    if not (run / "last.pt").exists():
        return "unfinished (no last.pt)"
    try:
        config = json.loads((run / "config.json").read_text())
    except (OSError, ValueError):
        return "unfinished (no readable config.json)"
    expected = json.loads(json.dumps(item.recipe.resolved().to_dict()))
    differ = sorted(k for k in expected if k not in _MACHINERY and config.get(k) != expected[k])
    if differ:
        return f"trained with another recipe ({', '.join(differ)} differ; move it away and train it again)"
    return None


def collect(tables: Sequence[str], recipe: Any, out: Path, *,
            variants: Sequence[str] | None = None) -> tuple[pd.DataFrame, list[str]]:
    """Measure the finished run folders of ``tables`` (trained e.g. by :func:`commands` on a scheduler) and write
    ``ablations.csv``/``.md``/``.png``/``.pdf``; train nothing.

    Returns:
        Every row of ``ablations.csv`` (earlier ones of other variants kept), and one line per run folder that is
        missing or unfinished (naming its variants), in plan order.
    """
    if not out.is_dir():
        raise AnalysisError(f"{out} is not a sweep folder: run --print-commands (and the commands) or a sweep first")
    rows = _read_rows(out)
    _check_same_recipe(out, recipe)
    new, missing = [], {}
    for item in plan(tables, recipe, out, variants):
        why = _why_not_done(item)
        if why is None:
            new.append(_row(item))
        else:
            missing.setdefault((why, item.run), []).append(f"{item.table} {item.variant.name}")
    rows = _merge(rows, new)
    frame = pd.DataFrame(rows, columns=COLUMNS)
    if rows:
        _write(frame, out)
    return frame, [f"{why}: {run} ({'; '.join(names)})" for (why, run), names in missing.items()]


def _trainer_flag(name: str) -> argparse.Action:
    from se_surgery.train.cli import build_parser as trainer_parser

    return next(a for a in trainer_parser()._actions if a.dest == name)


def _flags(name: str, value: Any) -> list[str]:
    """The trainer's command-line tokens that set the recipe field ``name`` to ``value``."""
    action = _trainer_flag(name)
    if isinstance(action, argparse.BooleanOptionalAction):
        return [next(f for f in action.option_strings if f.startswith("--no-") != bool(value))]
    flag = action.option_strings[0]
    if isinstance(value, (list, tuple)):
        return [flag, *map(str, value)]
    return [flag, json.dumps(value) if isinstance(value, dict) else str(value)]


def commands(tables: Sequence[str], trainer_args: Sequence[str], out: Path, *,
             variants: Sequence[str] | None = None, launcher: Sequence[str] = ("python",)) -> list[str]:
    """One shell line per distinct run folder of ``tables``: the trainer command that trains exactly what
    :func:`sweep` would train there (``trainer_args``, the :data:`DIGITS_SWEEP` defaults where they apply, the
    variant's fields), with ``--resume auto`` so a rerun of a job continues it, and a comment naming its variants.

    Args:
        launcher: What runs ``-m se_surgery.train``: ``("python",)``, or e.g. ``("torchrun", "--nproc-per-node", "8")``.
    """
    args = _parse_trainer_flags(trainer_args)
    recipe = base_recipe(trainer_args)
    base = [*trainer_args, *(t for k, v in _sweep_defaults(args).items() for t in _flags(k, v))]
    lines: dict[Path, tuple[list[str], list[str]]] = {}
    for item in plan(tables, recipe, out, variants):
        item.recipe.resolved()  # a value the trainer would refuse is refused here, before any job is queued
        own = [t for k, v in _changed(item.variant.overrides, recipe).items() for t in _flags(k, v)]
        tokens = [*launcher, "-m", TRAINER, "--out", str(item.run), "--resume", "auto", "--no-progress", *base, *own]
        lines.setdefault(item.run, (tokens, []))[1].append(f"{item.table} {item.variant.name}")
    return [f"{shlex.join(tokens)}  # {'; '.join(names)}" for tokens, names in lines.values()]


def _write(frame: pd.DataFrame, out: Path) -> None:
    """ablations.csv (atomically: a crash never leaves half a file), ablations.md and the plot."""
    tmp = out / "ablations.csv.tmp"
    frame.to_csv(tmp, index=False)
    tmp.replace(out / "ablations.csv")
    (out / "ablations.md").write_text(markdown(frame))
    fig = plot_ablations(frame)
    for ext in ("png", "pdf"):
        fig.savefig(out / f"ablations.{ext}", dpi=150, bbox_inches="tight")
    plt.close(fig)


def _cell(value: Any, fmt: str) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)


def markdown(frame: pd.DataFrame) -> str:
    """One Markdown table per paper table: our run beside the paper's SE-ResNet-50 on ImageNet."""
    parts = []
    for table, group in frame.groupby("table", sort=False):
        parts.append(f"### {TABLES[table][0]}\n")
        parts.append("| variant | params | MACs | top-1 (%) | top-5 (%) | top-1 err (%) | seconds | paper params (M) "
                     "| paper GFLOPs | paper top-1 err (%) |")
        parts.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in group.itertuples():
            parts.append(f"| {r.variant} | {r.params:,} | {r.macs / 1e6:,.1f}M | {r.top1:.2f} | {r.top5:.2f} | "
                         f"{100 - r.top1:.2f} | {r.seconds:.0f} | {_cell(r.paper_params_m, '.1f')} | "
                         f"{_cell(r.paper_gmacs, '.2f')} | {_cell(r.paper_top1_err, '.2f')} |")
        parts.append("")
    return "\n".join(parts)


def plot_ablations(frame: pd.DataFrame) -> plt.Figure:
    """Per table: top-1 error of each variant, ours beside the paper's (each on its own axis: digits vs ImageNet),
    and the parameter count relative to the table's smallest model, ours beside the paper's."""
    import seaborn as sns

    tables = list(dict.fromkeys(frame["table"]))
    with sns.axes_style("whitegrid"), sns.plotting_context("paper"):
        fig, axes = plt.subplots(2, len(tables), figsize=(max(3.5 * len(tables), 5), 5.5), squeeze=False)
        for col, table in enumerate(tables):
            group = frame[frame["table"] == table]
            x = range(len(group))
            err, params = axes[0, col], axes[1, col]
            err.bar([i - 0.2 for i in x], 100 - group["top1"], width=0.4, label="ours (top-1 err %)")
            if group["paper_top1_err"].notna().any():  # the paper gives errors for Tables 11, 12, 14-16 only
                paper = err.twinx()
                paper.bar([i + 0.2 for i in x], group["paper_top1_err"].astype(float), width=0.4, color="grey",
                          label="paper (top-1 err %)")
                paper.set_ylabel("paper: top-1 err (%)" if col == len(tables) - 1 else "")
            err.set_title(TABLES[table][0], fontsize="small")
            for ax in (err, params):
                ax.set_xticks(list(x), group["variant"], rotation=30, ha="right", fontsize="small")
            params.plot(list(x), group["params"] / group["params"].min(), "o-", label="ours")
            if group["paper_params_m"].notna().sum() > 1:  # the no-SE baseline alone is no comparison
                params.plot(list(x), group["paper_params_m"] / group["paper_params_m"].min(), "s--", color="grey",
                            label="paper")
            params.set_ylabel("params / smallest" if col == 0 else "")
            err.set_ylabel("ours: top-1 err (%)" if col == 0 else "")
        legends = [ax.get_legend_handles_labels() for ax in fig.axes]
        handles, labels = [], []
        for hs, ls in legends:
            for h, lab in zip(hs, ls):
                if lab not in labels:
                    handles.append(h)
                    labels.append(lab)
        fig.legend(handles, labels, loc="lower center", ncol=4, frameon=False, bbox_to_anchor=(0.5, -0.04))
        fig.tight_layout(rect=(0, 0.04, 1, 1))
    return fig


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="python -m analysis.ablations",
        description="Train the variants of the SENet paper's ablation Tables 10-16 with one recipe and seed, and "
                    "tabulate them beside the paper's numbers. Every other flag goes to python -m se_surgery.train "
                    "(--data, --arch, --epochs, --batch-size, --no-bias, ...), except the ones the chosen table "
                    "varies.",
        epilog="examples:\n"
               "  python -m analysis.ablations --table reduction            # on the embedded digits\n"
               "  torchrun --nproc-per-node 8 -m analysis.ablations --table all --data /data/imagenet --no-bias "
               "--out runs/ablations-in1k\n"
               "\n"
               "on a scheduler: one job per printed line (a job array: line $SLURM_ARRAY_TASK_ID), then collect:\n"
               "  python -m analysis.ablations --table all --data /data/imagenet --no-bias --out runs/abl \\\n"
               "         --print-commands --launcher 'torchrun --nproc-per-node 8' > jobs.txt\n"
               "  sed -n \"${SLURM_ARRAY_TASK_ID}p\" jobs.txt | bash      # in each job of the array (1..N)\n"
               "  python -m analysis.ablations --table all --out runs/abl --collect   # when they have run\n"
               "Each line trains one run folder with --resume auto (a requeued job continues it); a relative --out\n"
               "is relative to where the jobs run. --launcher replaces the lines' leading python (torchrun ...,\n"
               "srun python, ...); the lines are shell-quoted, with a comment naming the variants of each folder.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--table", required=True, choices=[*TABLES, ALL], help="which paper table (all: every one)")
    parser.add_argument("--out", type=Path, default=Path("runs/ablations"), help="sweep folder (default: "
                        "runs/ablations); an interrupted sweep resumes there")
    parser.add_argument("--variants", help="comma-separated variant names of the table to run (default: all), "
                        "e.g. r=8,r=16")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--print-commands", action="store_true", help="train nothing: print one trainer command per "
                      "run folder (a shell line, quoted, with a comment naming its variants) and record the recipe "
                      "in OUT/sweep.json")
    mode.add_argument("--collect", action="store_true", help="train nothing: measure the run folders that have "
                      "finished, write ablations.csv/.md/.png/.pdf and name the missing ones (trainer flags may be "
                      "left out: OUT/sweep.json has the recipe)")
    parser.add_argument("--launcher", default="python", help="with --print-commands: what starts each trainer, "
                        "before '-m se_surgery.train' (default: python), e.g. 'torchrun --nproc-per-node 8'")
    return parser


def _parse_trainer_flags(trainer_args: Sequence[str]) -> argparse.Namespace:
    from se_surgery.train.cli import build_parser as trainer_parser

    args = trainer_parser().parse_args(list(trainer_args))
    if args.resume:
        raise AnalysisError("--resume: a sweep resumes by itself; run the same command again")
    return args


def _given(args: argparse.Namespace) -> dict[str, Any]:
    """The recipe fields set on the command line (the trainer's recipe flags default to 'not given')."""
    from se_surgery.train.recipe import given_flags

    return given_flags(args)


def _sweep_defaults(args: argparse.Namespace) -> dict[str, Any]:
    """The :data:`DIGITS_SWEEP` fields that apply (the digits with the demo recipe) and were not given."""
    from se_surgery.train.data import DIGITS

    given = _given(args)
    if given.get("data", DIGITS) != DIGITS or args.recipe not in (None, "demo"):
        return {}
    return {k: v for k, v in DIGITS_SWEEP.items() if k not in given}


def base_recipe(trainer_args: Sequence[str]) -> Any:
    """The sweep's base recipe from the trainer's flags (the digits default :data:`DIGITS_SWEEP` under them)."""
    from se_surgery.train.recipe import recipe_from_flags

    args = _parse_trainer_flags(trainer_args)
    return recipe_from_flags(args, defaults=_sweep_defaults(args))


def check_not_varied(tables: Sequence[str], trainer_args: Sequence[str]) -> None:
    """Refuse a trainer flag that sets a field one of ``tables`` varies (every variant would override it)."""
    given = _given(_parse_trainer_flags(trainer_args))
    for table in tables:
        for name in given:
            if any(name in v.overrides for v in TABLES[table][1]):
                flag = "/".join(_trainer_flag(name).option_strings)
                number, what = TABLES[table][0].split(": ", 1)
                if name == "se":
                    raise AnalysisError(f"{flag} is what every table varies (each has the no-SE baseline row): drop "
                                        "it; that row is trained once and shared by the tables")
                raise AnalysisError(f"{flag} is what {number} ({what}) varies, each variant sets it: drop it, or pick "
                                    "another --table")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m analysis.ablations``: 0, 2 with one line on stderr on bad input, 130 on Ctrl-C."""
    return run_cli(_main, argv, prog="python -m analysis.ablations")


def _main(argv: Sequence[str] | None) -> int:
    from se_surgery.train.recipe import Recipe

    plt.switch_backend("Agg")  # a CLI writes files; never open a window

    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    tables = list(TABLES) if args.table == ALL else [args.table]
    names = [v.strip() for v in args.variants.split(",")] if args.variants else None
    known = {v.name for t in tables for v in TABLES[t][1]}
    unknown = sorted(set(names or []) - known)
    if unknown:
        raise AnalysisError(f"unknown variant(s) {', '.join(unknown)}: use any of {', '.join(sorted(known))}")
    launcher = shlex.split(args.launcher)
    if not launcher:
        raise AnalysisError("--launcher is empty: pass e.g. --launcher python or --launcher 'torchrun "
                            "--nproc-per-node 8'")
    check_not_varied(tables, rest)
    saved = _read_sweep_json(args.out) if args.collect and not rest else None
    recipe = Recipe.from_dict(saved) if saved is not None else base_recipe(rest)

    if args.print_commands:
        lines = commands(tables, rest, args.out, variants=names, launcher=launcher)
        _read_rows(args.out)  # a damaged table is refused now, not when the jobs have run
        _check_same_recipe(args.out, recipe)
        print("\n".join(lines))
        print(f"{len(lines)} trainer command(s) for {args.out} (its recipe is in {args.out / 'sweep.json'}); once they "
              f"have run: python -m analysis.ablations --table {args.table} --out {shlex.quote(str(args.out))} "
              "--collect", file=sys.stderr)
        return 0
    if args.collect:
        frame, missing = collect(tables, recipe, args.out, variants=names)
        chosen_rows = frame[frame["table"].isin(tables)]
        if len(chosen_rows):
            print(markdown(chosen_rows))
            print(f"wrote {args.out}/: ablations.csv ablations.md ablations.png ablations.pdf")
        for line in missing:
            print(line)
        runs = len({item.run for item in plan(tables, recipe, args.out, names)})
        print(f"collected {runs - len(missing)} of {runs} run folder(s)"
              + (f"; {len(missing)} missing or unfinished, listed above" if missing else "")
              + ("" if len(chosen_rows) else "; nothing written yet"))
        return 0

    from se_surgery.train.distributed import is_rank_zero

    frame = sweep(tables, recipe, args.out, variants=names, progress=not args.no_progress)
    if is_rank_zero():
        print(markdown(frame[frame["table"].isin(tables)]))
        print(f"wrote {args.out}/: ablations.csv ablations.md ablations.png ablations.pdf")
    return 0


if __name__ == "__main__":
    sys.exit(main())
