"""Trainer overhead and sampler speed, side by side with plain references.

1. Images/s of ``se_surgery.train`` against a bare hand-written loop (same SE-ResNet-18, digits, batch, steps, SGD;
   a plain shuffled DataLoader, no seeding, checkpoints or metrics). Rounds alternate to share the machine's noise.
2. One ImageNet-size epoch (1,281,167 labels, 1,000 classes) of ``ClassAwareSampler`` against a straightforward
   per-sample Python version of the same Relay-BP algorithm.

Run: ``python benchmarks/train.py`` (about 1-2 minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from se_surgery.train import train
from se_surgery.train.data import build_dataset
from se_surgery.train.models import build_model
from se_surgery.train.recipe import Recipe, get_recipe
from se_surgery.train.sampling import ClassAwareSampler


def bare_loop(steps: int, batch: int, recipe: Recipe | None = None, data: Dataset | None = None,
              device: str = "cpu", workers: int = 0) -> float:
    """The loop anyone would write first; images/s. By default the demo recipe's SE-ResNet-18 on the digits; with
    ``recipe`` its arch, input size, optimizer and ``amp`` / ``channels_last``, and ``data`` instead of the digits."""
    r = (recipe or get_recipe()).resolved()
    if data is None:
        data = build_dataset("digits", "train", input_size=r.input_size, min_scale=r.min_scale, flip=r.flip)
    torch.manual_seed(0)
    model = build_model({"arch": r.arch, "arch_kwargs": r.arch_kwargs, "num_classes": len(data.classes),
                         "input_size": r.input_size, "surgery": {"reduction": r.reduction, "init": r.se_init}},
                        factory=r.arch)
    layout = torch.channels_last if r.channels_last else torch.contiguous_format
    model.to(device, memory_format=layout)
    optimizer = torch.optim.SGD(model.parameters(), lr=r.lr, momentum=r.momentum, weight_decay=r.weight_decay)
    loader = DataLoader(data, batch_size=batch, shuffle=True, drop_last=True, num_workers=workers,
                        pin_memory=device != "cpu")
    model.train()
    started, seen = time.perf_counter(), 0
    while seen < steps * batch:
        for x, y in loader:
            x, y = x.to(device, non_blocking=True).contiguous(memory_format=layout), y.to(device, non_blocking=True)
            with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=r.amp):
                out = model(x)
            loss = torch.nn.functional.cross_entropy(out.float(), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            seen += len(y)
            if seen >= steps * batch:
                break
    float(loss.detach())  # waits for the device
    return seen / (time.perf_counter() - started)


def trainer(steps: int, batch: int, recipe: Recipe | None = None) -> float:
    """The trainer, one epoch of ``steps`` steps; its own training images/s (evaluation excluded)."""
    with tempfile.TemporaryDirectory() as tmp:
        recipe = recipe or get_recipe(val_samples=10)
        recipe = dataclasses.replace(recipe, epochs=1, batch_size=batch, num_samples=steps * batch)
        out = train(recipe, Path(tmp) / "run", progress=False)
        return json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["images_per_s"]


def reference_sampler(labels: np.ndarray, num_samples: int, seed: int = 0) -> list[int]:
    """Relay Backpropagation's class-aware sampling, one sample at a time, as the paper describes it."""
    rng = random.Random(seed)
    per_class = defaultdict(list)
    for index, label in enumerate(labels.tolist()):
        per_class[label].append(index)
    classes = list(per_class)
    for items in per_class.values():
        rng.shuffle(items)
    rng.shuffle(classes)
    next_image = dict.fromkeys(classes, 0)
    next_class, out = 0, []
    for _ in range(num_samples):
        if next_class == len(classes):
            rng.shuffle(classes)
            next_class = 0
        c = classes[next_class]
        next_class += 1
        items = per_class[c]
        if next_image[c] == len(items):
            rng.shuffle(items)
            next_image[c] = 0
        out.append(items[next_image[c]])
        next_image[c] += 1
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=15, help="training steps per measurement")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    print(f"1. training throughput: SE-ResNet-18, digits 32x32, batch {args.batch}, {args.steps} steps, "
          f"{torch.get_num_threads()} threads; best of {args.rounds} alternating rounds")
    bare, ours = [], []
    for _ in range(args.rounds):
        bare.append(bare_loop(args.steps, args.batch))
        ours.append(trainer(args.steps, args.batch))
    print(f"   bare loop {max(bare):8.1f} img/s   (rounds: {', '.join(f'{v:.1f}' for v in bare)})")
    print(f"   trainer   {max(ours):8.1f} img/s   (rounds: {', '.join(f'{v:.1f}' for v in ours)})")
    print(f"   ratio trainer / bare = {max(ours) / max(bare):.3f}  (target >= 0.95)")

    labels = np.random.default_rng(0).integers(0, 1000, 1_281_167)
    print(f"2. class-aware sampling, one epoch of {len(labels):,} labels in 1,000 classes")
    started = time.perf_counter()
    sampler = ClassAwareSampler(labels, seed=0)
    built = time.perf_counter() - started
    times = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        started = time.perf_counter()
        stream = list(sampler)
        times.append(time.perf_counter() - started)
    started = time.perf_counter()
    reference = reference_sampler(labels, len(labels))
    slow = time.perf_counter() - started
    assert len(stream) == len(reference)
    print(f"   vectorised {min(times):.3f} s/epoch (+ {built:.3f} s once to group the labels)")
    print(f"   per-sample Python reference {slow:.3f} s/epoch")
    print(f"   speed-up {slow / min(times):.1f}x")


if __name__ == "__main__":
    main()
