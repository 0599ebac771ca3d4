"""Surgery benchmark: cost of add_se itself, and the SE overhead at inference, measured side by side in one run.

    python benchmarks/surgery.py [--repeats 7] [--threads 2]

Prints the time of add_se(resnet50()) and the forward latency of plain ResNet-50, the same network rewritten with
no SE (add_se with se_layer=nn.Identity: the cost of the generated forward itself, target 1.00x) and SE-ResNet-50, at
batch 1 and 8, contiguous and channels-last, 224x224. Runs are interleaved (A B C A B C ...) so drift hits all three
alike; the median is reported. The paper: 164 ms -> 167 ms (+1.8%) for one 224x224 image on a CPU.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torchvision
from torch import nn

from se_surgery import add_se


def median_ms(fn, repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per configuration (median reported)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    base = torchvision.models.resnet50().eval()
    add_se(base)  # warm-up: imports, first-call caches
    surgery = median_ms(lambda: add_se(base), args.repeats)
    print(f"add_se(resnet50()): {surgery:.0f} ms (median of {args.repeats}; target < 500 ms)")

    rewritten = add_se(base, se_layer=lambda c: nn.Identity())  # the generated forward, no SE in it
    models = {"plain": base, "fx, no SE": rewritten.eval(), "SE": add_se(base).eval()}
    print(f"\nforward latency, ms (median of {args.repeats}, {args.threads} threads, 224x224)")
    print(f"{'batch':>5} {'layout':>13} {'plain':>9} {'fx, no SE':>10} {'SE':>9} {'fx/plain':>9} {'SE/plain':>9}")
    for batch in (1, 8):
        for layout in (torch.contiguous_format, torch.channels_last):
            x = torch.randn(batch, 3, 224, 224).contiguous(memory_format=layout)
            nets = {k: m.to(memory_format=layout) for k, m in models.items()}
            times = {k: [] for k in nets}
            with torch.inference_mode():
                for net in nets.values():
                    net(x)  # warm-up
                for _ in range(args.repeats):
                    for key, net in nets.items():
                        times[key].append(median_ms(lambda: net(x), 1))
            t = {k: statistics.median(v) for k, v in times.items()}
            name = "channels-last" if layout is torch.channels_last else "contiguous"
            print(
                f"{batch:>5} {name:>13} {t['plain']:>9.1f} {t['fx, no SE']:>10.1f} {t['SE']:>9.1f} "
                f"{t['fx, no SE'] / t['plain']:>8.2f}x {t['SE'] / t['plain']:>8.2f}x"
            )
    print("\npaper (SENet Sec. 4, one CPU, batch 1): 164 ms -> 167 ms, 1.02x")


if __name__ == "__main__":
    main()
