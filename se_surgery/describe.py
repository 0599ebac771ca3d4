"""``python -m se_surgery.describe resnet50``: what add_se would do to a model, and its cost beside the paper's.

It prints the plan (:func:`se_surgery.plan`: one row per SE block, then what is skipped and why), then the SE model's
parameters and multiply-adds next to its base and, for the paper's ResNets, Table 2. The options are
:func:`se_surgery.add_se`'s (``--reduction``, ``--where``, ``--position``, ``--squeeze``, ``--excitation``,
``--no-bias``); ``--paper-tables`` prints the cost columns of the paper's ablation Tables 10, 13, 15 and 16 for
ResNet-50, ours beside the paper's. ``python -m se_surgery.summary`` is the same command's deprecated name.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .archs import split_arch
from .cli import ArgumentParser, run_cli
from .errors import SurgeryError
from .modes import eval_mode
from .paper import TABLE2
from .surgery import SEConfig, apply_plan, plan
from .surgery.cost import Summary, paper_tables, summary

__all__ = ["main"]

PROG = "python -m se_surgery.describe"

_RESIDUAL_EXAMPLES = "resnet50, resnext50_32x4d, mobilenet_v2, regnet_x_400mf, convnext_tiny or timm:resnet50"


def _where(text: str) -> list[int | str]:
    """``"2,3"`` -> ``[2, 3]`` (paper stages); other items stay names (``"layer3,SE_5_2"``)."""
    return [int(item) if item.strip().isdigit() else item.strip() for item in text.split(",") if item.strip()]


def _base(arch: str):
    source, name = split_arch(arch)
    if source == "timm":
        try:
            import timm
        except ImportError:
            raise SurgeryError(f"{arch} needs timm (pip install timm)") from None
        if name not in timm.list_models():
            raise SurgeryError(f"unknown timm model {name!r}: pick a name from timm.list_models()")
        return lambda: timm.create_model(name)
    from torchvision.models import get_model, list_models

    if arch not in list_models():
        raise SurgeryError(f"unknown arch {arch!r}; try one of: resnet50, resnext50_32x4d, mobilenet_v2, "
                           "convnext_tiny, timm:resnet50")
    return lambda: get_model(arch)


def _print_paper_tables(rows: list[dict[str, Any]], size: int) -> None:
    print(f"SENet ablation costs on ResNet-50, {size}x{size} input: ours (exact) beside the paper's (rounded)\n")
    print(f"{'':30}{'params':>14}{'paper':>9}{'GMACs':>9}{'paper GFLOPs':>14}")
    table = None
    for row in rows:
        if row["table"] != table:
            table = row["table"]
            print(table)
        macs = f"{row['macs'] / 1e9:>9.2f}{row['paper GFLOPs']:>14.2f}" if row["macs"] is not None else ""
        print(f"  {row['variant']:28}{row['params']:>14,}{row['paper params (M)']:>8.1f}M{macs}")
    print(
        "\nMultiply-adds count convolutions and linear layers; torchvision's ResNet-50 is v1.5 (4.09 GMACs), the\n"
        "paper's the original (3.86), so compare the differences: NoSqueeze adds +0.41 G in both."
    )


def _describe(arch: str, model: nn.Module, size: tuple[int, ...], **options: Any) -> tuple[str, Summary]:
    """The plan's table and :func:`summary` at the CLI's input size, refusals worded for a command line."""
    try:
        with eval_mode(model), torch.no_grad():
            model(torch.zeros(size))
    except Exception as err:
        gist = str(err).strip().splitlines()[0].rstrip(".!") if str(err).strip() else type(err).__name__
        raise SurgeryError(
            f"{arch} ({type(model).__name__}) does not run on {size[-1]}x{size[-1]} images ({gist}): pass the "
            f"--input-size it takes, e.g. --input-size 224"
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
            f"{arch} has no residual CNN unit an SE can go on; {found}. The summary measures SE on residual CNNs: "
            f"try {_RESIDUAL_EXAMPLES}"
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
    parser.add_argument("arch", nargs="?", default="resnet50", help="a torchvision.models.get_model name, or timm:NAME")
    defaults, choices = SEConfig.defaults(), SEConfig.choices()
    parser.add_argument("--reduction", "-r", type=int, default=defaults["reduction"],
                        help=f"the reduction ratio r (default {defaults['reduction']})")
    parser.add_argument("--where", type=_where, default=None,
                        help="blocks that get an SE: paper stages (2,3), owner prefixes (layer3) or paper names")
    for name in ("position", "squeeze", "excitation"):
        help = f"{SEConfig.__dataclass_fields__[name].metadata['help']} (default {defaults[name]})"
        parser.add_argument(f"--{name}", choices=choices[name], default=defaults[name], help=help)
    parser.add_argument("--no-bias", dest="bias", action="store_false", help="FC layers without bias (ablations)")
    parser.add_argument("--input-size", type=int, default=224, help="image side in pixels (default 224)")
    parser.add_argument("--paper-tables", action="store_true",
                        help="print Tables 10, 13, 15 and 16's costs, ours beside the paper's (resnet50 only)")
    args = parser.parse_args(argv)
    for flag, value, example in (("--input-size", args.input_size, 224), ("--reduction", args.reduction, 16)):
        if value < 1:
            raise SurgeryError(f"{flag} {value} must be a positive integer: pass e.g. {flag} {example}")
    make_base = _base(args.arch)
    size = (1, 3, args.input_size, args.input_size)
    if args.paper_tables:
        if args.arch != "resnet50":
            raise SurgeryError("--paper-tables reproduces the paper's ResNet-50 ablations: use arch resnet50")
        _print_paper_tables(paper_tables(make_base, size), args.input_size)
        return
    options = {"where": args.where, "position": args.position, "squeeze": args.squeeze,
               "excitation": args.excitation, "bias": args.bias}
    table, result = _describe(args.arch, make_base(), size, reduction=args.reduction, **options)
    changed = ", ".join(f"{k}={v}" for k, v in options.items() if parser.get_default(k) != v)
    print(f"{args.arch} -> SE-{args.arch}, r={args.reduction}{', ' + changed if changed else ''}, "
          f"{args.input_size}x{args.input_size} input\n")
    print(table + "\n")
    print(result)
    if args.arch in TABLE2 and args.reduction == 16 and args.input_size == 224 and not changed:
        (p0, p1), (g0, g1) = TABLE2[args.arch]["params"], TABLE2[args.arch]["gmacs"]
        print(
            f"\n{'':14}{'ours':>22}{'paper (SENet Table 2)':>26}\n"
            f"{'params (M)':14}{result.params_base / 1e6:>10.1f} -> {result.params_se / 1e6:<8.1f}"
            f"{p0:>14.1f} -> {p1:.1f}\n"
            f"{'GMACs':14}{result.macs_base / 1e9:>10.2f} -> {result.macs_se / 1e9:<8.2f}{g0:>14.2f} -> {g1:.2f}\n"
            "Multiply-adds here count convolutions and linear layers (torch's flop counter); the paper's +0.26%\n"
            "also counts the SE's pooling and channel-wise scaling. The base counts differ because torchvision's\n"
            "ResNets are v1.5 (stride in the 3x3 conv, 4.09 GMACs), the paper's the original (3.86)."
        )


if __name__ == "__main__":
    raise SystemExit(main())
