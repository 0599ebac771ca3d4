"""Capture benchmark: what watching the SE gates costs, in time and in memory.

    python benchmarks/excitations.py [--images 512] [--batch-size 64] [--size 32] [--repeats 5] [--threads 2]

1. Time: plain inference over a loader vs :func:`analysis.capture_excitations` over the same loader, on an
   SE-ResNet-18 (``add_se(resnet18())``). Runs are interleaved (plain, capture, plain, capture, ...) so drift on a
   shared machine hits both alike; the median ratio is reported (target <= 1.03x), by wall clock and by the
   process's CPU time (the steadier of the two when other jobs share the cores).
2. Memory: peak resident memory of a fresh process that captures N and then 4N images from a loader that makes its
   batches on the fly (so nothing but the capture itself could grow), next to what keeping every gate output would
   take. Flat means the statistics do not grow with the number of images.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch
import torchvision

from analysis import capture_excitations
from se_surgery import add_se


class RandomImages:
    """``batches`` batches of random images and labels, made on the fly (no dataset held in memory)."""

    def __init__(self, images: int, batch_size: int, size: int, classes: int = 10) -> None:
        self.images, self.batch_size, self.size, self.classes = images, batch_size, size, classes

    def __len__(self) -> int:
        return -(-self.images // self.batch_size)

    def __iter__(self):
        g = torch.Generator().manual_seed(0)
        for start in range(0, self.images, self.batch_size):
            n = min(self.batch_size, self.images - start)
            yield (torch.randn(n, 3, self.size, self.size, generator=g),
                   torch.randint(0, self.classes, (n,), generator=g))


def se_resnet18(size: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return add_se(torchvision.models.resnet18(num_classes=10), example_input=torch.zeros(2, 3, size, size)).eval()


def plain_pass(model: torch.nn.Module, loader) -> None:
    with torch.no_grad():
        for images, _ in loader:
            model(images)


def timed(fn) -> tuple[float, float]:
    """Wall-clock and CPU seconds of ``fn()`` (CPU time of this process, all threads: steadier on a shared machine)."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def peak_rss_mb(images: int, batch_size: int, size: int) -> dict[str, float]:
    """Run one capture of ``images`` images in this process and report peak RSS (call in a fresh process)."""
    model = se_resnet18(size)
    stats = capture_excitations(model, RandomImages(images, batch_size, size))
    state = sum(t.numel() * t.element_size() for m in stats.moments.values() for t in (m.n, m.mean, m.m2, m.hist))
    channels = sum(m.channels for m in stats.moments.values())
    return {
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "stats_mb": state / 2**20,
        "stored_outputs_mb": images * channels * 8 / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=512, help="N, images per timed pass (memory: N and 4N)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--size", type=int, default=32, help="image side (32: the digits demo)")
    parser.add_argument("--repeats", type=int, default=15, help="interleaved timed pairs (median ratio reported)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    parser.add_argument("--_memory", type=int, help=argparse.SUPPRESS)  # internal: one memory run in a child
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args._memory:
        print(json.dumps(peak_rss_mb(args._memory, args.batch_size, args.size)))
        return

    model = se_resnet18(args.size)
    data = [*RandomImages(args.images, args.batch_size, args.size)]  # held in memory: both passes see the same tensors
    plain_pass(model, data[:1])
    capture_excitations(model, data[:1])  # warm-up
    runs: dict[str, list[tuple[float, float]]] = {"plain": [], "capture": []}
    for _ in range(args.repeats):
        runs["plain"].append(timed(lambda: plain_pass(model, data)))
        runs["capture"].append(timed(lambda: capture_excitations(model, data)))
    print(f"SE-ResNet-18, {args.images} images of {args.size}x{args.size}, batch {args.batch_size}, "
          f"{args.threads} threads, {args.repeats} interleaved pairs (medians)")
    print(f"{'':>16} {'plain':>9} {'capture':>9} {'ratio':>7}  (target <= 1.03x)")
    for i, clock in enumerate(("wall s", "CPU s")):
        plain = statistics.median(t[i] for t in runs["plain"])
        capture = statistics.median(t[i] for t in runs["capture"])
        ratios = [c[i] / p[i] for c, p in zip(runs["capture"], runs["plain"])]
        print(f"{clock:>16} {plain:>9.3f} {capture:>9.3f} {statistics.median(ratios):>6.3f}x"
              f"  (pairs from {min(ratios):.3f}x to {max(ratios):.3f}x)")
    print("\npeak memory of a fresh process capturing N and 4N images (batches made on the fly)")
    print(f"{'images':>7} {'peak RSS MB':>12} {'stats MB':>9} {'all outputs would be MB':>24}")
    for n in (args.images, 4 * args.images):
        cmd = [sys.executable, __file__, "--_memory", str(n), "--batch-size", str(args.batch_size),
               "--size", str(args.size), "--threads", str(args.threads)]
        row = json.loads(
            subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        )
        print(f"{n:>7} {row['peak_rss_mb']:>12.1f} {row['stats_mb']:>9.3f} {row['stored_outputs_mb']:>24.1f}")


if __name__ == "__main__":
    main()
