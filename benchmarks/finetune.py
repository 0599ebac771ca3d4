"""SE on a pretrained network, measured: train on without SE, or add SE with He or identity init, or freeze the rest.

Two pretrained plain networks (the data's default recipe, ``--recipe demo`` on the digits):

* **continued**: pretrained on every class, fine-tuned on the same classes (the same task, trained on);
* **transfer**: pretrained on the first half of the classes (digits 0-4), fine-tuned on the other half (5-9) with a
  new head, as a user's own data would be.

Each is fine-tuned five ways with ``--recipe finetune --weights FILE``, with the same budget, data and seed:
(a) ``--no-se``; (b) SE with ``--se-init he``; (c) SE with identity init (the recipe's, gates starting at 0.5);
(c1) identity init with the gates at 1 (``--gate-start 1``); (d) (c) with ``--freeze-backbone``. The table gives
val top-1 at step 0 (``metrics.jsonl``'s epoch-0 row), at the end and at its best, and the seconds per training
epoch; ``docs/finetune.md`` is written from it.

Run: ``python benchmarks/finetune.py`` (about 10 minutes on 2 CPU cores; finished runs in ``--out`` are reused), or
``python benchmarks/finetune.py --data PATH --arch resnet50`` for a folder in ImageNet layout (its classes split in
half by name order), with any further trainer flags after ``--``.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import textwrap
import time
from pathlib import Path

import torch

from se_surgery.train.checkpoint import load_checkpoint, read_checkpoint
from se_surgery.train.cli import main as train_main
from se_surgery.train.data import DIGITS, build_dataset
from se_surgery.train.metrics import read_metrics

VARIANTS = {  # name -> the trainer flags on top of --recipe finetune --weights FILE
    "(a) no SE": ["--no-se"],
    "(b) SE, He init": ["--se-init", "he"],
    "(c) SE, identity init (the recipe's: gates at 0.5, BN x 2)": [],
    "(c1) SE, identity init, gates at 1 (--gate-start 1)": ["--gate-start", "1"],
    "(d) SE, identity init, backbone frozen": ["--freeze-backbone"],
}
DOC = Path(__file__).resolve().parents[1] / "docs" / "finetune.md"


def _train(args: list[str]) -> None:
    code = train_main([*args, "--resume", "auto", "--no-progress"])
    if code:
        raise SystemExit(f"the trainer stopped with exit code {code}: {' '.join(args)}")


def _plain_weights(run: Path, out: Path) -> Path:
    """The plain state_dict of ``run``'s best epoch, saved alone, as a user's own weights file would be."""
    model, _ = load_checkpoint(run / "best.pt")
    torch.save(model.state_dict(), out)
    return out


def _measure(run: Path) -> dict:
    rows = read_metrics(run)
    trained = [r for r in rows if r["epoch"] > 0]
    state = read_checkpoint(run / "last.pt")["model"]
    fc2 = [v.abs().max().item() for k, v in state.items() if k.endswith("se.fc2.weight")]
    return {"step0": rows[0]["val_top1"], "end": trained[-1]["val_top1"], "best": max(r["val_top1"] for r in trained),
            "fc2": max(fc2) if fc2 else None, "s_per_epoch": sum(r["seconds"] for r in trained) / len(trained)}


def _row(setting: str, variant: str, runs: list[Path]) -> dict:
    """One table row: each measure over the seeds' runs (mean, min, max)."""
    measured = [_measure(run) for run in runs]
    row: dict = {"setting": setting, "variant": variant, "seeds": len(runs)}
    for key in ("step0", "end", "best", "fc2", "s_per_epoch"):
        values = [m[key] for m in measured if m[key] is not None]
        row[key] = (sum(values) / len(values), min(values), max(values)) if values else None
    return row


