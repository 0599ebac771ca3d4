"""``python -m se_surgery.describe resnet50``: what add_se would do to a model, and its cost beside the paper's.

It prints the plan (:func:`se_surgery.plan`: one row per SE block, then what is skipped and why), then the SE model's
parameters and multiply-adds next to its base, counted two ways (conv + linear, and the paper's way, which adds one
pass of each SE's squeeze: :mod:`se_surgery.surgery.cost`), and, for the networks of the paper's Tables 2-3, the
paper's figures. ``--input-size`` is an image side (``224``) or a channels-first shape (``3,16,112,112``,
``1,16000``). The options are :func:`se_surgery.add_se`'s (``--reduction``, ``--where``, ``--position``,
``--squeeze``, ``--excitation``, ``--no-bias``); ``--paper-tables`` prints the cost columns of the paper's ablation
Tables 10, 13, 15 and 16 for ResNet-50 and its Tables 2 and 3, ours beside the paper's. ``python -m
se_surgery.summary`` is the same command's deprecated name.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import nn

from .archs import FACTORY, call_factory, import_factory, split_arch
from .cli import ArgumentParser, run_cli
from .errors import SurgeryError
from .modes import eval_mode
from .paper import TABLE2, TABLE3, TABLE_UNITS, ReportedCost
from .surgery import SEConfig, apply_plan, plan
from .surgery.cost import NetworkCost, Summary, format_columns, network_cost, paper_tables, summary

__all__ = ["main"]

PROG = "python -m se_surgery.describe"

_CNN_EXAMPLES = "resnet50, vgg16_bn, googlenet, densenet121, mobilenet_v2, convnext_tiny or timm:mobilenetv1_100"


def _where(text: str) -> list[int | str]:
    """``"2,3"`` -> ``[2, 3]`` (paper stages); other items stay names (``"layer3,SE_5_2"``)."""
    return [int(item) if item.strip().isdigit() else item.strip() for item in text.split(",") if item.strip()]


def _base(arch: str, **kwargs: Any):
    source, name = split_arch(arch)
    if source == FACTORY:  # the user's own code, named on the command line
        import_factory(arch)  # a module that does not import, or a missing attribute, is refused before any work
        return lambda: call_factory(arch, None, kwargs)
    if source == "timm":
        try:
            import timm
        except ImportError:
            raise SurgeryError(f"{arch} needs timm (pip install timm)") from None
        if name not in timm.list_models():
            raise SurgeryError(f"unknown timm model {name!r}: pick a name from timm.list_models()")
        return lambda: timm.create_model(name, **kwargs)
    from torchvision.models import get_model, list_models

    if arch not in list_models():
        raise SurgeryError(f"unknown arch {arch!r}; try one of: resnet50, resnext50_32x4d, mobilenet_v2, "
                           "convnext_tiny, timm:resnet50")
    return lambda: get_model(arch, **kwargs)


_SIZE_FIX = ("pass an image side (--input-size 224) or a channels-first shape C,SIZE[,SIZE...] "
             "(--input-size 3,16,112,112 for video, 1,16000 for audio)")


def _input_size(text: str) -> tuple[int, ...]:
    """``--input-size``: ``"224"`` -> ``(1, 3, 224, 224)`` (a square RGB image); ``"3,16,112,112"`` (video),
    ``"1,16000"`` (audio): a channels-first shape, to which batch 1 is added."""
    items = [item.strip() for item in text.split(",")]
    if not all(item.lstrip("+-").isdigit() for item in items):
        raise SurgeryError(f"--input-size {text!r} is not a size: {_SIZE_FIX}")
    values = [int(item) for item in items]
    if "," not in text:
        if values[0] < 1:
            raise SurgeryError(f"--input-size {text} must be a positive integer: pass e.g. --input-size 224")
        return (1, 3, values[0], values[0])
    if min(values) < 1:
        raise SurgeryError(f"--input-size {text} must hold positive integers only: {_SIZE_FIX}")
    return (1, *values)


def _shape_words(size: tuple[int, ...]) -> str:
    """``(1, 3, 224, 224)`` -> ``"224x224"``; other shapes as C x sizes: ``(1, 1, 16000)`` -> ``"1x16000"``."""
    return "x".join(map(str, size[2:] if len(size) == 4 and size[1] == 3 else size[1:]))


class _Row(NamedTuple):
    """A row of the paper's Table 2 or 3 and the torchvision / timm model we count for it."""

    table: str
    network: str  # the paper's row name, a key of TABLE2 / TABLE3
    arch: str  # what _base builds
    label: str = ""  # how the model differs from the paper's network
    side: int = 224  # the paper's input side in pixels
    probe: int | None = None  # the side add_se probes at, where its default (64) is too small for the model
    kwargs: dict[str, Any] = {}  # for the model's builder


