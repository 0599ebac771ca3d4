"""`python -m analysis.excitations`: the SENet paper's excitation study (Sec. 7.2, Fig. 6-7) with numbers.

Two sources of a model:

- ``--ckpt RUN/best.pt``: a checkpoint written by ``python -m se_surgery.train`` (``weights_only``: a file carrying
  code is refused), or an ``OUT.safetensors`` of ``python -m se_surgery.export``, studied on its own data and
  preprocessing; a model built by a factory of someone's code (``package.module:function``) is rebuilt only when
  ``--model`` names that factory again (or with ``--trust-factory``), so a checkpoint cannot make us import code;
- ``--model NAME [--weights FILE] --data PATH``: any SE network of torchvision (``efficientnet_b0``,
  ``mobilenet_v3_large``, ``regnet_y_400mf``), timm (``timm:legacy_seresnet50``) or your own code
  (``package.module:function``, called with ``num_classes``), with a weights file (a ``state_dict``,
  ``.safetensors``, or a timm / torchvision-reference training checkpoint, ``--ema`` for its EMA weights) and the
  model's own preprocessing (:mod:`analysis.foreign`).

``--protocol paper`` follows the paper (:mod:`analysis.protocol`): 50 images of every class of the split, the last
SE block of each stage plus the last stage's blocks, 50 seeded channels per block in the figures, ``--classes`` drawn
against the all-class mean. The run writes to ``--out``: ``excitations.csv`` (per block, class and channel: n, mean,
std), ``summary.json`` (per-block metrics, run facts, ablation), ``fig6.{png,pdf}``, ``fig7.{png,pdf}``,
``specificity.{png,pdf}``; a table of the metrics and a verdict line end the run.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import matplotlib

matplotlib.use("Agg")  # a CLI writes files; never open a window

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, Subset  # noqa: E402

from analysis.capture import SEGates, record_excitations  # noqa: E402
from analysis.collected import ExcitationStats, resolve_classes  # noqa: E402
from analysis.errors import AnalysisError  # noqa: E402
from analysis.foreign import (  # noqa: E402
    Preprocess,
    build_foreign_model,
    imagenet_words,
    load_weights,
    model_transform,
)
from analysis.metrics import AGNOSTIC, CLASS_SPECIFIC, FAINT_GAP, SLIGHT, VISIBLE_GAP, metrics_frame  # noqa: E402
from analysis.plots import plot_fig6, plot_fig7, plot_specificity, save_figure  # noqa: E402
from analysis.protocol import paper_blocks, sample_channels  # noqa: E402
from analysis.removal import LAST_STAGE, ablate, ablation_blocks  # noqa: E402
from se_surgery.cli import ArgumentParser, run_cli  # noqa: E402
from se_surgery.paper import CHANNELS, PER_CLASS  # noqa: E402

ALL_PROTOCOL, PAPER_PROTOCOL = "all", "paper"

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
    parser = ArgumentParser(
        prog="python -m analysis.excitations",
        description="Reproduce the SENet excitation study (Fig. 6-7, Sec. 7.2) on a checkpoint or any SE network.",
        epilog="examples:\n"
               "  python -m analysis.excitations --ckpt runs/demo/best.pt --per-class 50 --ablate last-stage\n"
               "  python -m analysis.excitations --model timm:legacy_seresnet50 --weights se50.pth "
               "--data /data/imagenet --protocol paper --classes goldfish,pug,airliner,cliff",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    # --ckpt or --model, not both, but for --ckpt with --model package.module:function: it trusts that factory
    parser.add_argument("--ckpt", help="checkpoint written by python -m se_surgery.train (best.pt) or exported by "
                        "python -m se_surgery.export (OUT.safetensors)")
    parser.add_argument("--model", help="a torchvision model name (efficientnet_b0, regnet_y_400mf, ...), timm:NAME "
                        "(timm:legacy_seresnet50) or a factory of your code, package.module:function; needs --data. "
                        "With --ckpt: the factory the checkpoint was built with, which is imported only when named")
    parser.add_argument("--trust-factory", action="store_true", help="with --ckpt: import and call the factory "
                        "(package.module:function) the checkpoint names without naming it with --model; only for a "
                        "checkpoint you trust, since it runs that module's code")
    parser.add_argument("--weights", help="with --model: a state_dict saved with torch.save, a .safetensors file, "
                        "or a timm train.py, torchvision-reference or se-surgery checkpoint (read weights_only, no "
                        "code runs; default: random weights)")
    parser.add_argument("--ema", action="store_true", help="with --weights: the checkpoint's EMA weights "
                        "(state_dict_ema of timm, model_ema of torchvision)")
    parser.add_argument("--num-classes", type=int, default=1000, help="with --model: classifier size (default: 1000)")
    parser.add_argument("--data", help="'digits' or an ImageNet-layout folder PATH/<split>/<class>/* (default with "
                        "--ckpt: the checkpoint's data)")
    parser.add_argument("--split", default="val", help="split to capture, always with evaluation transforms "
                        "(default: val)")
    parser.add_argument("--protocol", choices=(ALL_PROTOCOL, PAPER_PROTOCOL), default=ALL_PROTOCOL,
                        help="'all': every chosen class and block; 'paper': 50 images of every class, the paper's "
                        "blocks, 50 seeded channels per block, --classes drawn against the all-class mean")
    parser.add_argument("--classes", help="comma-separated class names or indices; a 1,000-class ImageNet folder "
                        "also takes its words, e.g. goldfish,pug,airliner,cliff (default: all classes)")
    parser.add_argument("--per-class", type=int, help="at most N images per class, e.g. 50 as in the paper (default: "
                        "all; 50 with --protocol paper)")
    parser.add_argument("--blocks", default="all", help="'all' or SE blocks, e.g. SE_5_1,SE_5_2 or layer4.1.se")
    parser.add_argument("--seed", type=int, default=0, help="seed of the paper protocol's channel sampling")
    parser.add_argument("--crop", type=int, help="with --model: override the model's evaluation crop")
    parser.add_argument("--resize", type=int, help="with --model: override the shorter side resized to before the crop")
    parser.add_argument("--mean", type=float, nargs=3, metavar=("R", "G", "B"), help="with --model: override the mean")
    parser.add_argument("--std", type=float, nargs=3, metavar=("R", "G", "B"), help="with --model: override the std")
    parser.add_argument("--batch-size", type=int, default=128, help="images per forward (default: 128)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--out", help="output folder (default: <checkpoint folder>/excitations, or "
                        "runs/excitations/<model> with --model)")
    parser.add_argument("--ablate", help="SE blocks to take out for the removal check: e.g. SE_5_2,SE_5_3, "
                        f"{LAST_STAGE} or all; accuracy on the same images as the study (all of the split by default)")
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
        raise AnalysisError(f"cannot write to --out {out} ({err.strerror or err}): pick a folder you can "
                            "write") from None
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
    table = frame[list(columns)].rename(columns=columns)
    return table.to_string(index=False, float_format=lambda v: f"{v:.3g}" if abs(v) < 1e-3 and v else f"{v:.3f}")


def _verdicts(metrics: pd.DataFrame) -> str:
    """One line: which blocks are class-specific by the absolute gap (units of s), not by eta2 alone."""
    groups = {v: metrics.loc[metrics["verdict"] == v, "paper_name"].tolist()
              for v in (CLASS_SPECIFIC, SLIGHT, AGNOSTIC)}
    parts = [f"{v}: {', '.join(b) if b else 'none'}" for v, b in groups.items()]
    notes = sorted(set(metrics["note"]) - {""})
    return (f"verdict by the mean class-to-all gap (class-specific >= {VISIBLE_GAP} of s, slight >= {FAINT_GAP}, "
            f"with ANOVA p < 0.05): " + "; ".join(parts) + "".join(f"\nnote: {n}" for n in notes))


def _check_numbers_and_device(args: argparse.Namespace) -> None:
    positive = (("--per-class", args.per_class, 50), ("--batch-size", args.batch_size, 128), ("--crop", args.crop, 224),
                ("--resize", args.resize, 256), ("--num-classes", args.num_classes, 1000))
    for flag, value, example in positive:
        if value is not None and value < 1:
            raise AnalysisError(f"{flag} {value} must be a positive integer: pass e.g. {flag} {example}")
    for flag, value, example in (("--workers", args.workers, 4), ("--seed", args.seed, 0)):
        if value < 0:
            raise AnalysisError(f"{flag} {value} must be 0 or more: pass e.g. {flag} {example}")
    for flag, value, example, least in (("--mean", args.mean, "0.485 0.456 0.406", -math.inf),
                                        ("--std", args.std, "0.229 0.224 0.225", 0.0)):
        if value is not None and not all(math.isfinite(v) and v > least for v in value):
            what = "positive finite numbers (the std divides the pixels)" if least == 0 else "finite numbers"
            raise AnalysisError(f"{flag} {' '.join(f'{v:g}' for v in value)} must be three {what}: pass e.g. "
                                f"{flag} {example}")
    try:
        device = torch.device(args.device)
    except RuntimeError as err:
        raise AnalysisError(f"--device {args.device!r} is not a torch device ({err}): use e.g. cpu or cuda:0") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise AnalysisError(f"--device {args.device}: CUDA is not available here; use --device cpu")


class Source(NamedTuple):
    """The model to study, the dataset to study it on (evaluation transforms), other class names, run facts."""

    model: nn.Module
    dataset: Any
    aliases: list[str] | None
    facts: dict[str, Any]


def _from_checkpoint(args: argparse.Namespace) -> Source:
    from se_surgery.errors import UntrustedFactory
    from se_surgery.train.checkpoint import load_checkpoint
    from se_surgery.train.data import build_dataset

    try:
        model, info = load_checkpoint(Path(args.ckpt), map_location="cpu", factory=args.model,
                                      trust=args.trust_factory)
    except UntrustedFactory as err:
        named = f" (not {args.model})" if args.model else ""
        raise AnalysisError(
            f"{args.ckpt} builds its model with the factory {err.factory}{named}, which se-surgery does not import on "
            f"its own: pass --model {err.factory} (or --trust-factory) if you trust it"
        ) from None
    cfg = info["model_config"]
    data = args.data or cfg["data"]
    # every split through the evaluation transforms: the study measures the network, not the augmentation
    # a run trained on some of the folder's classes (the trainer's --classes) is studied on those
    subset = (info.get("config") or {}).get("classes")
    dataset = build_dataset(data, args.split, input_size=cfg["input_size"], resize=cfg["resize"], mean=cfg["mean"],
                            std=cfg.get("std"), classes=subset, train=False)
    _check_classes([str(c) for c in dataset.classes], cfg.get("class_names"), data, cfg["data"])
    facts = {"checkpoint": str(Path(args.ckpt).resolve()), "arch": cfg.get("arch"), "epoch": info.get("epoch"),
             "checkpoint_metrics": info.get("metrics"), "data": data}
    return Source(model, dataset, None, facts)


def _check_classes(found: list[str], trained: list[str] | None, data: str, own: str) -> None:
    """Refuse data whose classes are not the checkpoint's: its labels would be scored against other outputs."""
    if trained is None or found == [str(c) for c in trained]:
        return

    def listed(names: Sequence[str]) -> str:
        return ", ".join(names[:6]) + (f", ... ({len(names)} in all)" if len(names) > 6 else "")

    raise AnalysisError(
        f"--data {data} holds the classes [{listed(found)}], the checkpoint was trained on [{listed(list(trained))}]: "
        f"pass --data with the same class folders (or leave --data out for the checkpoint's own, {own}); "
        "--classes picks some of them"
    )


