"""`python -m analysis.ablations --table reduction|...|all`: the SENet paper's ablation Tables 10-16 as one command.

Each variant of a table is trained through the trainer (:func:`se_surgery.train.train`) with one recipe and one seed
(the trainer's flags pass through: ``--data``, ``--arch``, ``--epochs``, ...; run it under ``torchrun`` for many
GPUs), then measured: parameters, multiply-adds at the recipe's input size, final val top-1 / top-5 (%), training
seconds. ``--out`` (default ``runs/ablations``) gets one run folder per distinct variant (the standard SE is trained
once and shared by every table that has it), ``ablations.csv``, ``ablations.md`` (our numbers beside the paper's)
and ``ablations.{png,pdf}``. A sweep resumes where it stopped: a variant with a row in ``ablations.csv`` is never
trained again, and a half-trained one continues from its ``last.pt``.

The paper's numbers are SE-ResNet-50 on ImageNet (``design.md`` section 3): parameters in millions, GFLOPs
(multiply-adds) and top-1 error (%), where the paper gives them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import pandas as pd

from analysis.errors import AnalysisError
from se_surgery.cli import run_cli

__all__ = ["TABLES", "Variant", "main", "sweep"]

SE_TOP1_ERR = 22.28  # the standard SE-ResNet-50 of the ablation runs (Tables 11, 12, 14-16)


@dataclass(frozen=True)
class Variant:
    """One row of a paper table: recipe fields to change, and the paper's numbers (``None`` where not given)."""

    name: str
    overrides: dict[str, Any] = field(default_factory=dict)
    paper_top1_err: float | None = None
    paper_params_m: float | None = None
    paper_gmacs: float | None = None


NO_SE = Variant("no SE (ResNet-50)", {"se": False}, None, 25.6, 3.86)
TABLES: dict[str, tuple[str, list[Variant]]] = {
    "reduction": ("Table 10: reduction ratio r", [
        Variant(f"r={r}", {"reduction": r}, None, p) for r, p in ((2, 45.7), (4, 35.7), (8, 30.7), (16, 28.1), (32, 26.9))
    ]),
    "squeeze": ("Table 11: squeeze operator", [
        Variant("avg", {"squeeze": "avg"}, SE_TOP1_ERR), Variant("max", {"squeeze": "max"}, 22.57)]),
    "excitation": ("Table 12: excitation operator", [
        Variant("relu", {"excitation": "relu"}, 23.47), Variant("tanh", {"excitation": "tanh"}, 23.00),
        Variant("sigmoid", {"excitation": "sigmoid"}, SE_TOP1_ERR)]),
    "stage": ("Table 13: SE in one stage", [
        NO_SE, Variant("SE stage 2", {"where": ["2"]}, None, 25.6), Variant("SE stage 3", {"where": ["3"]}, None, 25.7),
        Variant("SE stage 4", {"where": ["4"]}, None, 26.4), Variant("SE all", {}, None, 28.1)]),
    "integration": ("Table 14: integration strategy", [
        Variant("SE", {"position": "standard"}, SE_TOP1_ERR), Variant("SE-PRE", {"position": "pre"}, 22.23),
        Variant("SE-POST", {"position": "post"}, 22.78), Variant("SE-Identity", {"position": "identity"}, 22.20)]),
    "3x3": ("Table 15: SE on the 3x3 convolution", [
        Variant("SE", {}, SE_TOP1_ERR, 28.1), Variant("SE 3x3", {"position": "3x3"}, 22.48, 25.8)]),
    "nosqueeze": ("Table 16: NoSqueeze", [
        NO_SE, Variant("NoSqueeze", {"squeeze": "none"}, 22.93, 28.1, 4.27), Variant("SE", {}, SE_TOP1_ERR, 28.1, 3.87)]),
}
ALL = "all"

DIGITS_SWEEP = {"epochs": 4, "lr_step": 3, "num_samples": 960}
"""A "table on digits" default: the demo recipe cut to 4 epochs of 960 images (120 steps), about 40 s a variant on
2 CPU cores, so a five-variant table takes minutes; every flag given on the command line wins."""

COLUMNS = ["table", "variant", "run", "params", "macs", "top1", "top5", "seconds", "epochs",
           "paper_top1_err", "paper_params_m", "paper_gmacs"]


def _run_name(overrides: dict[str, Any], base: Any) -> str:
    """The run folder of a variant: the recipe fields it changes from ``base`` (``se`` = the standard SE)."""
    changed = {k: v for k, v in overrides.items() if getattr(base, k) != v}
    if changed.get("se") is False:
        return "no-se"
    parts = [f"{k}={'+'.join(map(str, v)) if isinstance(v, list) else v}" for k, v in sorted(changed.items())]
    return "se" + "".join(f"_{p}" for p in parts)


def _finished(run: Path, epochs: int) -> bool:
    lines = (run / "metrics.jsonl").read_text().splitlines() if (run / "metrics.jsonl").exists() else []
    return any(json.loads(line)["epoch"] >= epochs for line in lines if line.strip())


def _measure(run: Path, recipe: Any) -> dict[str, Any]:
    """Parameters, multiply-adds, final val top-1/top-5 and training seconds of a finished run."""
    from se_surgery.surgery.cost import count_macs
    from se_surgery.train.checkpoint import load_checkpoint

    model, _ = load_checkpoint(run / "last.pt", map_location="cpu")
    epochs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    final = epochs[-1]
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "macs": count_macs(model, (1, 3, recipe.input_size, recipe.input_size)),
        "top1": final["val_top1"],
        "top5": final["val_top5"],
        "seconds": round(sum(e["seconds"] for e in epochs), 1),
        "epochs": final["epoch"],
    }