_V15 = "torchvision's v1.5 (stride in the 3x3 conv); the paper's are the original"
_NETWORK_ROWS = [
    _Row("Table 2", "ResNet-50", "resnet50", _V15),
    _Row("Table 2", "ResNet-101", "resnet101", _V15),
    _Row("Table 2", "ResNet-152", "resnet152", _V15),
    _Row("Table 2", "ResNeXt-50", "resnext50_32x4d"),
    _Row("Table 2", "ResNeXt-101", "timm:resnext101_32x4d"),
    _Row("Table 2", "VGG-16", "vgg16_bn", "VGG-16 with BN"),
    _Row("Table 2", "BN-Inception", "googlenet", "torchvision's GoogLeNet (with BN, no auxiliary heads): not the "
         "paper's BN-Inception, which neither torchvision nor timm has",
         kwargs={"aux_logits": False, "init_weights": False}),
    _Row("Table 2", "Inception-ResNet-v2", "timm:inception_resnet_v2", "at 299x299, as in the paper", 299, 96),
    _Row("Table 3", "MobileNet", "timm:mobilenetv1_100", "MobileNet 1.0"),
    _Row("Table 3", "ShuffleNet", "shufflenet_v2_x1_0", "ShuffleNetV2 1.0x: not the paper's ShuffleNet (v1), which "
         "neither torchvision nor timm has"),
]
"""Every Table 2-3 row, with the closest torchvision / timm model (the paper's own where one exists)."""

_TITLES = {
    "Table 2": "Table 2: the networks and their SE versions, r = 16 (multiply-adds in G)",
    "Table 3": "Table 3: the mobile networks and their SE versions, r = 16 (multiply-adds in M)",
}


def _reported(row: _Row) -> ReportedCost:
    return (TABLE2 if row.table == "Table 2" else TABLE3)[row.network]


def _pair(base: float | None, se: float | None, digits: int) -> str:
    """``"4.09 -> 4.10"``; a missing SE value (the surgery refused the network) is ``"-"``."""
    def one(value: float | None) -> str:
        return "-" if value is None else f"{value:.{digits}f}"
    return f"{one(base)} -> {one(se)}"


def network_table(rows: list[_Row], costs: list[NetworkCost]) -> str:
    """Table 2 or 3 (every row of ``rows`` from one table), ours beside the paper's; under it a note per row whose
    model differs from the paper's network or whose surgery was refused."""
    unit = TABLE_UNITS[rows[0].table]
    scale, digits, paper_digits = (1e9, 3, 2) if unit == "G" else (1e6, 1, 0)
    cells = [["network", "model", "SE", "params (M)", "paper", f"{unit}MACs", "paper's way", f"paper {unit}FLOPs"]]
    notes: list[str] = []
    labels: dict[str, list[str]] = {}
    for row, cost in zip(rows, costs):
        paper = _reported(row)
        se_params = None if cost.params_se is None else cost.params_se / 1e6
        macs_se = None if cost.macs_se is None else cost.macs_se / scale
        paper_se = None if cost.paper_macs_se is None else cost.paper_macs_se / scale
        cells.append([
            row.network, row.arch, "-" if cost.se_blocks is None else str(cost.se_blocks),
            _pair(cost.params_base / 1e6, se_params, 1), _pair(*paper.params_m, 1) if paper.params_m else "-",
            _pair(cost.macs_base / scale, macs_se, digits), _pair(cost.paper_macs_base / scale, paper_se, digits),
            _pair(*paper.flops, paper_digits),
        ])
        if row.label:
            labels.setdefault(row.label, []).append(f"{row.network} ({row.arch})")
        if cost.refusal is not None:
            notes.append(f"  {row.network}: no SE columns: add_se refuses {row.arch} ({cost.refusal})")
    notes[:0] = [f"  {', '.join(networks)}: {label}" for label, networks in labels.items()]
    return "\n".join([_TITLES[rows[0].table], format_columns(cells, left=2), *notes])


