"""The zoo: add_se over every torchvision classification model and one small model per timm family, checked.

    python benchmarks/zoo.py                      # everything (about 15 min on one core), then the tables
    python benchmarks/zoo.py --only dla34,ghostnet_050 --resume   # some models, keeping the other rows
    python benchmarks/zoo.py --source timm --resume               # one part of the zoo
    python benchmarks/zoo.py --report                             # only rewrite zoo.md and surgery.md from the CSV
    python benchmarks/zoo.py --select-timm        # re-pick the smallest model of each timm family (meta device)

For each model (random weights, eval mode, one thread): the base output on ``randn(2, 3, S, S)``, ``add_se`` on that
input, the SE model's forward (it must run and give the base output's shape) and ``remove_se`` (it must give the base
output back exactly, ``torch.equal``). S is ``--size`` (64 px) when the model accepts it, else the model's own
default input size. Outcomes: ``ok`` (SE blocks, all checks pass), ``refused`` (a ``SurgeryError``: the model has
nothing add_se can gate, with the reason), ``broken`` (any other exception, or a failed check), ``timeout``
(``--limit`` seconds per model). "Residual units" counts every unit the rule found, narrow ones included (a second
surgery with ``divisor=1`` counts them when some were too narrow for r = 16).

Writes docs/zoo.csv and docs/zoo.md (the full table) and rewrites docs/surgery.md between ``<!-- zoo:begin -->`` and
``<!-- zoo:end -->`` with the summary.
"""

from __future__ import annotations

import argparse
import csv
import fnmatch
import gc
import json
import logging
import signal
import textwrap
import time
from collections import Counter
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Iterator

import torch
import torchvision
from torch import nn

from se_surgery import SurgeryError, add_se, remove_se, se_blocks

ROOT = Path(__file__).resolve().parents[1]
TIMM_CHOICE = ROOT / "benchmarks" / "zoo_timm.json"
CSV_PATH, MD_PATH = ROOT / "docs" / "zoo.csv", ROOT / "docs" / "zoo.md"
SUMMARY_PAGE = ROOT / "docs" / "surgery.md"  # the summary's home, between BEGIN and END
BEGIN, END = "<!-- zoo:begin -->", "<!-- zoo:end -->"
# Left out for time: torchvision's two largest (over 600M parameters each) and timm's deepseek_vit family, whose
# smallest model (412M parameters, a ViT) takes over 4 minutes on one core; minutes apiece, all of them transformers.
TOO_LARGE = {"vit_h_14", "regnet_y_128gf", "deepseek_vit_412m"}


@dataclass
class Row:
    model: str
    source: str  # torchvision / timm
    family: str  # timm's module name, or torchvision's
    size: int
    outcome: str  # ok / refused / broken / timeout
    se_blocks: int
    residual_units: int
    seconds: float  # add_se alone
    reason: str  # why refused or broken; for ok, what add_se skipped (its warning)


class _Timeout(Exception):
    pass


class _Warnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def torchvision_models() -> Iterator[tuple[str, str, str]]:
    for name in torchvision.models.list_models(module=torchvision.models):
        if name not in TOO_LARGE:
            family = torchvision.models.get_model_builder(name).__module__.rpartition(".")[2]
            yield name, "torchvision", family


def timm_models() -> Iterator[tuple[str, str, str]]:
    for family, name in json.loads(TIMM_CHOICE.read_text()).items():
        if name not in TOO_LARGE:
            yield name, "timm", family


_SMALL = ("atto", "femto", "pico", "zepto", "nano", "tiny", "micro", "xxs", "xs", "small", "050", "b0", "m0", "t", "s")


def _smallness(name: str) -> tuple[int, int, str]:
    """Rank of a name's size word (atto < femto < ... < small), then length: the likely smallest models first."""
    rank = next((i for i, w in enumerate(_SMALL) if w in name.replace("-", "_").split("_") or w in name), len(_SMALL))
    return rank, len(name), name


def select_timm(candidates: int = 6) -> dict[str, str]:
    """The model with fewest parameters of each timm module (family), counted on the meta device (no weights).

    Only the ``candidates`` most likely smallest names of a family (by their size words) are built, to stay fast.
    """
    import timm

    choice = {}
    for family in timm.list_modules():
        counts = {}
        for name in sorted(timm.list_models(module=family), key=_smallness)[:candidates]:
            try:
                with torch.device("meta"):
                    counts[name] = sum(p.numel() for p in timm.create_model(name).parameters())
            except Exception:  # a model that cannot be built on the meta device is simply not a candidate
                continue
        if counts:
            choice[family] = min(counts, key=lambda n: (counts[n], n))
    return choice


def build(name: str, source: str) -> tuple[nn.Module, int]:
    """The model with random weights, and its own default input size."""
    torch.manual_seed(0)
    if source == "timm":
        import timm

        model = timm.create_model(name, pretrained=False)
        return model, int(model.pretrained_cfg.get("input_size", (3, 224, 224))[-1])
    model = torchvision.models.get_model(name, weights=None)
    weights = torchvision.models.get_model_weights(name)
    crop = next(iter(weights)).transforms().crop_size[0]
    return model, int(crop)