def _check_surgery_supports(variant: Variant) -> None:
    """Refuse, before any training, a variant that this version of :func:`se_surgery.add_se` cannot build."""
    import inspect

    from se_surgery.surgery import add_se
    from se_surgery.train.models import SURGERY_DEFAULTS

    accepted = inspect.signature(add_se).parameters
    needed = [k for k in SURGERY_DEFAULTS if k in variant.overrides and variant.overrides[k] != SURGERY_DEFAULTS[k]]
    missing = [k for k in needed if k not in accepted]
    if missing:
        raise AnalysisError(f"variant {variant.name!r} needs add_se({', '.join(f'{k}=...' for k in missing)}), which "
                            "this version of se_surgery does not have (the paper's SE variants, issue 9)")


def _check_same_recipe(out: Path, recipe: Any) -> None:
    """A sweep folder holds runs of one base recipe: refuse to mix in runs of another."""
    path = out / "sweep.json"
    saved = json.loads(path.read_text()) if path.exists() else None
    mine = json.loads(json.dumps(recipe.to_dict()))
    if saved is not None and saved != mine:
        diff = sorted(k for k in set(saved) | set(mine) if saved.get(k) != mine.get(k))
        raise AnalysisError(f"{out} holds a sweep of another recipe ({', '.join(diff)} differ): pass the same trainer "
                            "flags to resume it, or another --out")
    path.write_text(json.dumps(mine, indent=2) + "\n")


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

    out.mkdir(parents=True, exist_ok=True)
    writer = int(os.environ.get("RANK", "0")) == 0
    if writer:
        _check_same_recipe(out, recipe)
    csv = out / "ablations.csv"
    rows = pd.read_csv(csv, dtype={"variant": str}).to_dict("records") if csv.exists() else []
    done = {(r["table"], r["variant"]) for r in rows}
    for table in tables:
        for variant in TABLES[table][1]:
            if (variants and variant.name not in variants) or (table, variant.name) in done:
                continue
            _check_surgery_supports(variant)
            run = out / _run_name(variant.overrides, recipe)
            varied = dataclasses.replace(recipe, **variant.overrides)
            if not _finished(run, varied.epochs):
                train(varied, run, resume="auto", progress=progress)
            rows.append({"table": table, "variant": variant.name, "run": run.name, **_measure(run, varied.resolved()),
                         "paper_top1_err": variant.paper_top1_err, "paper_params_m": variant.paper_params_m,
                         "paper_gmacs": variant.paper_gmacs})
            if writer:
                _write(pd.DataFrame(rows, columns=COLUMNS), out)
    frame = pd.DataFrame(rows, columns=COLUMNS)
    if writer and rows:
        _write(frame, out)
    return frame


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
    parser = argparse.ArgumentParser(
        prog="python -m analysis.ablations",
        description="Train the variants of the SENet paper's ablation Tables 10-16 with one recipe and seed, and "
                    "tabulate them beside the paper's numbers. Every other flag goes to python -m se_surgery.train "
                    "(--data, --arch, --epochs, --batch-size, --no-bias, ...).",
        epilog="examples:\n  python -m analysis.ablations --table reduction            # on the embedded digits\n"
               "  torchrun --nproc-per-node 8 -m analysis.ablations --table all --data /data/imagenet --no-bias "
               "--out runs/ablations-in1k",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--table", required=True, choices=[*TABLES, ALL], help="which paper table (all: every one)")
    parser.add_argument("--out", type=Path, default=Path("runs/ablations"), help="sweep folder (default: "
                        "runs/ablations); an interrupted sweep resumes there")
    parser.add_argument("--variants", help="comma-separated variant names of the table to run (default: all), "
                        "e.g. r=8,r=16")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    return parser


def base_recipe(trainer_args: Sequence[str]) -> Any:
    """The sweep's base recipe from the trainer's flags (the digits default :data:`DIGITS_SWEEP` under them)."""
    from se_surgery.train.cli import build_parser as trainer_parser
    from se_surgery.train.data import DIGITS
    from se_surgery.train.recipe import Recipe, get_recipe

    args = trainer_parser().parse_args(list(trainer_args))
    if args.resume:
        raise AnalysisError("--resume: a sweep resumes by itself; run the same command again")
    names = {f.name for f in dataclasses.fields(Recipe)}
    overrides = {k: v for k, v in vars(args).items() if k in names}
    data = overrides.pop("data", DIGITS)
    defaults = DIGITS_SWEEP if data == DIGITS and args.recipe in (None, "demo") else {}
    return get_recipe(args.recipe, data, **{**defaults, **overrides})


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m analysis.ablations``: 0, 2 with one line on stderr on bad input, 130 on Ctrl-C."""
    return run_cli(_main, argv, prog="python -m analysis.ablations")


def _main(argv: Sequence[str] | None) -> int:
    plt.switch_backend("Agg")  # a CLI writes files; never open a window

    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    tables = list(TABLES) if args.table == ALL else [args.table]
    recipe = base_recipe(rest)
    names = [v.strip() for v in args.variants.split(",")] if args.variants else None
    known = {v.name for t in tables for v in TABLES[t][1]}
    unknown = sorted(set(names or []) - known)
    if unknown:
        raise AnalysisError(f"unknown variant(s) {', '.join(unknown)}: use any of {', '.join(sorted(known))}")
    frame = sweep(tables, recipe, args.out, variants=names, progress=not args.no_progress)
    if int(os.environ.get("RANK", "0")) == 0:
        print(markdown(frame[frame["table"].isin(tables)]))
        print(f"wrote {args.out}/: ablations.csv ablations.md ablations.png ablations.pdf")
    return 0


if __name__ == "__main__":
    sys.exit(main())