def row_cost(row: _Row) -> NetworkCost:
    """Our cost of one Table 2-3 row: its model and SE version at the paper's input size (r = 16)."""
    probe = {} if row.probe is None else {"example_input": torch.zeros(2, 3, row.probe, row.probe)}
    return network_cost(_base(row.arch, **row.kwargs), (1, 3, row.side, row.side), **probe)


def _print_network_tables() -> None:
    for table in _TITLES:
        rows = [row for row in _NETWORK_ROWS if row.table == table]
        print("\n" + network_table(rows, [row_cost(row) for row in rows]))
    print(
        "\nMultiply-adds (MACs) count convolutions and linear layers; the paper's way adds one pass of each SE's\n"
        "squeeze pooling (C x H x W adds per SE block), which is what the paper's FLOPs fit (Table 3: 569 -> 572 M).\n"
        "A row whose SE columns read - is one add_se refuses."
    )


def _print_paper_tables(rows: list[dict[str, Any]], size: tuple[int, ...]) -> None:
    print(f"SENet ablation costs on ResNet-50, {_shape_words(size)} input: ours (exact) beside the paper's (rounded)\n")
    cells, table = [["", "params", "paper", "GMACs", "paper's way", "paper GFLOPs"]], None
    for row in rows:
        if row["table"] != table:
            table = row["table"]
            cells.append([table])
        macs, paper_way = row["macs"], row["paper's way"]
        counts = [f"{macs / 1e9:.3f}", f"{paper_way / 1e9:.3f}", f"{row['paper GFLOPs']:.2f}"] if macs else []
        cells.append([f"  {row['variant']}", f"{row['params']:,}", f"{row['paper params (M)']:.1f}M", *counts])
    print(_ablation_columns(cells))
    print(
        "\nMultiply-adds count convolutions and linear layers, the paper's count also one pass of each SE's squeeze;\n"
        "torchvision's ResNet-50 is v1.5 (4.09 GMACs), the paper's the original (3.86), so compare the differences:\n"
        "NoSqueeze adds +0.41 G in both."
    )


def _ablation_columns(cells: list[list[str]]) -> str:
    """The ablation rows in columns; a table's title line (one cell) spans the row instead of widening column 1."""
    body = format_columns([row for row in cells if len(row) > 1]).splitlines()
    lines, rows = [], iter(body)
    for row in cells:
        lines.append(row[0] if len(row) == 1 else next(rows))
    return "\n".join(lines)


def _describe(arch: str, model: nn.Module, size: tuple[int, ...], **options: Any) -> tuple[str, Summary]:
    """The plan's table and :func:`summary` at the CLI's input size, refusals worded for a command line."""
    try:
        with eval_mode(model), torch.no_grad():
            model(torch.zeros(size))
    except Exception as err:
        gist = str(err).strip().splitlines()[0].rstrip(".!") if str(err).strip() else type(err).__name__
        what = f"{size[-1]}x{size[-1]} images" if len(size) == 4 and size[1] == 3 else f"a {_shape_words(size)} input"
        raise SurgeryError(
            f"{arch} ({type(model).__name__}) does not run on {what} ({gist}): pass the --input-size it takes, e.g. "
            "--input-size 224 (images), 1,16000 (audio) or 3,16,112,112 (video)"
        ) from None
    try:
        # batch 2, as add_se's own probe: a broadcast over the batch never looks like a residual sum
        chosen = plan(model, example_input=torch.zeros(2, *size[1:]), **options)
        table = str(chosen)
        return table, summary(apply_plan(chosen, inplace=True), size)
    except SurgeryError as err:
        found = getattr(err, "no_unit", None)
        if found is None:
            raise SurgeryError(str(err).replace("where= item", "--where item")) from None
        raise SurgeryError(
            f"{arch} has no CNN unit an SE can go on; {found}. The summary measures SE on CNNs: "
            f"try {_CNN_EXAMPLES}"
        ) from None


