"""The zoo: add_se over torchvision's models, one small model per timm family and Hugging Face's vision CNNs, checked.

    python benchmarks/zoo.py                      # everything (202 models, about 6 min on one core), then the tables
    python benchmarks/zoo.py --only dla34,ghostnet_050 --resume   # some models, keeping the other rows
    python benchmarks/zoo.py --source timm --resume               # one part of the zoo
    python benchmarks/zoo.py --report                             # only rewrite zoo.md and surgery.md from the CSV
    python benchmarks/zoo.py --select-timm        # re-pick the smallest model of each timm family (meta device)

For each model (random weights, eval mode, one thread): the base output on ``randn(2, 3, S, S)``, ``add_se`` on that
input, the SE model's forward (it must run and give the base output's shape) and ``remove_se`` (it must give the base
output back exactly, ``torch.equal``). S is ``--size`` (64 px) when the model accepts it, else the model's own
default input size. The models: every torchvision classification model, the smallest of each torchvision video,
detection and segmentation family (all three video ResNets, and fasterrcnn_resnet50_fpn too); the smallest model of
each timm module, and of the plain and multi-branch architectures timm files under another module (TIMM_ARCHITECTURES);
Hugging Face transformers' vision CNNs at their default configurations, when transformers is installed (the ``zoo``
extra). Video clips are ``2 x 3 x 8 x S x S`` (16 frames at the model's own size); detection models are built to see
the image at S (``min_size = max_size = S``; SSD at its fixed size) and keep their 4 best boxes per image (score
threshold 0: random weights give low scores), and their box counts may differ between the base and the SE model;
MViT's positional sizes are set to the clip's.

Outcomes: ``ok`` (SE blocks, all checks pass), ``refused`` (a ``SurgeryError``: the model has
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
from typing import Iterator, Mapping

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
# torchvision beyond classification: the smallest model (parameters) of each family, all three video ResNets (the
# 3-D residual units), and fasterrcnn_resnet50_fpn (ResNet-50 under a detection head). swin3d and mvit are
# transformers; the others CNNs.
TORCHVISION_TASKS = [
    "r3d_18", "mc3_18", "r2plus1d_18", "s3d", "mvit_v2_s", "swin3d_t",
    "fasterrcnn_mobilenet_v3_large_320_fpn", "fasterrcnn_resnet50_fpn", "fcos_resnet50_fpn",
    "keypointrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn", "retinanet_resnet50_fpn", "ssd300_vgg16",
    "ssdlite320_mobilenet_v3_large",
    "deeplabv3_mobilenet_v3_large", "fcn_resnet50", "lraspp_mobilenet_v3_large",
]
# Plain and multi-branch CNNs that timm files under a module whose smallest model is another architecture:
# "module/architecture" -> the names of that architecture (its smallest is picked like a module's).
TIMM_ARCHITECTURES = {
    "efficientnet/mobilenetv1": "mobilenetv1_*",  # the paper's SE-MobileNet (Table 3)
    "mobilenetv3/lcnet": "lcnet_*",  # a plain depthwise-separable chain
    "byobnet/repvgg": "repvgg_*",  # VGG-style blocks of parallel 3x3 and 1x1 convolutions
    "byobnet/mobileone": "mobileone_*",
    "hgnet/hgnet": "hgnet_*",  # HGNet v1: concatenating blocks with their own ESE gate
}
# Hugging Face transformers' vision CNNs, random init at the default configuration: (model class, config class)
TRANSFORMERS = {
    "resnet": ("ResNetForImageClassification", "ResNetConfig"),  # ResNet-50
    "convnext": ("ConvNextForImageClassification", "ConvNextConfig"),  # ConvNeXt-T
    "regnet": ("RegNetForImageClassification", "RegNetConfig"),  # a RegNetY with its own SE in every block
    "mobilenet_v2": ("MobileNetV2ForImageClassification", "MobileNetV2Config"),
    "mobilenet_v1": ("MobileNetV1ForImageClassification", "MobileNetV1Config"),
}
SOURCES = ("torchvision", "timm", "transformers")
FRAMES = 8  # a video clip's length at --size; 16 at the model's own size


@dataclass
class Row:
    model: str
    source: str  # torchvision / timm / transformers
    family: str  # timm's module name (or module/architecture), torchvision's (video.resnet), transformers' model type
    size: str  # the input's spatial size S (px); a video clip's FRAMESxS
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
    for name in [*torchvision.models.list_models(module=torchvision.models), *TORCHVISION_TASKS]:
        if name not in TOO_LARGE:
            module = torchvision.models.get_model_builder(name).__module__  # torchvision.models[.video].resnet
            yield name, "torchvision", module.removeprefix("torchvision.models.")


def timm_models() -> Iterator[tuple[str, str, str]]:
    for family, name in json.loads(TIMM_CHOICE.read_text()).items():
        if name not in TOO_LARGE:
            yield name, "timm", family


def transformers_models() -> Iterator[tuple[str, str, str]]:
    """Hugging Face's vision CNNs; none without transformers (an optional extra: pip install se-surgery[zoo])."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        return
    for family, (model_class, _) in TRANSFORMERS.items():
        yield model_class, "transformers", family


