"""``python -m se_surgery.summary resnet50``: an SE model's cost next to its base and the SENet paper's Table 2.

The function :func:`se_surgery.summary` shares this module's name; importing this module must not hide it, so the
module itself is callable and forwards to it.
"""

from __future__ import annotations

import argparse
import sys
import types

from .surgery.cost import PAPER, Summary, summary
from .errors import SurgeryError

__all__ = ["main", "summary", "Summary"]


def main(argv: list[str] | None = None) -> None:
    from torchvision.models import get_model, list_models

    from .surgery import add_se

    parser = argparse.ArgumentParser(
        prog="python -m se_surgery.summary",
        description="Parameters and multiply-adds of a torchvision model and its SE version, next to the SENet paper.",
    )
    parser.add_argument("arch", nargs="?", default="resnet50", help="a torchvision.models.get_model name")
    parser.add_argument("--reduction", "-r", type=int, default=16, help="the reduction ratio r (default 16)")
    parser.add_argument("--input-size", type=int, default=224, help="image side in pixels (default 224)")
    args = parser.parse_args(argv)
    if args.arch not in list_models():
        parser.error(f"unknown arch {args.arch!r}; try one of: resnet50, resnext50_32x4d, mobilenet_v2, convnext_tiny")
    try:
        se_model = add_se(get_model(args.arch), args.reduction)
    except SurgeryError as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")  # one line, no traceback
    result = summary(se_model, (1, 3, args.input_size, args.input_size))
    print(f"{args.arch} -> SE-{args.arch}, r={args.reduction}, {args.input_size}x{args.input_size} input\n")
    print(result)
    if args.arch in PAPER and args.reduction == 16 and args.input_size == 224:
        (p0, p1), (g0, g1) = PAPER[args.arch]["params"], PAPER[args.arch]["gmacs"]
        print(
            f"\n{'':14}{'ours':>22}{'paper (SENet Table 2)':>26}\n"
            f"{'params (M)':14}{result.params_base / 1e6:>10.1f} -> {result.params_se / 1e6:<8.1f}{p0:>14.1f} -> {p1:.1f}\n"
            f"{'GMACs':14}{result.macs_base / 1e9:>10.2f} -> {result.macs_se / 1e9:<8.2f}{g0:>14.2f} -> {g1:.2f}\n"
            "Multiply-adds here count convolutions and linear layers (torch's flop counter); the paper's +0.26%\n"
            "also counts the SE's pooling and channel-wise scaling. The base counts differ because torchvision's\n"
            "ResNets are v1.5 (stride in the 3x3 conv, 4.09 GMACs), the paper's the original (3.86)."
        )


class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs) -> Summary:
        return summary(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

if __name__ == "__main__":
    main()
