"""GPU check: everything that needs a GPU, in one run of about 5 minutes on one CUDA GPU, as one table.

    python benchmarks/gpu_check.py [--out gpu_check.md] [--no-tests] [--no-compile]
    python benchmarks/gpu_check.py --device cpu --quick      # the same code path on the CPU, tiny sizes (tested)

1. the tests marked ``cuda`` (``pytest -m cuda``: the fused SE against the unfused one on the GPU, a training step
   with AMP + channels-last, the trainer with --amp --channels-last --compile), as passed / failed / skipped counts;
2. the surgery benchmark on the device (``benchmarks/surgery.py``'s timing): SE-ResNet-50 from add_se, fused and
   unfused, and timm's seresnet50 against plain ResNet-50, eval (float32, then AMP + channels-last), a training step
   (AMP + channels-last) and torch.compile (eval, AMP + channels-last);
3. the trainer's training images/s for SE-ResNet-50 at 224 (AMP + channels-last, synthetic images in memory) against
   a bare hand-written loop over the same images (``benchmarks/train.py``'s two loops);
4. a DDP step in a 1-process group (NCCL on the GPU, gloo on the CPU), eager and compiled the trainer's way;
5. an excitation capture on the device against plain inference (``benchmarks/excitations.py``'s timing).

A part that fails gives a row saying so (value nan) and the exit code 1; the others still run. ``--out PATH`` also
writes the table as markdown to PATH and as CSV next to it (PATH with the suffix .csv).
``--quick`` means ResNet-18 at 32-64 px, a few steps and rounds, compile off: about a minute on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from unittest import mock

if "--device" in sys.argv[1:-1] and sys.argv[sys.argv.index("--device") + 1] == "cpu" or "--device=cpu" in sys.argv:
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch starts: the trainer then picks the CPU too

import torch
import torchvision
from torch import nn
from torch.utils.data import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
import excitations as capture_bench  # noqa: E402  (benchmarks/excitations.py)
import surgery as surgery_bench  # noqa: E402  (benchmarks/surgery.py)
import train as train_bench  # noqa: E402  (benchmarks/train.py)

from analysis import capture_excitations  # noqa: E402
from se_surgery import add_se  # noqa: E402
from se_surgery.surgery.fused_grad import fused_backward  # noqa: E402
from se_surgery.train import loop  # noqa: E402
from se_surgery.train.recipe import get_recipe  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Row:
    """One line of the table: a number and what it means."""

    part: str
    check: str
    value: float
    unit: str
    detail: str = ""


@dataclass
class Sizes:
    """What one run measures: the full GPU sizes, or the quick CPU ones."""

    arch: str
    timm_arch: str
    size: int  # image side of the surgery, trainer and DDP parts
    eval_batch: int
    train_batch: int
    rounds: int
    train_steps: int
    train_rounds: int
    workers: int
    capture_images: int
    capture_size: int
    compile: bool

    @classmethod
    def pick(cls, quick: bool, compile: bool) -> Sizes:
        if quick:
            return cls("resnet18", "seresnet18", 64, 4, 8, 2, 3, 1, 0, 64, 32, False)
        return cls("resnet50", "seresnet50", 224, 32, 256, 15, 30, 2, 6, 8192, 224, compile)


def synced(device: torch.device, fn: Callable[[], object]) -> Callable[[], None]:
    """``fn`` followed by a wait for the device, so that a wall-clock timer sees the work done."""
    if device.type != "cuda":
        return lambda: (fn(), None)[1]
    return lambda: (fn(), torch.cuda.synchronize(device))[1]


def median_ms(times: list[float]) -> float:
    return statistics.median(times) * 1e3


# --- 1. the tests marked cuda ----------------------------------------------------------------------------------------
def cuda_tests() -> list[Row]:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "junit.xml"
        run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider",
                              f"--junitxml={report}", "tests"], cwd=ROOT, capture_output=True, text=True)
        if not report.exists():
            raise RuntimeError(
                f"pytest wrote no report (exit {run.returncode}): {run.stdout[-500:]}{run.stderr[-500:]}"
            )
        suites = ElementTree.parse(report).getroot()
        suite = suites if suites.tag == "testsuite" else suites.find("testsuite")
        counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
        failed = [c.get("name") for c in suite.iter("testcase")
                  if c.find("failure") is not None or c.find("error") is not None]
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    rows = [Row("cuda tests", "passed", passed, "tests", f"pytest -m cuda, exit {run.returncode}"),
            Row("cuda tests", "failed", counts["failures"] + counts["errors"], "tests", ", ".join(failed)[:200]),
            Row("cuda tests", "skipped", counts["skipped"], "tests", "no GPU" if not torch.cuda.is_available() else "")]
    if failed or run.returncode not in (0, 5):  # 5: no test collected
        raise PartFailed(rows, f"{len(failed)} cuda test(s) failed: {', '.join(failed)[:200]}")
    return rows


class PartFailed(RuntimeError):
    """A part that measured something but found a fault: its rows are kept."""

    def __init__(self, rows: list[Row], message: str) -> None:
        super().__init__(message)
        self.rows = rows


# --- 2. the surgery benchmark ----------------------------------------------------------------------------------------
def surgery(device: torch.device, sizes: Sizes) -> list[Row]:
    torch.manual_seed(0)
    example = torch.zeros(2, 3, sizes.size, sizes.size)
    models = surgery_bench.compared_models(torchvision.models.get_model(sizes.arch).eval(), sizes.timm_arch, example)
    models.pop("fx, no SE")
    models = {k: m.to(device) for k, m in models.items()}
    rows: list[Row] = []

    def table(what: str, fns: dict[str, Callable[[], object]], rounds: int) -> None:
        times = surgery_bench.interleaved({k: synced(device, fn) for k, fn in fns.items()}, rounds)
        rel = surgery_bench.ratios(times, "plain")
        rows.append(Row("surgery", f"{what}: plain", median_ms(times["plain"]), "ms", f"median of {rounds}"))
        for key in (k for k in times if k != "plain"):
            rows.append(Row("surgery", f"{what}: {key} / plain", statistics.median(rel[key]), "x",
                            f"rounds {min(rel[key]):.3f}-{max(rel[key]):.3f}"))

    x = torch.randn(sizes.eval_batch, 3, sizes.size, sizes.size, device=device)
    amp = dict(device_type=device.type, dtype=torch.bfloat16)
    with torch.inference_mode():
        table(f"eval fp32, batch {sizes.eval_batch}", {k: (lambda m=m: m(x)) for k, m in models.items()}, sizes.rounds)
    for m in models.values():  # outside inference mode: weights made in it could not be saved for backward
        m.to(memory_format=torch.channels_last)
    xl = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():

        def amp_eval(m: nn.Module) -> Callable[[], object]:
            def run() -> object:
                with torch.autocast(**amp):
                    return m(xl)
            return run

        table(f"eval AMP + channels-last, batch {sizes.eval_batch}", {k: amp_eval(m) for k, m in models.items()},
              sizes.rounds)

    xt = torch.randn(sizes.train_batch // 4, 3, sizes.size, sizes.size, device=device).contiguous(
        memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (len(xt),), device=device)
    nets = {k: models[k].train() for k in ("plain", "SE fused", "timm SE")}
    opts = {k: torch.optim.SGD(m.parameters(), lr=1e-4, momentum=0.9) for k, m in nets.items()}
    losses: dict[str, float] = {}

    def step(key: str, fused: bool = True) -> None:
        opts[key].zero_grad()
        with torch.autocast(**amp), fused_backward(fused):
            out = nets[key](xt)
        loss = nn.functional.cross_entropy(out.float(), y)
        loss.backward()
        opts[key].step()
        losses[key] = loss.detach()

    with torch.autocast(**amp):  # the tensors u as the AMP step gates them (their dtype, their layout)
        pool = surgery_bench.pooling_floor(surgery_bench.se_inputs(nets["SE fused"], xt))

    def pool_amp() -> object:
        with torch.autocast(**amp):
            return pool()

    fns = {"plain": lambda: step("plain"), "SE fused": lambda: step("SE fused"),
           "SE autograd": lambda: step("SE fused", fused=False), "timm SE": lambda: step("timm SE")}
    times = surgery_bench.interleaved({k: synced(device, fn) for k, fn in {**fns, "pool": pool_amp}.items()},
                                      sizes.rounds)
    floor = (statistics.median(times["plain"]) + statistics.median(times.pop("pool"))) / statistics.median(
        times["plain"])
    what = f"train step AMP + channels-last, batch {len(xt)}"
    rel = surgery_bench.ratios(times, "plain")
    rows.append(Row("surgery", f"{what}: plain", median_ms(times["plain"]), "ms", f"median of {sizes.rounds}"))
    for key in (k for k in times if k != "plain"):
        rows.append(Row("surgery", f"{what}: {key} / plain", statistics.median(rel[key]), "x",
                        f"rounds {min(rel[key]):.3f}-{max(rel[key]):.3f}"))
    rows.append(Row("surgery", f"{what}: floor / plain", floor, "x", "plain + the pooling and its backward alone"))
    if not all(math.isfinite(float(v)) for v in losses.values()):
        raise PartFailed(rows, f"a training step's loss is not finite: {losses}")
    for m in nets.values():
        m.eval()

    if sizes.compile:
        compiled = {k: torch.compile(models[k]) for k in ("plain", "SE fused", "timm SE")}
        with torch.inference_mode():
            started = time.perf_counter()
            for fn in compiled.values():
                amp_eval(fn)()  # compiles
            rows.append(Row("surgery", "compile eval (3 models)", time.perf_counter() - started, "s", "inductor"))
            table(f"compiled eval AMP + channels-last, batch {sizes.eval_batch}",
                  {k: amp_eval(m) for k, m in compiled.items()}, sizes.rounds)
    return rows


# --- 3. the trainer against a bare loop ------------------------------------------------------------------------------
class SyntheticImages(Dataset):
    """``n`` samples cycling over a few random images held in memory, so that no decoding or augmentation costs."""

    def __init__(self, n: int, size: int, classes: int = 10, distinct: int = 64) -> None:
        g = torch.Generator().manual_seed(0)
        self.images = torch.randn(min(distinct, n), 3, size, size, generator=g)
        self.targets: list[int] = torch.randint(0, classes, (n,), generator=g).tolist()
        self.classes = [str(c) for c in range(classes)]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index % len(self.images)], self.targets[index]


def trainer(device: torch.device, sizes: Sizes) -> list[Row]:
    batch, steps = sizes.train_batch, sizes.train_steps
    recipe = get_recipe("paper", arch=sizes.arch, arch_kwargs={}, input_size=sizes.size, resize=sizes.size,
                        amp=True, channels_last=True, workers=sizes.workers, val_samples=batch, lr=0.1)
    data = SyntheticImages(steps * batch, sizes.size)

    def fake_dataset(_data: str, split: str, **_: object) -> Dataset:
        return data if split == "train" else SyntheticImages(batch, sizes.size)

    bare, ours = [], []
    with mock.patch.object(loop, "build_dataset", fake_dataset):  # the trainer reads the images from memory too
        for _ in range(sizes.train_rounds):
            bare.append(train_bench.bare_loop(steps, batch, recipe, data, str(device), sizes.workers))
            ours.append(train_bench.trainer(steps, batch, recipe))
    what = f"SE-{sizes.arch} {sizes.size}px, batch {batch}, {steps} steps, AMP + channels-last"
    detail = f"best of {sizes.train_rounds}; {sizes.workers} workers"
    return [Row("trainer", f"bare loop: {what}", max(bare), "img/s", detail),
            Row("trainer", f"trainer: {what}", max(ours), "img/s", detail),
            Row("trainer", "trainer / bare loop", max(ours) / max(bare), "x", "target >= 0.95")]


# --- 4. a DDP step in a 1-process group ------------------------------------------------------------------------------
def ddp_step(device: torch.device, sizes: Sizes) -> list[Row]:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    backend = "nccl" if device.type == "cuda" else "gloo"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
                            device_id=device if device.type == "cuda" else None)
    rows: list[Row] = []
    try:
        total = torch.arange(4.0, device=device)
        dist.all_reduce(total)
        if total.tolist() != [0.0, 1.0, 2.0, 3.0]:
            raise RuntimeError(f"all_reduce over 1 rank changed the values: {total.tolist()}")
        batch = sizes.train_batch // 4
        x = torch.randn(batch, 3, sizes.size, sizes.size, device=device).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 10, (batch,), device=device)
        for compiled in (False, True) if sizes.compile else (False,):
            torch.manual_seed(0)
            raw = add_se(torchvision.models.get_model(sizes.arch, num_classes=10),
                         example_input=torch.zeros(2, 3, sizes.size, sizes.size))
            raw.to(device, memory_format=torch.channels_last).train()
            model = torch.compile(raw) if compiled else raw  # the trainer's order: compile inside DDP
            model = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
            opt = torch.optim.SGD(raw.parameters(), lr=0.01, momentum=0.9)
            losses: list[float] = []

            def step() -> None:
                opt.zero_grad(set_to_none=True)
                with torch.autocast(device.type, dtype=torch.bfloat16):
                    out = model(x)
                loss = nn.functional.cross_entropy(out.float(), y)
                loss.backward()
                opt.step()
                losses.append(float(loss))  # waits for the device

            started = time.perf_counter()
            step()  # first step: DDP's buckets (and the compile)
            first = time.perf_counter() - started
            times = [surgery_bench.seconds(step) for _ in range(sizes.rounds)]
            name = f"{'compiled ' if compiled else ''}DDP step ({backend}, 1 rank)"
            if not all(map(math.isfinite, losses)):
                raise PartFailed(rows, f"{name}: losses {losses}")
            rows.append(Row("ddp", f"{name}: SE-{sizes.arch}, batch {batch}, AMP + channels-last", median_ms(times),
                            "ms", f"first step {first:.1f} s; loss {losses[0]:.3f} -> {losses[-1]:.3f}"))
    finally:
        dist.destroy_process_group()
    return rows


# --- 5. an excitation capture ----------------------------------------------------------------------------------------
def capture(device: torch.device, sizes: Sizes) -> list[Row]:
    import timm

    models = {"SE": capture_bench.se_resnet18(sizes.capture_size).to(device),
              "timm SE": timm.create_model("seresnet18", num_classes=10).eval().to(device)}
    batch = 256 if device.type == "cuda" else 32
    data = [(x.to(device), y) for x, y in capture_bench.RandomImages(sizes.capture_images, batch, sizes.capture_size)]
    fns = {}
    for key, model in models.items():
        fns[key] = synced(device, lambda m=model: capture_bench.plain_pass(m, data))
        fns[f"{key} capture"] = synced(device, lambda m=model: capture_excitations(m, data))
    times = surgery_bench.interleaved(fns, sizes.rounds)
    rows = []
    for key, model in models.items():
        stats = capture_excitations(model, data[:1])
        if not all(torch.isfinite(torch.as_tensor(stats.mean(block))).all() for block in stats.blocks):
            raise PartFailed(rows, f"{key}: the captured excitation means are not finite")
        ratios = [c / p for c, p in zip(times[f"{key} capture"], times[key])]
        what = f"{key}-ResNet-18, {sizes.capture_images} images of {sizes.capture_size}px, batch {batch}"
        rows += [Row("capture", f"plain inference: {what}", statistics.median(times[key]), "s",
                     f"median of {sizes.rounds}"),
                 Row("capture", f"{key}: capture / plain", statistics.median(ratios), "x",
                     f"rounds {min(ratios):.3f}-{max(ratios):.3f}; {len(stats.blocks)} blocks")]
    return rows


# --- the table --------------------------------------------------------------------------------------------------------
def format_value(value: float) -> str:
    return "nan" if not math.isfinite(value) else f"{value:.4g}" if abs(value) < 1e5 else f"{value:.0f}"


def write_table(rows: list[Row], out: Path) -> tuple[Path, Path]:
    """The table as markdown at ``out`` and as CSV at ``out`` with the suffix .csv; both paths."""
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = ["| part | check | value | unit | detail |", "|---|---|---|---|---|"]
    lines += [f"| {r.part} | {r.check} | {format_value(r.value)} | {r.unit} | {r.detail} |" for r in rows]
    markdown = out if out.suffix != ".csv" else out.with_suffix(".md")
    markdown.write_text("\n".join(lines) + "\n")
    table = out.with_suffix(".csv")
    with table.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["part", "check", "value", "unit", "detail"])
        writer.writerows([r.part, r.check, r.value, r.unit, r.detail] for r in rows)
    return markdown, table


def print_table(rows: list[Row]) -> None:
    width = max(len(r.check) for r in rows)
    for r in rows:
        print(f"{r.part:<10} {r.check:<{width}} {format_value(r.value):>10} {r.unit:<6} {r.detail}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: the same path, on the CPU")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, a few steps, compile off (about a minute)")
    parser.add_argument("--out", type=Path, help="also write the table as markdown here (and CSV next to it)")
    parser.add_argument("--no-tests", dest="tests", action="store_false", help="skip pytest -m cuda")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="skip torch.compile")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: error: no CUDA GPU is visible: run it on a GPU machine, or pass --device cpu --quick",
              file=sys.stderr)
        return 2
    device = torch.device(args.device)
    sizes = Sizes.pick(args.quick, args.compile)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"gpu_check on {name}, torch {torch.__version__}{', quick' if args.quick else ''}", flush=True)
    parts: list[tuple[str, Callable[[], list[Row]]]] = [
        ("cuda tests", cuda_tests), ("surgery", lambda: surgery(device, sizes)),
        ("trainer", lambda: trainer(device, sizes)), ("ddp", lambda: ddp_step(device, sizes)),
        ("capture", lambda: capture(device, sizes)),
    ]
    rows: list[Row] = []
    failed = 0
    for part, run in parts if args.tests else parts[1:]:
        started = time.perf_counter()
        try:
            rows += run()
        except Exception as err:  # a broken part is reported in the table; the others still run
            failed += 1
            rows += getattr(err, "rows", [])
            rows.append(Row(part, "FAILED", math.nan, "", f"{type(err).__name__}: {err}"[:300]))
        print(f"  {part}: {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
    print()
    print_table(rows)
    if args.out:
        print("\nwritten: " + ", ".join(map(str, write_table(rows, args.out))))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