def _from_model(args: argparse.Namespace) -> Source:
    from se_surgery.train.data import DIGITS, build_dataset

    if not args.data or args.data == DIGITS:
        raise AnalysisError(f"--model {args.model} needs --data: an ImageNet-layout folder PATH/{args.split}/<class>/*")
    if args.ema and not args.weights:
        raise AnalysisError("--ema picks the EMA weights of a --weights file: pass --weights FILE, or drop --ema")
    model = build_foreign_model(args.model, num_classes=args.num_classes)
    if args.weights:
        load_weights(model, args.weights, ema=args.ema)
    overrides = Preprocess(crop=args.crop, resize=args.resize, mean=args.mean, std=args.std)
    transform = model_transform(args.model, model, overrides)
    dataset = build_dataset(args.data, args.split, input_size=args.crop or 224, train=False)
    dataset.transform = transform  # the model's own preprocessing instead of the trainer's
    folders = [str(c) for c in dataset.classes]
    words = imagenet_words(folders)
    if words is not None:
        dataset.classes = words  # ImageNet's words name the curves; the folder ids still resolve --classes
    facts = {"model": args.model, "arch": args.model, "weights": str(Path(args.weights).resolve()) if args.weights
             else None, "ema": args.ema, "data": args.data, "transform": repr(transform).replace("\n", " ")}
    return Source(model, dataset, folders if words is not None else None, facts)


