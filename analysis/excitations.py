"""`python -m analysis.excitations --ckpt RUN/best.pt`: the SENet paper's excitation study (Sec. 7.2) on a checkpoint.

Reads a checkpoint written by ``python -m se_surgery.train`` (``weights_only``: a file carrying code is refused),
captures every SE gate's output over the checkpoint's validation split, and writes to ``--out``:
``excitations.csv`` (per block, class and channel: n, mean, std), ``summary.json`` (per-block metrics, run facts,
ablation), ``fig6.{png,pdf}``, ``fig7.{png,pdf}``, ``specificity.{png,pdf}``; a table of the metrics ends the run.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import matplotlib

matplotlib.use("Agg")  # a CLI writes files; never open a window

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader, Subset  # noqa: E402

from analysis.ablation import LAST_STAGE, ablate, ablation_blocks  # noqa: E402
from analysis.capture import capture_excitations, find_gates, model_paper_names  # noqa: E402
from analysis.errors import AnalysisError  # noqa: E402
from analysis.excitation_stats import resolve_classes, select_blocks  # noqa: E402
from analysis.plots import plot_fig6, plot_fig7, plot_specificity, save_figure  # noqa: E402
from analysis.stats import AGNOSTIC, CLASS_SPECIFIC, FAINT_GAP, SLIGHT, VISIBLE_GAP, metrics_frame  # noqa: E402

TABLE_COLUMNS = {
    "paper_name": "block",
    "channels": "C",
    "eta2": "eta2",
    "gap": "gap(s)",
    "gap_ratio": "gap/sd",
    "anova_p": "p(Bonf)",
    "js_mean": "JS",
    "agreement_mean": "r(all)",
    "saturated_share": "sat>0.9",
    "one_minus_s": "1-s",
    "verdict": "verdict",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m analysis.excitations",
        description="Reproduce the SENet excitation study (Fig. 6-7, Sec. 7.2) on a checkpoint, with numbers.",
        epilog="example: python -m analysis.excitations --ckpt runs/demo/best.pt --per-class 50 --ablate last-stage",
    )
    parser.add_argument("--ckpt", required=True, help="checkpoint written by python -m se_surgery.train (best.pt)")
    parser.add_argument("--data", help="'digits' or an ImageNet-layout folder (default: the checkpoint's data)")
    parser.add_argument("--split", default="val", help="split to capture (default: val)")
    parser.add_argument("--classes", help="comma-separated class names or indices (default: all classes)")
    parser.add_argument("--per-class", type=int, help="at most N images per class, e.g. 50 as in the paper (default: all)")
    parser.add_argument("--blocks", default="all", help="'all' or SE blocks, e.g. SE_5_1,SE_5_2 or layer4.1.se")
    parser.add_argument("--batch-size", type=int, default=128, help="images per forward (default: 128)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--out", help="output folder (default: <checkpoint folder>/excitations)")
    parser.add_argument("--ablate", help=f"SE blocks to take out for the removal check: e.g. SE_5_2,SE_5_3, {LAST_STAGE} "
                        "or all; accuracy on the same images as the study (all of the split by default)")
    parser.add_argument("--workers", type=int, default=0, help="data loader worker processes (default: 0)")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    return parser


def _writable_out(out: Path) -> Path:
    """Create ``out`` and prove a file can be written there, before any compute."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as err:
        raise AnalysisError(f"cannot write to --out {out} ({err.strerror or err}): pick a folder you can write") from None
    return out


def _split(text: str | None) -> list[str] | None:
    return [s.strip() for s in text.split(",") if s.strip()] if text else None


def _subset(dataset: Any, classes: list[int], per_class: int | None) -> Subset:
    """The dataset's images of ``classes``, the first ``per_class`` of each in dataset order."""
    targets = np.asarray(dataset.targets)
    keep = [np.flatnonzero(targets == k)[:per_class] for k in classes]
    return Subset(dataset, np.sort(np.concatenate(keep)).tolist())


