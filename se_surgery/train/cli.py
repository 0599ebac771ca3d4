"""The command line of ``python -m se_surgery.train``: one flag per :class:`~se_surgery.train.recipe.Recipe` field."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import typing
from pathlib import Path

from ..archs import split_arch
from ..cli import ArgumentParser, run_cli
from ..errors import TrainError
from .distributed import is_rank_zero
from .loop import train
from .metrics import METRICS_NAME, read_metrics
from .recipe import PAPER, RECIPE_NAMES, RECIPES, Recipe, recipe_from_flags
from .resume import ResumePoint, resolve_resume

__all__ = ["main", "build_parser"]

PROG = "python -m se_surgery.train"

_EXAMPLES = """\
examples:
  # SE-ResNet-18 on the embedded digits, on the CPU (>= 97% val top-1)
  python -m se_surgery.train --out runs/demo
  # continue a stopped run (or extend it: --resume auto --epochs 12)
  python -m se_surgery.train --out runs/demo --resume auto
  # the paper's SE-ResNet-50 on ImageNet, one GPU (batch 1024 as 4 x 256 accumulated)
  python -m se_surgery.train --data /data/imagenet --out runs/se50 --accum-steps 4 --amp --channels-last
  # 8 GPUs on one node, or 2 nodes x 8 (run on each node, NODE_RANK 0 and 1)
  torchrun --nproc-per-node 8 -m se_surgery.train --data /data/imagenet --out runs/se50 --amp --sync-bn
  torchrun --nnodes 2 --node-rank $NODE_RANK --nproc-per-node 8 --rdzv-backend c10d \\
           --rdzv-endpoint host0:29400 -m se_surgery.train --data /data/imagenet --out runs/se50 --amp

The run folder gets config.json (the resolved recipe), metrics.jsonl (one line per epoch), last.pt and best.pt;
load a checkpoint with se_surgery.load_checkpoint(path). Flags left out take the recipe's value: --recipe paper
(the default with --data PATH) is SENet's ImageNet recipe; --recipe demo (the default on the digits) scales it down.
"""


def _flag_type(hint: typing.Any) -> typing.Any:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


class _BadJSON(str):
    """What ``--arch-kwargs`` parses to when its value is not a JSON object: the one-line complaint, raised by main."""


def _json_object(text: str) -> dict | _BadJSON:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        problem = f"not JSON ({e})"
    else:
        if isinstance(value, dict):
            return value
        problem = f"a JSON {type(value).__name__}, not an object"
    return _BadJSON(f"--arch-kwargs {text!r}: {problem}: pass a JSON object, e.g. "
                    "'{\"zero_init_residual\": true}' (or '{}' for none)")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog=PROG,
        description="Retrain an SE network the SENet paper's way (SGD, class-aware sampling, step decay).",
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run = parser.add_argument_group("run")
    run.add_argument("--out", type=Path, default=Path("runs/train"), help="run folder (default: runs/train)")
    run.add_argument("--recipe", choices=RECIPE_NAMES,
                     help="base recipe: demo (the digits' default), paper (a folder's default), or finetune, the "
                     "data's default made for a start from --weights FILE: identity-initialised SE, a tenth of the "
                     "learning rate for the pretrained weights, warmup and cosine decay")
    run.add_argument("--resume", metavar="auto|PATH", help="continue from OUT/last.pt (auto) or from a checkpoint")
    run.add_argument("--tensorboard", action="store_true", help="also log to OUT/tb (needs tensorboard)")
    run.add_argument("--no-progress", action="store_true", help="no tqdm bars (e.g. in batch jobs)")
    run.add_argument("--trust-factory", action="store_true",
                     help="resume a run whose --arch is a module:factory without naming it again (it imports and "
                     "calls that code; a checkpoint never does so on its own)")
    recipe = parser.add_argument_group("recipe (each defaults to the chosen recipe's value)")
    hints = typing.get_type_hints(Recipe)
    demo = RECIPES["demo"]
    for field in dataclasses.fields(Recipe):
        meta = dict(field.metadata)
        flag = meta.pop("flag", "--" + field.name.replace("_", "-"))
        default = f"paper: {getattr(PAPER, field.name)}, demo: {getattr(demo, field.name)}"
        kwargs = {"dest": field.name, "default": argparse.SUPPRESS, "help": f"{meta.pop('help')} ({default})", **meta}
        kind = _flag_type(hints[field.name])
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif kind is dict:
            kwargs["type"] = _json_object
        elif "type" not in kwargs:
            kwargs["type"] = kind
        recipe.add_argument(flag, **kwargs)
    return parser


def _recipe_from(args: argparse.Namespace) -> tuple[Recipe, ResumePoint]:
    """The recipe to train and where to start: a resumed run keeps its own recipe, explicit flags on top.

    The trainer then refuses the flags that would change what the resumed run trains
    (:data:`~se_surgery.train.resume.RESUME_MAY_CHANGE`), before it rewrites ``config.json``.
    """
    start = resolve_resume(args.resume, args.out)
    if start.config is not None:
        _check_factory_trusted(start.config.get("arch", ""), args, start.path)
    return recipe_from_flags(args, saved=start.config), start


def _check_factory_trusted(arch: str, args: argparse.Namespace, path: Path | None) -> None:
    """A resumed run built by a ``module:factory`` imports that code only if the command line names it again."""
    if not isinstance(arch, str) or split_arch(arch)[0] != "factory" or args.trust_factory or \
            getattr(args, "arch", None) == arch:
        return
    raise TrainError(f"{path} was trained with --arch {arch}, code that a checkpoint does not import on its own: pass "
                     f"--arch {arch} (or --trust-factory) if you trust it")


def main(argv: list[str] | None = None) -> int:
    """``python -m se_surgery.train``: 0 when the run finished, 2 (one line on stderr) on bad input, 130 on Ctrl-C."""
    return run_cli(_main, argv, prog=PROG)


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    if isinstance(getattr(args, "arch_kwargs", None), _BadJSON):
        raise TrainError(args.arch_kwargs)
    main_rank = is_rank_zero()
    logging.basicConfig(level=logging.INFO if main_rank else logging.WARNING, format="%(message)s")
    recipe, start = _recipe_from(args)
    recipe.resolved()  # every flag checked before any work
    out = train(recipe, args.out, resume=start, tensorboard=args.tensorboard, progress=not args.no_progress)
    if main_rank:
        best = max((m["val_top1"] for m in read_metrics(out) if "val_top1" in m and m.get("epoch", 0) > 0),
                   default=float("nan"))  # best.pt holds a trained epoch, never the epoch-0 evaluation
        print(f"done: best val top-1 {best:.2f}% -> {out / 'best.pt'} (metrics in {out / METRICS_NAME})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
