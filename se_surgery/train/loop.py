"""Retrain an SE model the SENet paper's way: ``python -m se_surgery.train`` and :func:`train`.

Read top to bottom: :func:`train` sets up data, model, optimizer and sampler (or restores them from a checkpoint),
then each epoch runs :func:`_train_epoch` and :func:`_evaluate` and writes ``last.pt`` / ``best.pt`` and a line of
``metrics.jsonl``. Under ``torchrun`` each rank takes its share of every global batch (DDP); only rank 0 writes.

Determinism: the sampler's stream is a function of ``(seed, epoch)``; each training image's augmentation is seeded
from ``(seed, epoch, position in the stream)`` and the global RNG is reseeded from ``(seed, epoch, step, rank)``
before every micro-batch. So a run stopped anywhere and resumed from ``last.pt`` repeats exactly what the
uninterrupted run does, with no RNG state to carry, whatever the number of DataLoader workers.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from ..errors import DataError, TrainError
from ..modes import eval_mode
from .checkpoint import read_checkpoint, save_checkpoint
from .data import build_dataset
from .distributed import Env, all_sum, broadcast_buffers, check_replicas_in_sync, setup, teardown
from .metrics import MetricsWriter, topk_correct
from .models import build_model, make_model_config, surgery_config
from .recipe import Recipe
from .sampling import ClassAwareSampler, ShuffleSampler
from .seeding import SeededDataset, SeededDraws, seed_of

__all__ = ["train"]

log = logging.getLogger(__name__)
_MODEL_KEYS = ("arch", "arch_kwargs", "surgery", "num_classes", "class_names")


def _resolve_resume(resume: str | Path | None, out: Path) -> Path | None:
    if resume is None:
        for name in ("config.json", "last.pt", "metrics.jsonl"):
            if (out / name).exists():
                raise TrainError(
                    f"{out} already holds a run ({name}): pass --resume auto to continue it, or choose another --out"
                )
        return None
    if str(resume) == "auto":
        return out / "last.pt" if (out / "last.pt").exists() else None
    return Path(resume)


def _check_same_model(saved: dict[str, Any], now: dict[str, Any], path: Path) -> None:
    for key in _MODEL_KEYS:
        if saved.get(key) != now.get(key):
            raise TrainError(
                f"{path} was trained with another {key} ({str(saved.get(key))[:80]} vs now {str(now.get(key))[:80]}): "
                "resume it with the same --arch/--data/SE options, or start a new run in another --out"
            )


def _device_notes(recipe: Recipe, env: Env) -> Recipe:
    """Turn off the GPU-only options on the CPU, with a note, rather than crash."""
    if env.device.type == "cuda":
        return recipe
    off = [name for name in ("amp", "channels_last", "compile", "sync_bn") if getattr(recipe, name)]
    for name in off:
        log.info("note: --%s does nothing on the CPU; ignored", name.replace("_", "-"))
    return recipe if not off else Recipe.from_dict({**recipe.to_dict(), **{name: False for name in off}})


def train(
    recipe: Recipe,
    out: str | Path,
    *,
    resume: str | Path | None = None,
    tensorboard: bool = False,
    progress: bool = True,
) -> Path:
    """Train ``recipe`` into the run folder ``out``; return ``out``.

    Args:
        recipe: What and how to train (see :mod:`se_surgery.train.recipe`; ``get_recipe()`` gives the digits demo).
        out: Run folder; gets ``config.json``, ``metrics.jsonl``, ``last.pt`` and ``best.pt``. A folder that already
            holds a run is refused unless ``resume`` is given.
        resume: ``"auto"`` (``out/last.pt`` if it exists, else start afresh) or a checkpoint path.
        tensorboard: Also write TensorBoard event files to ``out/tb``.
        progress: Show a tqdm bar per epoch (rank 0 only).

    Raises:
        TrainError: bad recipe, a batch the ranks cannot share, a resume of another model, a NaN loss, ...
        DataError: missing or unreadable data.
        CheckpointError: a damaged ``resume`` checkpoint.

    Examples:
        >>> from se_surgery.train.recipe import get_recipe
        >>> run = train(get_recipe(epochs=2), "runs/quick")  # doctest: +SKIP
        >>> [json.loads(line)["val_top1"] for line in open(run / "metrics.jsonl")]  # doctest: +SKIP
    """
    env = setup()
    try:
        return _train(recipe, Path(out), resume, tensorboard, progress, env)
    finally:
        teardown(env)


def _train(recipe: Recipe, out: Path, resume, tensorboard: bool, progress: bool, env: Env) -> Path:
    recipe = _device_notes(recipe.resolved(), env)
    ckpt_path = _resolve_resume(resume, out)
    micro_batches = env.world_size * recipe.accum_steps
    if recipe.batch_size % micro_batches:
        raise TrainError(
            f"global batch {recipe.batch_size} does not split into {env.world_size} ranks x {recipe.accum_steps} "
            f"accumulation steps: pass a --batch-size divisible by {micro_batches}"
        )
    micro = recipe.batch_size // micro_batches

    # Data: the training stream is num_samples // batch_size whole global batches.
    common = dict(input_size=recipe.input_size, resize=recipe.resize, mean=recipe.mean)
    train_set = build_dataset(recipe.data, "train", min_scale=recipe.min_scale, flip=recipe.flip, **common)
    val_set = build_dataset(recipe.data, "val", **common)
    if list(val_set.classes) != list(train_set.classes):
        raise DataError(f"{recipe.data}: train/ and val/ hold different class folders; give both the same classes")
    steps_per_epoch = (recipe.num_samples or len(train_set)) // recipe.batch_size
    if steps_per_epoch == 0:
        raise TrainError(f"an epoch of {recipe.num_samples or len(train_set)} images is less than one batch of "
                         f"{recipe.batch_size}: lower --batch-size or raise --num-samples")

    # Model: identical initial weights on every rank (DDP also broadcasts rank 0's).
    torch.manual_seed(recipe.seed)
    model_config = {**recipe.to_dict(), "num_classes": len(train_set.classes)}
    model_config["surgery"] = surgery_config(recipe)
    model = build_model(model_config, pretrained=recipe.pretrained)
    model_config = make_model_config(model, recipe, list(train_set.classes))
    state = read_checkpoint(ckpt_path) if ckpt_path else None
    if state is not None:
        _check_same_model(state["model_config"], model_config, ckpt_path)
        model.load_state_dict(state["model"])
    model.to(env.device)
    if recipe.channels_last:
        model.to(memory_format=torch.channels_last)
    if recipe.sync_bn and env.world_size > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    raw = model  # what we save: no DDP / compile wrappers in the state_dict keys
    if env.world_size > 1:
        model = DistributedDataParallel(model, device_ids=[env.device] if env.device.type == "cuda" else None)
    if recipe.compile:
        model = torch.compile(model)

    optimizer = torch.optim.SGD(
        raw.parameters(), lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=recipe.lr_step, gamma=recipe.lr_gamma)
    cls = ClassAwareSampler if recipe.class_aware else ShuffleSampler
    sampler = cls(
        train_set.targets if recipe.class_aware else len(train_set),
        num_replicas=env.world_size, rank=env.rank, seed=recipe.seed, num_samples=steps_per_epoch * recipe.batch_size,
    )
    start_epoch, epoch_step, best, totals = 0, 0, -1.0, torch.zeros(3, dtype=torch.float64)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        _apply_schedule_changes(state["config"], recipe, optimizer, scheduler, state["epoch"])
        start_epoch, epoch_step, best = state["epoch"], state["epoch_step"], state["best_top1"]
        if env.is_main:  # rank 0 carries the interrupted epoch's partial sums; the all-reduce adds the others' zeros
            totals = state["progress"].double()
        log.info("resumed %s at epoch %d, step %d", ckpt_path, start_epoch, epoch_step)

    cuda = env.device.type == "cuda"
    loader = DataLoader(
        SeededDataset(train_set), batch_size=micro, sampler=SeededDraws(sampler), num_workers=recipe.workers,
        pin_memory=cuda, persistent_workers=recipe.workers > 0, drop_last=False,
    )
    chosen, n = range(len(val_set)), recipe.val_samples
    if n and n < len(val_set):
        chosen = sorted({round(i * (len(val_set) - 1) / max(n - 1, 1)) for i in range(n)})
    val_loader = DataLoader(
        Subset(val_set, chosen[env.rank :: env.world_size]),  # exact shards, no padding
        batch_size=recipe.eval_batch_size or micro, num_workers=recipe.workers, pin_memory=cuda,
    )
    writer = None
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(recipe.to_dict(), indent=2) + "\n")
        writer = MetricsWriter(out, tensorboard=tensorboard, keep_until=start_epoch if state else None)
        if state is not None and state.get("metrics"):
            writer.write(state["metrics"])  # the checkpoint's epoch, if its line was lost in a crash
        log.info(
            "training %s%s on %s: %d classes, %d epochs x %d steps of %d images (%d rank(s) x %d x %d accum), lr %g",
            "SE-" if recipe.se else "", recipe.arch, recipe.data, model_config["num_classes"], recipe.epochs,
            steps_per_epoch, recipe.batch_size, env.world_size, micro, recipe.accum_steps, recipe.lr,
        )

    ctx = dict(recipe=recipe, env=env, model=model, raw=raw, optimizer=optimizer, scheduler=scheduler,
               sampler=sampler, model_config=model_config, out=out, steps_per_epoch=steps_per_epoch,
               metrics=state.get("metrics") if state else None)
    for epoch in range(start_epoch, recipe.epochs):
        sampler.set_epoch(epoch)
        sampler.position = epoch_step * recipe.batch_size
        started, lr = time.perf_counter(), optimizer.param_groups[0]["lr"]
        totals, images = _train_epoch(ctx, loader, epoch, epoch_step, totals, best, progress)
        train_seconds = time.perf_counter() - started
        scheduler.step()
        broadcast_buffers(raw, env)
        val = _evaluate(raw, val_loader, env, recipe)
        crc = check_replicas_in_sync(raw, env)
        loss_sum, correct, seen = totals.tolist()
        metrics = {
            "epoch": epoch + 1, "lr": lr, "train_loss": loss_sum / seen, "train_top1": 100 * correct / seen, **val,
            "images_per_s": images / train_seconds, "seconds": time.perf_counter() - started,
            "world_size": env.world_size, "weights_crc32": crc,
        }
        ctx["metrics"] = metrics
        is_best, best = val["val_top1"] > best, max(best, val["val_top1"])
        if env.is_main:
            payload = _payload(ctx, epoch + 1, 0, torch.zeros(3, dtype=torch.float64), best, metrics)
            _save(ctx, "last.pt", payload)
            if is_best:
                _save(ctx, "best.pt", payload)
            writer.write(metrics)
            log.info("epoch %d/%d: %s", epoch + 1, recipe.epochs, _fmt(metrics))
        epoch_step, totals = 0, torch.zeros(3, dtype=torch.float64)
    if writer is not None:
        writer.close()
    if start_epoch >= recipe.epochs:
        log.info("nothing to do: %s has finished its %d epochs (pass --epochs N to train on)", out, recipe.epochs)
    return out


def _apply_schedule_changes(saved: dict[str, Any], recipe: Recipe, optimizer, scheduler, epoch: int) -> None:
    """On resume, let explicitly changed optimisation flags win over the restored optimizer/scheduler state."""
    for group in optimizer.param_groups:
        group.update(momentum=recipe.momentum, weight_decay=recipe.weight_decay)
    keys = ("lr", "lr_step", "lr_gamma")
    if all(saved.get(k) == getattr(recipe, k) for k in keys):
        return  # keep the restored state bit for bit
    scheduler.step_size, scheduler.gamma = recipe.lr_step, recipe.lr_gamma
    scheduler.base_lrs = [recipe.lr] * len(optimizer.param_groups)
    for group in optimizer.param_groups:
        group["initial_lr"] = recipe.lr
        group["lr"] = recipe.lr * recipe.lr_gamma ** (epoch // recipe.lr_step)
    log.info("resume: learning-rate schedule changed to lr %g, /%g every %d epochs", recipe.lr,
             1 / recipe.lr_gamma, recipe.lr_step)


def _payload(ctx: dict[str, Any], epoch: int, epoch_step: int, totals: torch.Tensor, best: float,
             metrics: dict[str, Any] | None) -> dict[str, Any]:
    """Everything a checkpoint holds (plain data and tensors only)."""
    sampler = ctx["sampler"].state_dict()
    sampler.update(epoch=epoch, position=epoch_step * ctx["recipe"].batch_size)
    return {
        "model": ctx["raw"].state_dict(), "model_config": ctx["model_config"], "config": ctx["recipe"].to_dict(),
        "optimizer": ctx["optimizer"].state_dict(), "scheduler": ctx["scheduler"].state_dict(), "sampler": sampler,
        "epoch": epoch, "epoch_step": epoch_step, "step": epoch * ctx["steps_per_epoch"] + epoch_step,
        "progress": totals, "best_top1": best, "metrics": metrics, "world_size": ctx["env"].world_size,
    }


def _train_epoch(ctx: dict[str, Any], loader: DataLoader, epoch: int, epoch_step: int, totals: torch.Tensor,
                 best: float, progress: bool) -> tuple[torch.Tensor, int]:
    """One epoch from ``epoch_step`` on; returns the epoch's global ``[loss_sum, correct, seen]`` and images here."""
    recipe, env, model, optimizer = ctx["recipe"], ctx["env"], ctx["model"], ctx["optimizer"]
    steps, accum = ctx["steps_per_epoch"], recipe.accum_steps
    model.train()
    local = torch.zeros(3, dtype=torch.float64)
    bar = tqdm(total=steps, initial=epoch_step, desc=f"epoch {epoch + 1}/{recipe.epochs}", unit="step",
               disable=not (progress and env.is_main), dynamic_ncols=True, leave=False)
    started, images, step, micro_index = time.perf_counter(), 0, epoch_step, 0
    for images_batch, target in loader:
        images_batch = images_batch.to(env.device, non_blocking=True)
        target = target.to(env.device, non_blocking=True)
        if recipe.channels_last:
            images_batch = images_batch.contiguous(memory_format=torch.channels_last)
        step_seed = seed_of(recipe.seed, epoch, step, micro_index, env.rank)  # dropout & co.
        if env.device.type == "cuda":
            torch.manual_seed(step_seed)
        else:  # the CPU generator alone: see SeededDataset (no CUDA seed queued with a stack trace per call)
            torch.default_generator.manual_seed(step_seed)
        last_micro = micro_index == accum - 1
        with contextlib.nullcontext() if last_micro or env.world_size == 1 else model.no_sync():
            with torch.autocast(env.device.type, dtype=torch.bfloat16, enabled=recipe.amp):
                logits = model(images_batch)
            loss = nn.functional.cross_entropy(logits.float(), target)
            (loss / accum).backward()
        # one host sync per step: the loss (for the NaN check) and the step's correct count together
        value, correct = torch.stack([loss.detach().double(), topk_correct(logits.detach(), target, (1,))[0]]).tolist()
        if not math.isfinite(value):
            bar.close()
            raise TrainError(
                f"the loss became {value} at step {epoch * steps + step + 1} (epoch {epoch + 1}); nothing saved since; "
                f"{ctx['out'] / 'last.pt'} is the last good checkpoint: lower --lr and resume with --resume auto"
            )
        local += torch.tensor([value * len(target), correct, len(target)], dtype=torch.float64)
        images += len(target) * env.world_size
        micro_index += 1
        if not last_micro:
            continue
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step, micro_index = step + 1, 0
        bar.update()
        if bar.n % 5 == 0 or step == steps:
            rate = images / (time.perf_counter() - started)
            bar.set_postfix(loss=f"{local[0] / local[2]:.3f}", top1=f"{100 * local[1] / local[2]:.1f}",
                            img_s=f"{rate:.0f}", refresh=False)
        if recipe.ckpt_every and step % recipe.ckpt_every == 0 and step < steps:
            partial = totals + all_sum(local.clone(), env)
            if env.is_main:
                _save(ctx, "last.pt", _payload(ctx, epoch, step, partial, best, ctx["metrics"]))
    bar.close()
    return totals + all_sum(local, env), images