def _forward(model: nn.Module, x: torch.Tensor):
    with torch.no_grad():
        return model.eval()(x)


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_equal, a, b))
    return a == b


def _shapes(out):
    return out.shape if isinstance(out, torch.Tensor) else [_shapes(o) for o in out]


def check(name: str, source: str, family: str, size: int) -> Row:
    """One model through add_se, the SE forward and remove_se."""
    model, own = build(name, source)
    row = Row(name, source, family, size, "broken", 0, 0, 0.0, "")
    try:
        x = torch.randn(2, 3, size, size)
        base = _forward(model, x)
    except Exception:  # the model does not take this size: its own
        row.size = own
        x = torch.randn(2, 3, own, own)
        base = _forward(model, x)
    log = _Warnings()
    logging.getLogger("se_surgery").addHandler(log)
    try:
        start = time.perf_counter()
        se = add_se(model, example_input=x)
        row.seconds = round(time.perf_counter() - start, 2)
    except SurgeryError as err:
        row.seconds = round(time.perf_counter() - start, 2)
        row.outcome, row.reason = "refused", str(err)
        return row
    finally:
        logging.getLogger("se_surgery").removeHandler(log)
    row.se_blocks = row.residual_units = len(se_blocks(se))
    row.reason = " | ".join(log.messages)
    if "fewer than r=" in row.reason:
        row.residual_units = len(se_blocks(add_se(model, example_input=x, divisor=1)))
    out = _forward(se, x)
    if _shapes(out) != _shapes(base):
        row.reason = f"SE model output {_shapes(out)} != base {_shapes(base)}"
        return row
    if not _equal(_forward(remove_se(se), x), base):
        row.reason = "remove_se does not give back the base outputs exactly"
        return row
    row.outcome = "ok"
    return row


def run_one(name: str, source: str, family: str, size: int, limit: int) -> Row:
    def alarm(signum, frame):
        raise _Timeout()

    signal.signal(signal.SIGALRM, alarm)
    signal.alarm(limit)
    try:
        return check(name, source, family, size)
    except _Timeout:
        return Row(name, source, family, size, "timeout", 0, 0, 0.0, f"over {limit} s")
    except Exception as err:  # the zoo's target is that this never happens
        return Row(name, source, family, size, "broken", 0, 0, 0.0, f"{type(err).__name__}: {err}")
    finally:
        signal.alarm(0)
        gc.collect()


def read_rows() -> dict[str, Row]:
    if not CSV_PATH.exists():
        return {}
    with CSV_PATH.open(newline="") as f:
        types = {f.name: f.type for f in fields(Row)}
        cast = {"int": int, "float": float, "str": str}
        rows = [Row(**{k: cast[types[k]](v) for k, v in r.items()}) for r in csv.DictReader(f)]
        return {f"{r.source}:{r.model}": r for r in rows}  # timm and torchvision share names (resnet18)


def write_rows(rows: dict[str, Row]) -> None:
    CSV_PATH.parent.mkdir(exist_ok=True)
    tmp = CSV_PATH.with_suffix(".tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[f.name for f in fields(Row)])
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows.values())
    tmp.replace(CSV_PATH)


def category(reason: str) -> str:
    """A refusal in a few words, for the summary."""
    if "found no residual sum" in reason:
        return "no residual sum (plain, concatenating or token-only network)"
    kinds = [
        ("already holds an SE", "branches already gated (SE / attention)"),
        ("-D tensors", "token sums only"),
        ("channels-last", "channels-last sums"),
        ("cannot trace", "blocks fx cannot trace"),
        ("does not run", "blocks fx cannot run"),
        ("fewer than r=", "blocks narrower than r"),
        ("neither is the skip", "ties"),
        ("a skip has at most one", "two-layer skips"),
        ("only a piece", "inner split sums"),
    ]
    found = [label for key, label in kinds if key in reason]
    return " + ".join(found) or reason[:80]


def _short(text: str, n: int = 160) -> str:
    text = text.replace("|", "/").replace("\n", " ")
    return text if len(text) <= n else text[: n - 3] + "..."