def _check_source_flags(args: argparse.Namespace) -> None:
    from se_surgery.archs import is_factory

    if args.ckpt and args.model and not is_factory(args.model):
        raise AnalysisError(f"--ckpt and --model {args.model} are two models: pass one of them (with --ckpt, --model "
                            "only names the checkpoint's factory, package.module:function, to trust it)")
    if args.trust_factory and not args.ckpt:
        raise AnalysisError("--trust-factory only applies to --ckpt: --model already names the factory it imports")
    if args.ckpt:
        given = [f"--{k.replace('_', '-')}" for k in ("weights", "ema", "crop", "resize", "mean", "std")
                 if getattr(args, k)]
        if given:
            raise AnalysisError(f"{', '.join(given)} only apply to --model: a checkpoint brings its own weights and "
                                "preprocessing")


class Result(NamedTuple):
    """What a run wrote: the summary (as in summary.json), the metrics and ablation tables, the output folder."""

    summary: dict[str, Any]
    metrics: pd.DataFrame
    ablation: pd.DataFrame | None
    out: Path


def _default_out(args: argparse.Namespace) -> Path:
    if args.out:
        return Path(args.out)
    if args.ckpt:
        return Path(args.ckpt).parent / "excitations"
    return Path("runs") / "excitations" / args.model.replace(":", "_")


