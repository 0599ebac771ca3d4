"""Surgery benchmark: cost of add_se itself, and the SE overhead, measured side by side in one run.

    python benchmarks/surgery.py [--rounds 15] [--threads 2] [--no-forward] [--no-train] [--no-compile]
                                 [--no-capture]

Prints the time of add_se(resnet50()), then, against plain ResNet-50 (torchvision, random weights), the time ratios of:
the same network rewritten with no SE in it (add_se(se_layer=nn.Identity): the cost of the generated forward
itself, target 1.00x), SE-ResNet-50 from add_se (fused SE, the default), the same with fuse=False, and timm's
seresnet50 (random weights); at batch 1 and 8, contiguous and channels-last, eval forward at 224x224. Models run
interleaved (A B C D E, A B C D E, ...), so drift hits all alike; each round gives one ratio per model, and the median
and the min-max over rounds are printed. The floor: plain ResNet-50 plus the pooling reads alone (one mean over each
tensor an SE gates), the least any SE can cost.

Then, each over the same number of interleaved rounds:

- a training step (forward, backward, SGD step; batch 8, train mode): the fused SE with its fused backward (the
  default), the same with autograd's backward of the composed ops (``fused_backward(False)``), timm's; the floor is
  plain plus the squeeze's pooling and its backward alone (a mean over each gated tensor and its gradient);
- torch.compile (inductor), eval at batch 8: plain, the fused SE and timm's, each compiled;
- the excitation capture (``analysis.capture_excitations``, every gate's statistics per class) over 2 batches of 8
  (10 classes) against plain inference of the same model, for add_se's SE-ResNet-50 and for timm's.

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
from se_surgery.surgery.fused_grad import fused_backward
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


def pooling_floor(tensors: list[torch.Tensor]) -> Callable[[], object]:
    """The squeeze's pooling and its backward alone: a mean over each of ``tensors`` (the SE inputs u) and the
    gradient of u it gives (the expand of grad_z / HW), with nothing else of an SE block."""
    leaves = [u.detach().clone().requires_grad_() for u in tensors]

    def run() -> object:
        pooled = [global_mean(u) for u in leaves]
        return torch.autograd.grad(pooled, leaves, [torch.ones_like(z) for z in pooled])

    return run


def train_step(models: dict[str, nn.Module], rounds: int) -> None:
    """Forward, backward and SGD step at batch 8: plain, the fused SE with its fused backward and with autograd's,
    timm's; the floor is plain plus the pooling and its backward over the tensors the SE gates."""
    x, y = torch.randn(8, 3, 224, 224), torch.randint(0, 1000, (8,))
    nets = {k: models[k].train() for k in ("plain", "SE fused", "timm SE")}
    opts = {k: torch.optim.SGD(m.parameters(), lr=1e-4, momentum=0.9) for k, m in nets.items()}

    def step(key: str) -> None:
        opts[key].zero_grad()
        torch.nn.functional.cross_entropy(nets[key](x), y).backward()
        opts[key].step()

    def autograd_step() -> None:
        with fused_backward(False):
            step("SE fused")

    fns = {"plain": lambda: step("plain"), "SE fused": lambda: step("SE fused"), "SE autograd": autograd_step,
           "timm SE": lambda: step("timm SE"), "pool": pooling_floor(se_inputs(nets["SE fused"], x))}
    times = interleaved(fns, rounds)
    pool = times.pop("pool")
    print_table(f"\ntraining step (forward, backward, SGD), batch 8, train mode, contiguous, {rounds} rounds "
                "(SE autograd: the fused SE's forward, autograd's backward)", times,
                {"floor": statistics.median(times["plain"]) + statistics.median(pool)})
    for m in nets.values():
        m.eval()


def compiled_eval(models: dict[str, nn.Module], rounds: int) -> None:
    """torch.compile (inductor) of plain, the fused SE and timm's: eval at batch 8."""
    x = torch.randn(8, 3, 224, 224)
    compiled = {k: torch.compile(models[k]) for k in ("plain", "SE fused", "timm SE")}
    with torch.inference_mode():
        started = time.perf_counter()
        for m in compiled.values():
            m(x)  # compiles (minutes on 2 cores)
        print(f"\ntorch.compile: {time.perf_counter() - started:.0f} s to compile the 3 models")
        times = interleaved({k: (lambda m=m: m(x)) for k, m in compiled.items()}, rounds)
    print_table(f"torch.compile (inductor), eval, batch 8, contiguous, {rounds} rounds", times)


def capture(models: dict[str, nn.Module], rounds: int) -> None:
    """The excitation capture over 2 batches of 8 (every gate's per-class statistics) against plain inference of
    the same model, for add_se's SE and timm's; ratios to each model's own inference."""
    from analysis import capture_excitations

    g = torch.Generator().manual_seed(0)
    # Labels of 10 classes: 1000 would spend the run allocating 1000-row statistics for 16 images.
    data = [(torch.randn(8, 3, 224, 224, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(2)]

    def infer(model: nn.Module) -> None:
        with torch.no_grad():
            for images, _ in data:
                model(images)

    fns = {}
    for key in ("SE fused", "timm SE"):
        fns[key] = lambda m=models[key]: infer(m)
        fns[f"{key} capture"] = lambda m=models[key]: capture_excitations(m, data)
    times = interleaved(fns, rounds)
    print(f"\nexcitation capture, 2 batches of 8 at 224x224, contiguous, {rounds} rounds: ratio to the same model's"
          " inference per round, median (min-max)")
    for key in ("SE fused", "timm SE"):
        rel = [c / p for c, p in zip(times[f"{key} capture"], times[key])]
        print(f"  {key:>12}: {statistics.median(times[key]) * 1e3:8.1f} ms inference, "
              f"{statistics.median(times[f'{key} capture']) * 1e3:8.1f} ms capture   {spread(rel)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds per configuration")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="skip torch.compile (minutes)")
    parser.add_argument("--no-train", dest="train", action="store_false", help="skip the training step")
    parser.add_argument("--no-forward", dest="forward", action="store_false", help="skip the eval forward table")
    parser.add_argument("--no-capture", dest="capture", action="store_false", help="skip the capture table")
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
        train_step(models, args.rounds)
    if args.compile:
        compiled_eval(models, args.rounds)
    if args.capture:
        capture(models, args.rounds)

    print("\npaper (SENet Sec. 4): one CPU, batch 1: 164 ms -> 167 ms, 1.02x; "
          "training step on GPUs: 190 -> 209 ms, 1.10x")


if __name__ == "__main__":
    main()
