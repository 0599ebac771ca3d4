"""Surgery benchmark: cost of add_se itself, and the SE overhead, measured side by side in one run.

    python benchmarks/surgery.py [--rounds 15] [--threads 2] [--no-forward] [--no-train] [--no-compile]

Prints the time of add_se(resnet50()), then, against plain ResNet-50 (torchvision, random weights), the time ratios of:
the same network rewritten with no SE in it (add_se(se_layer=nn.Identity): the cost of the generated forward
itself, target 1.00x), SE-ResNet-50 from add_se (fused SE, the default), the same with fuse=False, and timm's
seresnet50 (random weights); at batch 1 and 8, contiguous and channels-last, eval forward at 224x224. Models run
interleaved (A B C D E, A B C D E, ...), so drift hits all alike; each round gives one ratio per model, and the median
and the min-max over rounds are printed. The floor: plain ResNet-50 plus the pooling reads alone (one mean over each
tensor an SE gates), the least any SE can cost.
Then a training step (forward, backward, SGD step; batch 8, train mode) and torch.compile (inductor) at batch 8.
The paper: 164 ms -> 167 ms (+1.8%) for one 224x224 image on a CPU; 209 vs 190 ms per training step on GPUs.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
import torchvision
from torch import nn

from se_surgery import add_se, se_blocks
from se_surgery.surgery.se_module import global_mean


def seconds(fn: Callable[[], object], calls: int = 1) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def interleaved(fns: dict[str, Callable[[], object]], rounds: int, calls: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each function, round by round (each round runs every function once, in turn)."""
    for fn in fns.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for key, fn in fns.items():
            times[key].append(seconds(fn, calls))
    return times


def ratios(times: dict[str, list[float]], base: str) -> dict[str, list[float]]:
    return {k: [t / b for t, b in zip(v, times[base])] for k, v in times.items()}


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.3f}x ({min(values):.3f}-{max(values):.3f})"


def se_inputs(model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The tensors u the SE blocks of ``model`` gate on input ``x`` (captured by the gates' forward pre-hooks)."""
    found: list[torch.Tensor] = []
    handles = [se.register_forward_pre_hook(lambda m, args: found.append(args[0].clone()))
               for se in se_blocks(model).values()]
    with torch.inference_mode():
        model(x)
    for handle in handles:
        handle.remove()
    return found


def print_table(title: str, times: dict[str, list[float]], extra: dict[str, float] | None = None) -> None:
    print(title)
    rel = ratios(times, "plain")
    for key, values in times.items():
        line = f"  {key:>12}: {statistics.median(values) * 1e3:8.1f} ms"
        if key != "plain":
            line += f"   {spread(rel[key])} of plain"
        print(line)
    for key, value in (extra or {}).items():
        print(f"  {key:>12}: {value * 1e3:8.1f} ms   {value / statistics.median(times['plain']):.3f}x of plain")


def compared_models(base: nn.Module, timm_name: str = "seresnet50", example_input: torch.Tensor | None = None
                    ) -> dict[str, nn.Module]:
    """``base`` (plain), its fx rewrite with no SE in it, SE from add_se (fused and not) and timm's ``timm_name``,
    all in eval mode with random weights."""
    import timm

    return {
        "plain": base,
        "fx, no SE": add_se(base, se_layer=lambda c: nn.Identity(), example_input=example_input).eval(),
        "SE fused": add_se(base, example_input=example_input).eval(),
        "SE unfused": add_se(base, fuse=False, example_input=example_input).eval(),
        "timm SE": timm.create_model(timm_name).eval(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds per configuration")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="skip torch.compile (minutes)")
    parser.add_argument("--no-train", dest="train", action="store_false", help="skip the training step")
    parser.add_argument("--no-forward", dest="forward", action="store_false", help="skip the eval forward table")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    base = torchvision.models.resnet50().eval()
    add_se(base)  # warm-up: imports, first-call caches
    surgery = statistics.median(seconds(lambda: add_se(base)) for _ in range(7))
    print(f"add_se(resnet50()): {surgery * 1e3:.0f} ms (median of 7; target < 500 ms)")

    models = compared_models(base)
    print(f"\n{args.threads} threads: median time; ratio to plain per round, median (min-max) over the rounds")
    for batch in (1, 8) if args.forward else ():
        for layout in (torch.contiguous_format, torch.channels_last):
            name = "channels-last" if layout is torch.channels_last else "contiguous"
            x = torch.randn(batch, 3, 224, 224).contiguous(memory_format=layout)
            nets = {k: m.to(memory_format=layout) for k, m in models.items()}
            pooled = se_inputs(nets["SE fused"], x)
            with torch.inference_mode():
                fns = {k: (lambda net=net: net(x)) for k, net in nets.items()}
                times = interleaved(fns, args.rounds, calls=3 if batch == 1 else 1)
                floor = statistics.median(
                    interleaved({"pool": lambda: [global_mean(u) for u in pooled]}, args.rounds)["pool"]
                )
            plain = statistics.median(times["plain"])
            title = f"\nforward, eval, 224x224, batch {batch}, {name}, {args.rounds} rounds"
            print_table(title, times, {"floor": plain + floor})

    for m in models.values():
        m.to(memory_format=torch.contiguous_format)
    if args.train:
        x, y = torch.randn(8, 3, 224, 224), torch.randint(0, 1000, (8,))
        nets = {k: m.train() for k, m in models.items() if k != "fx, no SE"}
        opts = {k: torch.optim.SGD(m.parameters(), lr=1e-4, momentum=0.9) for k, m in nets.items()}

        def step(key: str) -> None:
            opts[key].zero_grad()
            torch.nn.functional.cross_entropy(nets[key](x), y).backward()
            opts[key].step()

        times = interleaved({k: (lambda k=k: step(k)) for k in nets}, max(args.rounds // 2, 3))
        rounds = len(times["plain"])
        print_table(f"\ntraining step (forward, backward, SGD), batch 8, train mode, contiguous, {rounds} rounds",
                    times)
        for m in nets.values():
            m.eval()

    if args.compile:
        x = torch.randn(8, 3, 224, 224)
        compiled = {k: torch.compile(models[k]) for k in ("plain", "SE fused")}
        with torch.inference_mode():
            for m in compiled.values():
                m(x)  # compiles (minutes on 2 cores)
            times = interleaved({k: (lambda m=m: m(x)) for k, m in compiled.items()}, max(args.rounds // 2, 3))
        print_table(f"\ntorch.compile (inductor), eval, batch 8, contiguous, {len(times['plain'])} rounds", times)

    print("\npaper (SENet Sec. 4): one CPU, batch 1: 164 ms -> 167 ms, 1.02x; "
          "training step on GPUs: 190 -> 209 ms, 1.10x")


if __name__ == "__main__":
    main()