def _json_safe(value: Any) -> Any:
    """NaN/inf -> None and numpy scalars -> Python, so summary.json is strict JSON."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _table(frame: pd.DataFrame, columns: dict[str, str]) -> str:
    shown = frame[list(columns)].rename(columns=columns)
    return shown.to_string(index=False, float_format=lambda v: f"{v:.3g}" if abs(v) < 1e-3 and v else f"{v:.3f}")


def _verdicts(metrics: pd.DataFrame) -> str:
    """One line: which blocks are class-specific by the absolute gap (units of s), not by eta2 alone."""
    groups = {v: metrics.loc[metrics["verdict"] == v, "paper_name"].tolist() for v in (CLASS_SPECIFIC, SLIGHT, AGNOSTIC)}
    parts = [f"{v}: {', '.join(b) if b else 'none'}" for v, b in groups.items()]
    notes = sorted(set(metrics["note"]) - {""})
    return (f"verdict by the mean class-to-all gap (class-specific >= {VISIBLE_GAP} of s, slight >= {FAINT_GAP}, "
            f"with ANOVA p < 0.05): " + "; ".join(parts) + "".join(f"\nnote: {n}" for n in notes))


def _check_numbers_and_device(args: argparse.Namespace) -> None:
    for flag, value in (("--per-class", args.per_class), ("--batch-size", args.batch_size)):
        if value is not None and value < 1:
            raise AnalysisError(f"{flag} {value}: give a positive number")
    try:
        device = torch.device(args.device)
    except RuntimeError as err:
        raise AnalysisError(f"--device {args.device!r} is not a torch device ({err}): use e.g. cpu or cuda:0") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise AnalysisError(f"--device {args.device}: CUDA is not available here; use --device cpu")


class Result(NamedTuple):
    """What a run wrote: the summary (as in summary.json), the metrics and ablation tables, the output folder."""

    summary: dict[str, Any]
    metrics: pd.DataFrame
    ablation: pd.DataFrame | None
    out: Path


def run(args: argparse.Namespace) -> Result:
    """Everything the CLI does but printing."""
    from se_surgery.train.checkpoint import load_checkpoint
    from se_surgery.train.data import build_dataset

    started = time.perf_counter()
    ckpt = Path(args.ckpt)
    out = _writable_out(Path(args.out) if args.out else ckpt.parent / "excitations")
    _check_numbers_and_device(args)
    model, info = load_checkpoint(ckpt, map_location="cpu")
    cfg = info["model_config"]
    gates, paper = find_gates(model), model_paper_names(model)
    if not gates:
        raise AnalysisError(f"{ckpt} holds a model with no SE block: analyse a checkpoint trained with SE (--se)")
    blocks = select_blocks(gates, paper, None if args.blocks == "all" else _split(args.blocks))
    ablated = ablation_blocks(model, args.ablate) if args.ablate else []
    data = args.data or cfg["data"]
    # every split through the evaluation transforms: the study measures the network, not the augmentation
    dataset = build_dataset(data, args.split, input_size=cfg["input_size"], resize=cfg["resize"], mean=cfg["mean"],
                            train=False)
    names = [str(c) for c in dataset.classes]
    classes = resolve_classes(_split(args.classes), names) or list(range(len(names)))
    model.to(args.device)
    loader_kwargs = {"batch_size": args.batch_size, "num_workers": args.workers, "pin_memory": args.device != "cpu"}
    loader = DataLoader(_subset(dataset, classes, args.per_class), **loader_kwargs)
    progress = not args.no_progress
    stats = capture_excitations(model, loader, blocks=blocks, classes=classes, progress=progress)
    metrics = metrics_frame(stats)
    stats.to_frame().to_csv(out / "excitations.csv", index=False)
    shown = [stats.class_names[k] for k in stats.classes]
    save_figure(plot_fig6(stats), out, "fig6")
    save_figure(plot_fig7(stats), out, "fig7")
    save_figure(plot_specificity(metrics), out, "specificity")
    ablation = None
    if ablated:
        ablation = ablate(model, loader, ablated, stats, progress=progress)
        ablation.to_csv(out / "ablation.csv", index=False)
    summary = {
        "run": {
            "checkpoint": str(ckpt.resolve()),
            "arch": cfg.get("arch"),
            "epoch": info.get("epoch"),
            "checkpoint_metrics": info.get("metrics"),
            "data": data,
            "split": args.split,
            "classes": shown,
            "images_per_class": {c: stats.count(stats.blocks[0], c) for c in shown},
            "per_class_limit": args.per_class,
            "blocks": len(stats.blocks),
            "device": args.device,
            "seconds": round(time.perf_counter() - started, 2),
        },
        "blocks": metrics.to_dict(orient="records"),
        "ablation": None if ablation is None else ablation.to_dict(orient="records"),
    }
    (out / "summary.json").write_text(json.dumps(_json_safe(summary), indent=2) + "\n")
    return Result(summary, metrics, ablation, out)


def main(argv: Sequence[str] | None = None) -> int:
    from se_surgery.errors import CheckpointError, DataError, SurgeryError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        summary, metrics, ablation, out = run(args)
    except (AnalysisError, CheckpointError, DataError, SurgeryError) as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    facts = summary["run"]
    print(f"{facts['arch']} on {facts['data']} ({facts['split']}): {len(facts['classes'])} classes, "
          f"{sum(facts['images_per_class'].values())} images, {facts['blocks']} SE blocks, {facts['seconds']} s")
    print(_table(metrics, TABLE_COLUMNS))
    print(_verdicts(metrics))
    if ablation is not None:
        print(_table(ablation, {c: c for c in ("variant", "blocks", "top1", "top5", "params", "se_overhead_pct")}))
    print(f"wrote {out}/: excitations.csv summary.json fig6 fig7 specificity (.png .pdf)"
          + (" ablation.csv" if ablation is not None else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
