"""``python -m se_surgery.export RUN/best.pt OUT.safetensors``: a trained SE model's weights out, as safetensors.

It writes ``OUT.safetensors`` (the model's ``state_dict``: tensors only, no pickle) and ``OUT.json`` beside it (the
checkpoint's ``model_config``, recipe, epoch, step and metrics), so that ``se_surgery.load_checkpoint(
"OUT.safetensors")`` rebuilds the model (:mod:`se_surgery.train.exported`). The checkpoint is read ``weights_only``
and no model is built, so a factory of someone's code (``package.module:function``) is never imported here. An
existing ``OUT`` (or its ``.json``) is replaced only with ``--force``. A torchvision ResNet/ResNeXt with the default
SE (``divisor=8`` for ResNet-18/34) exports under timm's ``seresnet*``/``seresnext*`` keys: the file loads strict
into ``timm.create_model("seresnet50", num_classes=...)``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from .cli import ArgumentParser, run_cli

__all__ = ["export_checkpoint", "main"]

PROG = "python -m se_surgery.export"


def export_checkpoint(checkpoint: str | os.PathLike, out: str | os.PathLike, *, force: bool = False) -> Path:
    """Export the model of ``checkpoint`` (written by ``python -m se_surgery.train``) to ``out`` (``.safetensors``)
    and its config to ``out`` with the suffix ``.json``; return ``out``.

    Raises:
        CheckpointError: ``out`` does not end in ``.safetensors`` or exists (without ``force``), the checkpoint is
            missing, damaged, unsafe or foreign, or the write fails (an existing ``out`` then keeps what it held).

    Examples:
        >>> export_checkpoint("runs/demo/best.pt", "se18.safetensors")  # doctest: +SKIP
        PosixPath('se18.safetensors')
    """
    from .train.checkpoint import read_checkpoint
    from .train.exported import check_target, write_export

    out = check_target(out, force=force)  # before the checkpoint is read
    return write_export(out, read_checkpoint(checkpoint), force=force)


def main(argv: list[str] | None = None) -> int:
    """``python -m se_surgery.export``: 0, or 2 with one line on stderr."""
    return run_cli(_main, argv, prog=PROG)


def _main(argv: list[str] | None) -> None:
    parser = ArgumentParser(
        prog=PROG,
        description="Write a trained SE model's weights as safetensors (OUT.safetensors) and, beside them, the config\n"
        "that rebuilds it (OUT.json): se_surgery.load_checkpoint('OUT.safetensors') reads the pair. No model is\n"
        "built, so a factory (package.module:function) the checkpoint names is never imported here.",
        epilog="example:\n  python -m se_surgery.export runs/demo/best.pt se_resnet18.safetensors\n\n"
        "A torchvision resnet*/resnext* with the default SE (and divisor=8 for resnet18/34) exports under timm's\n"
        "seresnet*/seresnext* keys: the file loads strict into timm.create_model('seresnet50', num_classes=N).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("checkpoint", metavar="CHECKPOINT",
                        help="a checkpoint written by python -m se_surgery.train (RUN/best.pt)")
    parser.add_argument("out", metavar="OUT", help="the weights file to write, ending in .safetensors; OUT.json (the "
                        "same name, .json) is written beside it")
    parser.add_argument("--force", action="store_true", help="replace OUT and OUT.json if they exist (default: refuse)")
    args = parser.parse_args(argv)
    from .archs import is_factory
    from .train.exported import config_path, read_export, timm_twin

    out = export_checkpoint(args.checkpoint, args.out, force=args.force)
    state, info = read_export(out)  # what load_checkpoint will read, read back once
    size = sum(v.numel() * v.element_size() for v in state.values())
    config = info["model_config"]
    arch = str(config.get("arch"))
    factory = f", factory={arch!r}" if is_factory(arch) else ""
    print(f"wrote {out} ({len(state)} tensors, {size / 2**20:.1f} MB) and {config_path(out)} "
          f"({arch}, {config.get('num_classes')} classes): se_surgery.load_checkpoint('{out}'{factory}) "
          "rebuilds the model")
    twin = timm_twin(config)
    if twin is not None:
        print(f"its keys are timm's: timm.create_model('{twin}', num_classes={config.get('num_classes')})"
              ".load_state_dict(safetensors.torch.load_file(OUT)) loads it strict")


if __name__ == "__main__":
    raise SystemExit(main())