def _save(ctx: dict[str, Any], name: str, payload: dict[str, Any]) -> None:
    """Write a checkpoint, unless the weights went non-finite (then the previous one stays the last good one)."""
    if not all(torch.isfinite(p).all() for p in ctx["raw"].parameters()):
        raise TrainError(
            f"the weights became non-finite by step {payload['step']}; {ctx['out'] / 'last.pt'} is the last good "
            "checkpoint: lower --lr and resume with --resume auto"
        )
    save_checkpoint(ctx["out"] / name, payload)


@torch.no_grad()
def _evaluate(model: nn.Module, loader: DataLoader, env: Env, recipe: Recipe) -> dict[str, float]:
    """Loss, top-1 and top-5 over the whole validation set: each rank its own shard, then exact sums."""
    sums = torch.zeros(4, dtype=torch.float64)  # loss_sum, top1, top5, n
    with eval_mode(model):
        for images, target in loader:
            images, target = images.to(env.device, non_blocking=True), target.to(env.device, non_blocking=True)
            if recipe.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with torch.autocast(env.device.type, dtype=torch.bfloat16, enabled=recipe.amp):
                logits = model(images).float()
            loss = nn.functional.cross_entropy(logits, target, reduction="sum")
            sums += torch.cat([loss.double().cpu()[None], topk_correct(logits, target).cpu(),
                               torch.tensor([len(target)], dtype=torch.float64)])
    loss_sum, top1, top5, n = all_sum(sums, env).tolist()
    return {"val_loss": loss_sum / n, "val_top1": 100 * top1 / n, "val_top5": 100 * top5 / n}


def _fmt(metrics: dict[str, Any]) -> str:
    keys = ("train_loss", "train_top1", "val_loss", "val_top1", "val_top5", "images_per_s", "seconds")
    return ", ".join(f"{k} {metrics[k]:.4g}" for k in keys)