def models(source: str) -> Iterator[tuple[str, str, str]]:
    return {"torchvision": torchvision_models, "timm": timm_models, "transformers": transformers_models}[source]()


_SMALL = ("atto", "femto", "pico", "zepto", "nano", "tiny", "micro", "xxs", "xs", "small", "050", "b0", "m0", "t", "s")


def _smallness(name: str) -> tuple[int, int, str]:
    """Rank of a name's size word (atto < femto < ... < small), then length: the likely smallest models first."""
    rank = next((i for i, w in enumerate(_SMALL) if w in name.replace("-", "_").split("_") or w in name), len(_SMALL))
    return rank, len(name), name


def select_timm(candidates: int = 6) -> dict[str, str]:
    """The model with fewest parameters of each timm module (family), and of each of TIMM_ARCHITECTURES, counted on
    the meta device (no weights).

    Only the ``candidates`` most likely smallest names of a family (by their size words) are built, to stay fast.
    """
    import timm

    families = {module: "*" for module in timm.list_modules()} | TIMM_ARCHITECTURES
    choice = {}
    for family, names in families.items():
        counts = {}
        found = timm.list_models(names, module=family.partition("/")[0])
        for name in sorted(found, key=_smallness)[:candidates]:
            try:
                with torch.device("meta"):
                    counts[name] = sum(p.numel() for p in timm.create_model(name).parameters())
            except Exception:  # a model that cannot be built on the meta device is simply not a candidate
                continue
        if counts:
            choice[family] = min(counts, key=lambda n: (counts[n], n))
    return choice


def build(name: str, source: str, family: str, size: int) -> tuple[nn.Module, list[tuple[int, ...]]]:
    """The model with random weights, and the input shapes to try: at ``size`` first, then at its own size."""
    torch.manual_seed(0)
    if source == "timm":
        import timm

        model = timm.create_model(name, pretrained=False)
        return model, _image_shapes(size, int(model.pretrained_cfg.get("input_size", (3, 224, 224))[-1]))
    if source == "transformers":
        import transformers

        model_class, config_class = TRANSFORMERS[family]
        config = getattr(transformers, config_class)()
        model = getattr(transformers, model_class)(config)
        return model, _image_shapes(size, int(getattr(config, "image_size", None) or 224))
    if family.startswith("detection."):
        return _detector(name, size)
    preset = next(iter(torchvision.models.get_model_weights(name))).transforms()
    own = int((getattr(preset, "crop_size", None) or preset.resize_size)[0])  # segmentation: its resize size
    extra = {"weights_backbone": None} if family.startswith("segmentation.") else {}
    model = torchvision.models.get_model(name, weights=None, **extra)
    if not family.startswith("video."):
        return model, _image_shapes(size, own)
    if hasattr(model, "pos_encoding"):  # MViT: its positional sizes are those of the clip it was built for
        stride = model.conv_proj.stride
        model.pos_encoding.temporal_size = FRAMES // stride[0]
        model.pos_encoding.spatial_size = (size // stride[1], size // stride[2])
    return model, [(2, 3, FRAMES, size, size), (2, 3, 16, own, own)]


def _image_shapes(size: int, own: int) -> list[tuple[int, ...]]:
    return [(2, 3, size, size)] + ([(2, 3, own, own)] if own != size else [])


def _detector(name: str, size: int) -> tuple[nn.Module, list[tuple[int, ...]]]:
    """A detection model that sees the image at ``size`` (SSD: its fixed size) and returns its 4 best boxes."""
    rcnn = "rcnn" in name
    keep = ({"box_score_thresh": 0.0, "box_detections_per_img": 4} if rcnn
            else {"score_thresh": 0.0, "detections_per_img": 4})
    resize = {} if name.startswith("ssd") else {"min_size": size, "max_size": size}
    model = torchvision.models.get_model(name, weights=None, weights_backbone=None, **keep, **resize)
    fixed = model.transform.fixed_size
    return model, [(2, 3, *fixed) if fixed else (2, 3, size, size)]


def _forward(model: nn.Module, x: torch.Tensor):
    with torch.no_grad():
        return model.eval()(x)


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, Mapping):  # segmentation's {"out": ...}, detection's boxes per image, transformers' outputs
        return isinstance(b, Mapping) and list(a) == list(b) and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_equal, a, b))
    return a == b