@dataclass(frozen=True)
class Study:
    """What a run studies, resolved once from the flags before any compute; every later step reads it from here.

    Attributes:
        args: The parsed flags, for their plain values (``--split``, ``--seed``, ``--device``, ...).
        source: The model, its dataset (evaluation transforms), other class names, run facts.
        found: Every SE block of the model with its gate and paper name.
        blocks: The SE blocks captured: ``--blocks``, or with ``--protocol paper`` the paper's.
        ablated: The SE blocks of the removal check (``--ablate``), all among ``blocks``.
        class_names: The dataset's class names, in index order.
        classes: The class indices captured.
        drawn: With ``--protocol paper``: the ``--classes`` drawn against the all-class mean; else ``None``.
        per_class: At most this many images per class (``None``: all).
        out: The output folder, already shown to be writable.
    """

    args: argparse.Namespace
    source: Source
    found: SEGates
    blocks: list[str]
    ablated: list[str]
    class_names: list[str]
    classes: list[int]
    drawn: list[int] | None
    per_class: int | None
    out: Path

    @property
    def paper_protocol(self) -> bool:
        return self.args.protocol == PAPER_PROTOCOL


def resolve_study(args: argparse.Namespace) -> Study:
    """Check every flag, load the model and data, and resolve its SE blocks and the classes, each once.

    Raises:
        AnalysisError: (or the trainer's errors, for a checkpoint) one line naming the bad flag and its fix.
    """
    _check_numbers_and_device(args)
    out = _writable_out(_default_out(args))
    _check_source_flags(args)
    source = _from_checkpoint(args) if args.ckpt else _from_model(args)
    found = SEGates.find(source.model)
    if not found.gates:
        raise AnalysisError(f"{args.ckpt or args.model} holds a model with no SE block: analyse a checkpoint trained "
                            "with SE (--se) or an SE network (efficientnet_b0, regnet_y_400mf, timm:seresnet50, ...)")
    paper_protocol = args.protocol == PAPER_PROTOCOL
    blocks = _studied_blocks(found, args.blocks, paper_protocol)
    ablated = _ablated_blocks(source.model, found, blocks, args.ablate)
    class_names = [str(c) for c in source.dataset.classes]
    chosen = resolve_classes(_split(args.classes), class_names, source.aliases, once=True)
    every = list(range(len(class_names)))
    # the paper's all-class curve is over every class of the split; the chosen classes are the curves drawn
    classes, drawn = (every, chosen) if paper_protocol else (chosen or every, None)
    per_class = args.per_class or (PER_CLASS if paper_protocol else None)
    return Study(args, source, found, blocks, ablated, class_names, classes, drawn, per_class, out)


def _studied_blocks(found: SEGates, spec: str, paper_protocol: bool) -> list[str]:
    """``--blocks``; by default every block, or the paper's with its protocol (every block of a model without
    ``SE_<stage>_<block>`` names)."""
    wanted = None if spec == "all" else _split(spec)
    if paper_protocol and wanted is None:
        wanted = paper_blocks(found.blocks, found.paper_names) or None
    return found.select(wanted)