def summary_markdown(rows: dict[str, Row], table: str = "full table in [zoo.md](zoo.md)") -> str:
    """The summary for a page in docs/; ``table`` says where the full table is."""
    counts = Counter(r.outcome for r in rows.values())
    by_source = Counter((r.source, r.outcome) for r in rows.values())
    wrap = lambda text: textwrap.fill(text, 118)  # noqa: E731
    lines = [
        wrap(
            f"**Supported**, from the zoo (`python benchmarks/zoo.py`: {len(rows)} architectures, every torchvision "
            f"classification model and the smallest model of each timm family, random weights, 64 px inputs where the "
            f"model takes them, else its own size; {table}): **{counts['ok']} get SE "
            f"blocks**, {counts['refused']} are refused with a `SurgeryError` saying why, {counts['broken']} broken, "
            f"{counts['timeout']} timed out. On every model that got SE blocks the SE model runs with the base output "
            "shape and `remove_se` gives the base outputs back exactly. Left out for time: "
            + ", ".join(sorted(TOO_LARGE)) + "."
        ),
        "",
        "| source | models | ok | refused | broken | timeout |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for source in ("torchvision", "timm"):
        n = sum(v for (s, _), v in by_source.items() if s == source)
        if n:
            cells = " | ".join(str(by_source[(source, o)]) for o in ("ok", "refused", "broken", "timeout"))
            lines.append(f"| {source} | {n} | {cells} |")
    ok = sorted({r.family for r in rows.values() if r.outcome == "ok"})
    lines += ["", wrap(f"Families that get SE blocks ({len(ok)}): " + ", ".join(ok) + ".")]
    reasons = Counter(category(r.reason) for r in rows.values() if r.outcome == "refused")
    lines += ["", wrap("Refused, by reason: " + "; ".join(f"{why} ({n})" for why, n in reasons.most_common()) + ".")]
    bad = [r for r in rows.values() if r.outcome in ("broken", "timeout")]
    if bad:
        lines += ["", wrap("Broken or timed out: " + "; ".join(f"{r.model} ({_short(r.reason, 100)})" for r in bad))]
    return "\n".join(lines)


def table_markdown(rows: dict[str, Row]) -> str:
    head = [
        "# The zoo: add_se over torchvision and timm",
        "",
        "Generated by `python benchmarks/zoo.py` (see its docstring for what is checked); the CSV beside this file has "
        "the full reasons.",
        "",
        summary_markdown(rows, table="full table below"),
        "",
        "| model | source | family | input | outcome | SE blocks | residual units | add_se s | reason / skipped |",
        "|---|---|---|---:|---|---:|---:|---:|---|",
    ]
    body = [
        f"| {r.model} | {r.source} | {r.family} | {r.size} | {r.outcome} | {r.se_blocks} | {r.residual_units} | "
        f"{r.seconds:.2f} | {_short(r.reason)} |"
        for r in sorted(rows.values(), key=lambda r: (r.source, r.family, r.model))
    ]
    return "\n".join(head + body) + "\n"


def write_reports(rows: dict[str, Row]) -> None:
    MD_PATH.write_text(table_markdown(rows))
    text = SUMMARY_PAGE.read_text()
    if BEGIN in text and END in text:
        before, rest = text.split(BEGIN, 1)
        after = rest.split(END, 1)[1]
        SUMMARY_PAGE.write_text(f"{before}{BEGIN}\n{summary_markdown(rows)}\n{END}{after}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", choices=["torchvision", "timm", "all"], default="all")
    parser.add_argument("--only", default="", help="comma-separated model names or globs (resnet*), of --source")
    parser.add_argument("--size", type=int, default=64, help="input size tried first (px); else the model's own")
    parser.add_argument("--limit", type=int, default=120, help="seconds per model before it counts as a timeout")
    parser.add_argument("--resume", action="store_true", help="keep the CSV's rows; run only models not in it")
    parser.add_argument("--report", action="store_true",
                        help="only rewrite docs/zoo.md and docs/surgery.md from the CSV")
    parser.add_argument("--select-timm", action="store_true", help="re-pick the smallest model per timm family")
    args = parser.parse_args()
    torch.set_num_threads(1)
    logging.getLogger("se_surgery").setLevel(logging.WARNING)
    logging.getLogger("se_surgery").propagate = False  # warnings go to the table, not the console
    if args.select_timm:
        TIMM_CHOICE.write_text(json.dumps(select_timm(), indent=1) + "\n")
        print(f"wrote {TIMM_CHOICE}")
        return
    rows = read_rows() if (args.resume or args.report or args.only) else {}
    rows = {key: row for key, row in rows.items() if row.model not in TOO_LARGE}
    if not args.report:
        from tqdm import tqdm

        todo = [m for src in ("torchvision", "timm") if args.source in (src, "all")
                for m in (torchvision_models() if src == "torchvision" else timm_models())]
        if args.only:
            globs = args.only.split(",")
            todo = [m for m in todo if any(fnmatch.fnmatch(m[0], g) for g in globs)]
        if args.resume:
            todo = [m for m in todo if f"{m[1]}:{m[0]}" not in rows]
        for name, source, family in (bar := tqdm(todo, unit="model")):
            bar.set_postfix_str(name)
            rows[f"{source}:{name}"] = run_one(name, source, family, args.size, args.limit)
            write_rows(rows)  # after every model: a killed run resumes with --resume
    write_reports(rows)
    counts = Counter(r.outcome for r in rows.values())
    print(", ".join(f"{k}: {v}" for k, v in sorted(counts.items())), f"({len(rows)} models)")


if __name__ == "__main__":
    main()