def _shapes(out, ragged: bool = False):
    """The output's structure and shapes; ``ragged``: without the first dimension (a detector's box count)."""
    if isinstance(out, torch.Tensor):
        return tuple(out.shape[1:] if ragged else out.shape)
    if isinstance(out, Mapping):
        return {k: _shapes(v, ragged) for k, v in out.items()}
    return [_shapes(o, ragged) for o in out]


def check(name: str, source: str, family: str, size: int) -> Row:
    """One model through add_se, the SE forward and remove_se."""
    model, shapes = build(name, source, family, size)
    row = Row(name, source, family, "", "broken", 0, 0, 0.0, "")
    for i, shape in enumerate(shapes):
        row.size = f"{shape[2]}x{shape[-1]}" if len(shape) == 5 else str(shape[-1])  # S, or FRAMESxS
        x = torch.randn(*shape)
        try:
            base = _forward(model, x)
            break
        except Exception:  # the model does not take this size: its own
            if i == len(shapes) - 1:
                raise
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
    out, ragged = _forward(se, x), family.startswith("detection.")
    if _shapes(out, ragged) != _shapes(base, ragged):
        row.reason = f"SE model output {_shapes(out, ragged)} != base {_shapes(base, ragged)}"
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
        return Row(name, source, family, str(size), "timeout", 0, 0, 0.0, f"over {limit} s")
    except Exception as err:  # the zoo's target is that this never happens
        return Row(name, source, family, str(size), "broken", 0, 0, 0.0, f"{type(err).__name__}: {err}")
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
    if "found no residual sum" in reason or "found no unit" in reason:
        return "no unit (no residual sum, concatenation of branches or convolution and non-linearity)"
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
        ("computes the block in", "blocks that compute their sum in a second method (forward_with_tap)"),
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
            "classification model, the smallest of each torchvision video, detection and segmentation family, the "
            "smallest model of each timm family and Hugging Face's vision CNNs, random weights, 64 px inputs where "
            f"the model takes them, else its own size; {table}): **{counts['ok']} get SE "
            f"blocks**, {counts['refused']} are refused with a `SurgeryError` saying why, {counts['broken']} broken, "
            f"{counts['timeout']} timed out. On every model that got SE blocks the SE model runs with the base output "
            "shape and `remove_se` gives the base outputs back exactly. Left out for time: "
            + ", ".join(sorted(TOO_LARGE)) + "."
        ),
        "",
        "| source | models | ok | refused | broken | timeout |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for source in SOURCES:
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
        "# The zoo: add_se over torchvision, timm and Hugging Face transformers",
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
    parser.add_argument("--source", choices=[*SOURCES, "all"], default="all")
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

        todo = [m for src in SOURCES if args.source in (src, "all") for m in models(src)]
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