def main(argv: list[str] | None = None) -> int:
    """``python -m se_surgery.describe``: 0, or 2 with one line on stderr for a model the surgery refuses."""
    return run_cli(_main, argv, prog=PROG)


def _main(argv: list[str] | None) -> None:
    parser = ArgumentParser(
        prog=PROG,
        description="What add_se would do to a model (its plan), and the parameters and multiply-adds of the model "
        "and its SE version, next to the SENet paper.",
    )
    parser.add_argument("arch", nargs="?", default="resnet50", help="a torchvision.models.get_model name, timm:NAME, "
                        "or a factory of your code, package.module:function (built with its default num_classes)")
    defaults, choices = SEConfig.defaults(), SEConfig.choices()
    parser.add_argument("--reduction", "-r", type=int, default=defaults["reduction"],
                        help=f"the reduction ratio r (default {defaults['reduction']})")
    parser.add_argument("--where", type=_where, default=None,
                        help="blocks that get an SE: paper stages (2,3), owner prefixes (layer3) or paper names")
    for name in ("position", "squeeze", "excitation"):
        help = f"{SEConfig.__dataclass_fields__[name].metadata['help']} (default {defaults[name]})"
        parser.add_argument(f"--{name}", choices=choices[name], default=defaults[name], help=help)
    parser.add_argument("--no-bias", dest="bias", action="store_false", help="FC layers without bias (ablations)")
    parser.add_argument("--input-size", default=None,
                        help="an image side in pixels (default 224), or a channels-first shape C,SIZE[,SIZE...]: "
                        "3,16,112,112 for video, 1,16000 for audio")
    parser.add_argument("--paper-tables", action="store_true",
                        help="print Tables 10, 13, 15 and 16's costs on ResNet-50 (at --input-size) and Tables 2 and "
                        "3 (at the paper's sizes), ours beside the paper's")
    args = parser.parse_args(argv)
    size = _input_size(args.input_size or "224")
    if args.reduction < 1:
        raise SurgeryError(f"--reduction {args.reduction} must be a positive integer: pass e.g. --reduction 16")
    make_base = _base(args.arch)
    if args.paper_tables:
        if args.arch != "resnet50":
            raise SurgeryError("--paper-tables reproduces the paper's ResNet-50 ablations: use arch resnet50")
        _print_paper_tables(paper_tables(make_base, size), size)
        _print_network_tables()
        return
    options = {"where": args.where, "position": args.position, "squeeze": args.squeeze,
               "excitation": args.excitation, "bias": args.bias}
    table, result = _describe(args.arch, make_base(), size, reduction=args.reduction, **options)
    changed = ", ".join(f"{k}={v}" for k, v in options.items() if parser.get_default(k) != v)
    print(f"{args.arch} -> SE-{args.arch}, r={args.reduction}{', ' + changed if changed else ''}, "
          f"{_shape_words(size)} input\n")
    print(table + "\n")
    print(result)
    row = next((row for row in _NETWORK_ROWS if row.arch == args.arch), None)
    if row is not None and args.reduction == 16 and size == (1, 3, row.side, row.side) and not changed:
        cost = NetworkCost(result.se_blocks, result.params_base, result.params_se, result.macs_base, result.macs_se,
                           result.paper_macs_base, result.paper_macs_se)
        print("\n" + network_table([row], [cost]))


if __name__ == "__main__":
    raise SystemExit(main())