def _ablated_blocks(model: nn.Module, found: SEGates, blocks: list[str], spec: str | None) -> list[str]:
    """``--ablate``'s blocks, each one captured (its gate is fixed to its captured mean)."""
    ablated = ablation_blocks(model, spec, found) if spec else []
    uncaptured = [found.paper_names.get(b, b) for b in ablated if b not in blocks]
    if uncaptured:
        raise AnalysisError(f"--ablate {','.join(uncaptured)}: not among the --blocks studied, so their gates cannot "
                            "be fixed to their mean; add them to --blocks (or drop --blocks)")
    return ablated


def _loader(study: Study) -> DataLoader:
    args = study.args
    return DataLoader(_subset(study.source.dataset, study.classes, study.per_class), batch_size=args.batch_size,
                      num_workers=args.workers, pin_memory=args.device != "cpu")


def _figures(study: Study, stats: ExcitationStats, metrics: pd.DataFrame) -> dict[str, np.ndarray] | None:
    """fig6, fig7 and specificity in ``--out``; returns the channels drawn where the paper's protocol samples them."""
    sampled = None
    if study.paper_protocol:
        sampled = sample_channels({b: stats.mean(b).size for b in stats.blocks}, k=CHANNELS, seed=study.args.seed)
    drawn = study.drawn
    save_figure(plot_fig6(stats, classes=drawn, sampled=sampled), study.out, "fig6")
    save_figure(plot_fig7(stats, classes=drawn[:2] if drawn else None, sampled=sampled), study.out, "fig7")
    save_figure(plot_specificity(metrics), study.out, "specificity")
    return sampled


def _removal_check(study: Study, loader: DataLoader, stats: ExcitationStats) -> pd.DataFrame | None:
    """The ``--ablate`` table, also written as ``ablation.csv``; ``None`` without ``--ablate``."""
    if not study.ablated:
        return None
    ablation = ablate(study.source.model, loader, study.ablated, stats, found=study.found,
                      progress=not study.args.no_progress)
    ablation.to_csv(study.out / "ablation.csv", index=False)
    return ablation


def _run_facts(study: Study, stats: ExcitationStats, sampled: dict[str, np.ndarray] | None) -> dict[str, Any]:
    """The ``run`` part of summary.json: where the model and data came from and what was captured."""
    args, captured = study.args, [stats.class_names[k] for k in stats.classes]
    return {
        **study.source.facts,
        "split": args.split,
        "protocol": args.protocol,
        "classes": captured,
        "drawn_classes": [stats.class_names[k] for k in study.drawn] if study.drawn else None,
        "images_per_class": {c: stats.count(stats.blocks[0], c) for c in captured},
        "per_class_limit": study.per_class,
        "blocks": len(stats.blocks),
        "sampled_channels": None if sampled is None else {stats.paper_name(b): c.tolist() for b, c in sampled.items()},
        "channel_seed": args.seed if study.paper_protocol else None,
        "device": args.device,
    }


def run(args: argparse.Namespace) -> Result:
    """Everything the CLI does but printing."""
    started = time.perf_counter()
    study = resolve_study(args)
    study.source.model.to(args.device)
    loader = _loader(study)
    stats = record_excitations(study.source.model, loader, study.found.only(study.blocks),
                               class_names=study.class_names, classes=study.classes, progress=not args.no_progress)
    metrics = metrics_frame(stats)
    stats.to_frame().to_csv(study.out / "excitations.csv", index=False)
    sampled = _figures(study, stats, metrics)
    ablation = _removal_check(study, loader, stats)
    facts = {**_run_facts(study, stats, sampled), "seconds": round(time.perf_counter() - started, 2)}
    summary = {"run": facts, "blocks": metrics.to_dict(orient="records"),
               "ablation": None if ablation is None else ablation.to_dict(orient="records")}
    (study.out / "summary.json").write_text(json.dumps(_json_safe(summary), indent=2) + "\n")
    return Result(summary, metrics, ablation, study.out)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m analysis.excitations``: 0, 2 with one line on stderr on bad input, 130 on Ctrl-C."""
    return run_cli(_main, argv, prog="python -m analysis.excitations")


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.ckpt and not args.model:
        parser.error("one of the arguments --ckpt --model is required")
    summary, metrics, ablation, out = run(args)
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