def run_all(data: str, arch: str, out: Path, extra: list[str], seeds: list[int]) -> tuple[list[dict], dict]:
    """Pretrain the two plain networks, fine-tune each five ways with each seed; the table's rows and what was run."""
    classes = list(build_dataset(data, "val", input_size=32).classes)
    first, second = classes[: len(classes) // 2], classes[len(classes) // 2:]
    common = ["--data", data, "--arch", arch, *extra]
    _train([*common, "--no-se", "--out", str(out / "pretrain_all")])
    _train([*common, "--no-se", "--classes", *first, "--out", str(out / "pretrain_half")])
    settings = {
        "continued": (_plain_weights(out / "pretrain_all", out / "plain_all.pt"), []),
        "transfer": (_plain_weights(out / "pretrain_half", out / "plain_half.pt"), ["--classes", *second,
                                                                                    "--new-head"]),
    }
    rows = []
    for setting, (weights, flags) in settings.items():
        for variant, variant_flags in VARIANTS.items():
            runs = [out / f"{setting}_{variant.split(')')[0][1:]}_seed{seed}" for seed in seeds]
            for seed, run in zip(seeds, runs):
                _train([*common, "--recipe", "finetune", "--weights", str(weights), *flags, *variant_flags,
                        "--seed", str(seed), "--out", str(run)])
            rows.append(_row(setting, variant, runs))
    pretrain = {name: max(r["val_top1"] for r in read_metrics(out / name) if r["epoch"] > 0)
                for name in ("pretrain_all", "pretrain_half")}
    facts = {"data": data, "arch": arch, "first": first, "second": second, "pretrain": pretrain, "seeds": seeds,
             "config": json.loads((out / f"continued_c_seed{seeds[0]}" / "config.json").read_text())}
    return rows, facts


def _cell(value: tuple | None, spec: str = ".2f", spread: bool = True) -> str:
    if value is None:
        return "-"
    mean, low, high = value
    return f"{mean:{spec}}" + (f" ({low:{spec}}-{high:{spec}})" if spread and high > low else "")


def table(rows: list[dict]) -> str:
    lines = ["| setting | variant | top-1 at step 0 | top-1 at the end | best top-1 | largest fc2 weight at the end | "
             "s / epoch |", "|---|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['setting']} | {r['variant']} | {_cell(r['step0'])} | {_cell(r['end'])} | {_cell(r['best'])} | "
              f"{_cell(r['fc2'], '.0e', spread=False)} | {_cell(r['s_per_epoch'], '.1f', spread=False)} |"
              for r in rows]
    return "\n".join(lines)


def _find(rows: list[dict], setting: str, letter: str) -> dict:
    return next(r for r in rows if r["setting"] == setting and r["variant"].startswith(f"({letter})"))


def write_doc(rows: list[dict], facts: dict, command: str) -> None:
    cfg = facts["config"]
    seeds = ", ".join(map(str, facts["seeds"]))

    def mean(setting: str, letter: str, key: str) -> float:
        return _find(rows, setting, letter)[key][0]

    moved = {letter: max(mean(s, letter, "fc2") for s in ("continued", "transfer")) for letter in ("c", "c1")}
    kept = all(_find(rows, s, k)["step0"] == _find(rows, s, "a")["step0"] for s in ("continued", "transfer")
               for k in ("c", "c1", "d"))
    if not kept:  # the prose below says they are equal: never write it when they are not
        raise SystemExit("identity init did not start at the plain network's top-1: see the table above")
    ends = {setting: ", ".join(f"({k}) {mean(setting, k, 'end'):.2f}" for k in ("a", "b", "c", "c1", "d"))
            for setting in ("continued", "transfer")}
    intro = (
        f"Two plain {facts['arch']} networks were pretrained with the demo recipe: one on all "
        f"{len(facts['first']) + len(facts['second'])} classes (best val top-1 "
        f"{facts['pretrain']['pretrain_all']:.2f}%), one on classes {', '.join(facts['first'])} only "
        f"({facts['pretrain']['pretrain_half']:.2f}%). Each was then fine-tuned with `--recipe finetune --weights "
        f"FILE`: **continued** on the same classes, **transfer** on classes {', '.join(facts['second'])} with "
        f"`--new-head`. Every fine-tune run has the same budget ({cfg['epochs']} epochs over its classes' training "
        f"images at batch {cfg['batch_size']}; lr {cfg['lr']} for the pretrained weights, {cfg['se_lr']} for the new "
        f"ones, {cfg['warmup_epochs']:g} epoch of warmup, cosine decay). Each row is the mean over seeds {seeds} (the "
        "range in brackets when the seeds differ); \"top-1 at step 0\" is the epoch-0 row of `metrics.jsonl`, the "
        "network before any step, and \"largest fc2 weight\" says whether the gates learned anything (identity init "
        "starts fc2 at 0).")
    shows = [
        f"**Step 0.** With identity init, (c), (c1) and (d) start at the plain network's top-1 "
        f"({mean('continued', 'a', 'step0'):.2f}% continued), whether the gates start at 1 or at 0.5 with the "
        f"BatchNorm before them doubled. He init (b) starts at {mean('continued', 'b', 'step0'):.2f}%: its random "
        "gates scale the channels arbitrarily.",
        f"**Gates at 1 do not learn.** At s = 1 the sigmoid's slope is 5e-5: with `--gate-start 1` (c1) fc2's "
        f"largest weight ends at {moved['c1']:.0e}, so the SE network stays the plain one: (c1) ends at "
        f"{mean('continued', 'c1', 'end'):.2f} / {mean('transfer', 'c1', 'end'):.2f} (continued / transfer), (a) at "
        f"{mean('continued', 'a', 'end'):.2f} / {mean('transfer', 'a', 'end'):.2f}. Started at 0.5 (c), the gates "
        f"learn (fc2 up to {moved['c']:.0e}).",
        f"**The end** (mean top-1). Continued: {ends['continued']}. Transfer: {ends['transfer']}. The frozen "
        f"backbone (d) trains the SE blocks and the head only, in "
        f"{mean('continued', 'd', 's_per_epoch') / mean('continued', 'c', 's_per_epoch'):.0%} (continued) and "
        f"{mean('transfer', 'd', 's_per_epoch') / mean('transfer', 'c', 's_per_epoch'):.0%} (transfer) of (c)'s "
        "time per epoch.",
    ]
    caveat = (
        "What it does not show: the digits are 1,797 8x8 images upsampled to 32 px, a run lasts seconds and the "
        "validation set has 360 (continued) or 180 (transfer) images, so one image is 0.28 or 0.56 points and "
        f"differences of a point or two between variants are within the spread of {len(facts['seeds'])} seeds. The "
        "table demonstrates the tool and the recipe, not SE's accuracy on ImageNet (the paper's Table 2 is the "
        "reference for that). Run the same command with `--data PATH` on your own folder to measure it there.")
    wrap = functools.partial(textwrap.fill, width=118)
    DOC.write_text("\n\n".join([
        "# SE on a pretrained network: the digits, measured",
        f"Written by `{command}` ({time.strftime('%Y-%m-%d')}; {torch.get_num_threads()} CPU threads). Do not edit "
        "by hand.",
        wrap(intro), table(rows),
        "What it shows:\n" + "\n".join(wrap(item, initial_indent="- ", subsequent_indent="  ") for item in shows),
        wrap(caveat)]) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=DIGITS, help="digits (default) or a folder in ImageNet layout")
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--out", type=Path, default=Path("runs/finetune"), help="run folders (reused when finished)")
    parser.add_argument("--seeds", default="0,1,2", help="fine-tune seeds, comma-separated (default: 0,1,2)")
    parser.add_argument("--no-doc", action="store_true", help=f"print the table only; do not rewrite {DOC.name}")
    parser.add_argument("extra", nargs="*", help="further trainer flags for every run (after --)")
    args = parser.parse_args(argv)
    rows, facts = run_all(args.data, args.arch, args.out, args.extra, [int(x) for x in args.seeds.split(",")])
    print(table(rows))
    if not args.no_doc and args.data == DIGITS:
        write_doc(rows, facts, "python benchmarks/finetune.py")
        print(f"wrote {DOC}")


if __name__ == "__main__":
    main(sys.argv[1:])
