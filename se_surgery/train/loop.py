"""Retrain an SE model the SENet paper's way: ``python -m se_surgery.train`` and :func:`train`.

Read top to bottom: :func:`train` holds the run folder's lock while ``_train`` checks the recipe and the resumed
checkpoint (``_start``), loads the data (``_datasets``), builds the model, optimizer and sampler (``_set_up``),
restores a checkpoint's states into them (``_restore``) and opens the run folder; then each epoch (``_run_epoch``)
runs :func:`_train_epoch` and :func:`_evaluate` and writes ``last.pt`` / ``best.pt`` and a line of ``metrics.jsonl``.
Under ``torchrun`` each rank takes its share of every global batch (DDP); only rank 0 writes.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from ..errors import DataError, Interrupted, SESurgeryError, TrainError
from ..modes import eval_mode
from .checkpoint import remove_stale_temps, save_checkpoint
from .data import build_dataset, unwrap_worker_error
from .distributed import Env, all_sum, broadcast_buffers, check_replicas_in_sync, per_rank, setup, teardown
from .image_check import check_image_headers
from .metrics import MetricsWriter, topk_correct
from .models import build_training_model
from .pretrained import freeze_norms, model_from_weights, pretrained_groups, run_groups, start_open_gates
from .recipe import Recipe
from .resume import ResumePoint, apply_schedule_changes, check_resume_changes, check_same_model, resolve_resume
from .run_lock import RunLock
from .sampling import ClassAwareSampler, ShuffleSampler
from .schedule import group_lrs, lr_at, param_groups, set_lrs
from .seeding import SeededDataset, SeededDraws, seed_of

__all__ = ["train"]

log = logging.getLogger(__name__)
def _device_notes(recipe: Recipe, env: Env) -> Recipe:
    """Turn off ``--sync-bn`` where it cannot run (it needs CUDA and more than one rank), with a note, rather than
    crash.

    ``--amp`` (bf16 autocast), ``--channels-last`` and ``--compile`` (inductor) run on every device, the CPU included.
    """
    if not recipe.sync_bn or (env.device.type == "cuda" and env.world_size > 1):
        return recipe
    if env.is_main:
        where = "on the CPU" if env.device.type != "cuda" else "on a single rank"
        log.info("note: --sync-bn syncs BatchNorm statistics across CUDA ranks; it does nothing %s: ignored", where)
    return Recipe.from_dict({**recipe.to_dict(), "sync_bn": False})


def train(
    recipe: Recipe,
    out: str | Path,
    *,
    resume: str | Path | ResumePoint | None = None,
    tensorboard: bool = False,
    progress: bool = True,
) -> Path:
    """Train ``recipe`` into the run folder ``out``; return ``out``.

    Args:
        recipe: What and how to train (see :mod:`se_surgery.train.recipe`; ``get_recipe()`` gives the digits demo).
        out: Run folder; gets ``config.json``, ``metrics.jsonl``, ``last.pt`` and ``best.pt``. A folder that already
            holds a run is refused unless ``resume`` is given.
        resume: ``"auto"`` (``out/last.pt`` if it exists, else start afresh), a checkpoint path, or the
            :class:`~se_surgery.train.resume.ResumePoint` that :func:`~se_surgery.train.resume.resolve_resume` gave.
        tensorboard: Also write TensorBoard event files to ``out/tb``.
        progress: Show a tqdm bar per epoch (rank 0 only).

    Raises:
        TrainError: bad recipe, a batch the ranks cannot share, a resume of another model, a NaN loss, ...
        DataError: missing or unreadable data.
        CheckpointError: a damaged ``resume`` checkpoint.
        Interrupted: Ctrl-C; the message says where the run stopped and what ``out/last.pt`` holds.

    Examples:
        >>> from se_surgery.train.recipe import get_recipe
        >>> run = train(get_recipe(epochs=2), "runs/quick")  # doctest: +SKIP
        >>> [json.loads(line)["val_top1"] for line in open(run / "metrics.jsonl")]  # doctest: +SKIP
    """
    env = setup()
    live: list[RunState] = []  # the run once it is set up, for the message on Ctrl-C
    try:
        with RunLock(out, env):  # one run per folder, released on any exit
            return _train(recipe, Path(out), resume, tensorboard, progress, env, live)
    except KeyboardInterrupt:
        raise Interrupted(_interrupted(Path(out), live[0] if live else None)) from None
    except RuntimeError as error:  # torch's C++ code (the zip writer of a save, say) reports Ctrl-C as its own error
        if not _caused_by_ctrl_c(error):
            raise
        raise Interrupted(_interrupted(Path(out), live[0] if live else None)) from None
    finally:
        teardown(env)


@dataclass
class RunState:
    """What a run holds while it trains; every checkpoint is made of it (see :meth:`payload`)."""

    recipe: Recipe
    env: Env
    out: Path
    model: nn.Module  # what runs forward: ``raw`` inside the DDP / torch.compile wrappers
    raw: nn.Module  # what is saved: no wrapper in the state_dict keys
    model_config: dict[str, Any]
    optimizer: torch.optim.Optimizer
    sampler: ClassAwareSampler | ShuffleSampler
    steps_per_epoch: int
    groups: dict[str, list[str]] | None = None  # parameter names: "new" (at --se-lr), "frozen"; None: one group
    best: float = -1.0  # best val top-1 so far
    metrics: dict[str, Any] | None = None  # the last finished epoch's metrics line
    position: tuple[int, int] = (0, 0)  # (epoch, steps into it) the training has reached
    saved: tuple[int, int] | None = None  # (epoch, epoch_step) that out/last.pt holds, None before the first

    def last_good(self) -> str:
        """What a stop can point back to: ``out/last.pt`` and what it holds, or that none was written yet."""
        if self.saved is None:
            return "no checkpoint was written yet"
        return f"{self.out / 'last.pt'} is the last good checkpoint (it holds {_holds(self.saved)})"

    def payload(self, epoch: int, epoch_step: int, totals: torch.Tensor) -> dict[str, Any]:
        """Everything a checkpoint holds (plain data and tensors only)."""
        sampler = self.sampler.state_dict()
        sampler.update(epoch=epoch, position=epoch_step * self.recipe.batch_size)
        return {
            "model": self.raw.state_dict(), "model_config": self.model_config, "config": self.recipe.to_dict(),
            "optimizer": self.optimizer.state_dict(), "groups": self.groups, "sampler": sampler,
            "epoch": epoch, "epoch_step": epoch_step, "step": epoch * self.steps_per_epoch + epoch_step,
            "progress": totals, "best_top1": self.best, "metrics": self.metrics, "world_size": self.env.world_size,
        }

    def save(self, names: tuple[str, ...], epoch: int, epoch_step: int, totals: torch.Tensor) -> None:
        """Rank 0 writes the checkpoint ``names``; every rank calls this, as all must agree the weights are finite.

        Raises:
            TrainError: the weights of some rank went non-finite (on every rank, so none waits for the others);
                the checkpoints already on disk stay as the last good ones.
        """
        finite = all(bool(torch.isfinite(p).all()) for p in self.raw.parameters())
        if all_sum(torch.tensor([0.0 if finite else 1.0], dtype=torch.float64), self.env).item():
            raise TrainError(
                f"the weights became non-finite by step {epoch * self.steps_per_epoch + epoch_step}; "
                f"{self.last_good()}: lower --lr and {_go_on(self.saved)}"
            )
        if self.env.is_main:
            payload = self.payload(epoch, epoch_step, totals)
            for name in names:
                save_checkpoint(self.out / name, payload)
        if "last.pt" in names:
            self.saved = (epoch, epoch_step)


def _holds(saved: tuple[int, int]) -> str:
    epoch, step = saved
    return f"the end of epoch {epoch}" if step == 0 else f"epoch {epoch + 1} up to step {step}"


def _go_on(saved: tuple[int, int] | None) -> str:
    return "resume with --resume auto" if saved else "start again with --resume auto"


def _caused_by_ctrl_c(error: BaseException | None) -> bool:
    """Whether a KeyboardInterrupt stands anywhere in ``error``'s chain of causes."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, KeyboardInterrupt):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


def _interrupted(out: Path, run: RunState | None) -> str:
    """The Ctrl-C message: where the run stopped and what its folder holds to go on from."""
    if run is None:
        return f"interrupted before the first training step; {out} is as it was"
    epoch, step = run.position
    where = f"interrupted at epoch {epoch + 1}, step {step} of {run.steps_per_epoch}"
    if run.saved is None:
        return f"{where}; no checkpoint was written yet: start again with --resume auto"
    return f"{where}; {out / 'last.pt'} holds {_holds(run.saved)}: continue with --resume auto"


def _train(recipe: Recipe, out: Path, resume: str | Path | ResumePoint | None, tensorboard: bool, progress: bool,
           env: Env, live: list[RunState]) -> Path:
    """:func:`train` on this rank: set up (or restore) a :class:`RunState`, then train, evaluate and save per epoch."""
    recipe, start = _start(recipe, out, resume, env)
    micro = _micro_batch(recipe, env)
    train_set, val_set, steps_per_epoch = _datasets(recipe, env)
    run = _set_up(recipe, env, out, train_set, steps_per_epoch, start)
    start_epoch, epoch_step, totals = _restore(run, start)
    live.append(run)
    loader, val_loader = _loaders(run, train_set, val_set, micro)
    writer = _open_run_folder(run, start, tensorboard, micro) if env.is_main else None
    if start.state is None and (recipe.weights is not None or recipe.pretrained):
        _evaluate_start(run, val_loader, writer)
    for epoch in range(start_epoch, recipe.epochs):
        _run_epoch(run, loader, val_loader, epoch, epoch_step, totals, progress, writer)
        epoch_step, totals = 0, torch.zeros(3, dtype=torch.float64)
    if writer is not None:
        writer.close()
    if start_epoch >= recipe.epochs:
        log.info("nothing to do: %s has finished its %d epochs (pass --epochs N to train on)", out, recipe.epochs)
    return out


def _start(recipe: Recipe, out: Path, resume: str | Path | ResumePoint | None,
           env: Env) -> tuple[Recipe, ResumePoint]:
    """The resolved recipe and the checkpoint the run continues (if any), checked before any data is read."""
    recipe = _device_notes(recipe.resolved(), env)
    if env.is_main:
        remove_stale_temps(out)  # under the lock: no live writer's
    start = resolve_resume(resume, out)
    if start.state is not None:
        check_resume_changes(start.state["config"], recipe, start.path)  # before config.json is rewritten
    return recipe, start


def _micro_batch(recipe: Recipe, env: Env) -> int:
    """Images per forward on each rank: the global batch split over the ranks and the accumulation steps."""
    micro_batches = env.world_size * recipe.accum_steps
    if recipe.batch_size % micro_batches:
        raise TrainError(
            f"global batch {recipe.batch_size} does not split into {env.world_size} ranks x {recipe.accum_steps} "
            f"accumulation steps: pass a --batch-size divisible by {micro_batches}"
        )
    return recipe.batch_size // micro_batches


def _datasets(recipe: Recipe, env: Env) -> tuple[Any, Any, int]:
    """``(train_set, val_set, steps_per_epoch)``: the training stream is num_samples // batch_size whole batches."""
    common = dict(input_size=recipe.input_size, resize=recipe.resize, mean=recipe.mean, std=recipe.std,
                  classes=recipe.classes)
    train_set = build_dataset(recipe.data, "train", min_scale=recipe.min_scale, flip=recipe.flip, **common)
    val_set = build_dataset(recipe.data, "val", **common)
    if list(val_set.classes) != list(train_set.classes):
        raise DataError(f"{recipe.data}: train/ and val/ hold different class folders; give both the same classes")
    if hasattr(train_set, "samples"):  # an image folder: every file's header read (and cached) before training
        check_image_headers(recipe.data, [p for s in (train_set, val_set) for p, _ in s.samples], env)
    steps_per_epoch = (recipe.num_samples or len(train_set)) // recipe.batch_size
    if steps_per_epoch == 0:
        raise TrainError(f"an epoch of {recipe.num_samples or len(train_set)} images is less than one batch of "
                         f"{recipe.batch_size}: lower --batch-size or raise --num-samples")
    return train_set, val_set, steps_per_epoch


def _set_up(recipe: Recipe, env: Env, out: Path, train_set: Any, steps_per_epoch: int,
            start: ResumePoint) -> RunState:
    """The model (the checkpoint's weights on resume, or ``--weights``), the paper's SGD with its parameter groups
    (:mod:`~se_surgery.train.schedule`), and this rank's sampler.

    Every rank builds identical initial weights (DDP also broadcasts rank 0's) and draws its share of the stream.
    """
    torch.manual_seed(recipe.seed)
    classes = list(train_set.classes)
    if start.state is None and recipe.weights is not None:
        raw, model_config, groups = model_from_weights(recipe, classes)
    else:
        raw, model_config = build_training_model(recipe, classes)
        if start.state is not None:
            groups = start.state.get("groups")
        else:  # --pretrained: the SE blocks and a replaced head are new; a run from scratch has one group
            groups = pretrained_groups(raw, recipe, len(classes)) if recipe.pretrained else run_groups(raw, recipe)
            if recipe.pretrained:
                start_open_gates(raw, recipe)
    if start.state is not None:
        check_same_model(start.state["model_config"], model_config, start.path)
        raw.load_state_dict(start.state["model"])
    frozen = set(groups["frozen"]) if groups else set()
    for name, p in raw.named_parameters():
        if name in frozen:
            p.requires_grad_(False)  # before DDP, which buckets only the trained ones
    raw, model = _wrap(raw, recipe, env)
    optimizer = torch.optim.SGD(param_groups(raw, recipe, groups["new"] if groups else None, frozen),
                                lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay)
    sampler_class = ClassAwareSampler if recipe.class_aware else ShuffleSampler
    sampler = sampler_class(
        train_set.targets if recipe.class_aware else len(train_set),
        num_replicas=env.world_size, rank=env.rank, seed=recipe.seed, num_samples=steps_per_epoch * recipe.batch_size,
    )
    return RunState(recipe, env, out, model, raw, model_config, optimizer, sampler, steps_per_epoch, groups)


def _restore(run: RunState, start: ResumePoint) -> tuple[int, int, torch.Tensor]:
    """Put the resumed checkpoint's optimizer, schedule and progress into ``run``; return where training goes on.

    Returns ``(epoch, epoch_step, totals)``: ``(0, 0, zeros)`` for a fresh run, else the checkpoint's position and
    the interrupted epoch's partial ``[loss_sum, correct, seen]``.
    """
    start_epoch, epoch_step, totals = 0, 0, torch.zeros(3, dtype=torch.float64)
    if start.state is not None:
        state = start.state
        run.optimizer.load_state_dict(state["optimizer"])
        apply_schedule_changes(state["config"], run.recipe, run.optimizer)
        if run.recipe.se_lr is not None and run.groups is None:
            log.info("note: --se-lr has no effect on this run: it trains all its parameters as one group at --lr")
        start_epoch, epoch_step, run.best, run.metrics = (state["epoch"], state["epoch_step"], state["best_top1"],
                                                          state.get("metrics"))
        if run.env.is_main:  # rank 0 carries the interrupted epoch's partial sums; the all-reduce adds others' zeros
            totals = state["progress"].double()
        log.info("resumed %s at epoch %d, step %d", start.path, start_epoch, epoch_step)
        if start.path.resolve() == (run.out / "last.pt").resolve():
            run.saved = (start_epoch, epoch_step)
    run.position = (start_epoch, epoch_step)
    return start_epoch, epoch_step, totals


def _loaders(run: RunState, train_set: Any, val_set: Any, micro: int) -> tuple[DataLoader, DataLoader]:
    """The seeded training loader over this rank's draws, and this rank's exact shard of the val images."""
    recipe, env = run.recipe, run.env
    cuda = env.device.type == "cuda"
    loader = DataLoader(
        SeededDataset(train_set), batch_size=micro, sampler=SeededDraws(run.sampler), num_workers=recipe.workers,
        pin_memory=cuda, persistent_workers=recipe.workers > 0, drop_last=False,
    )
    val_indices, wanted = range(len(val_set)), recipe.val_samples
    if wanted and wanted < len(val_set):  # evenly spaced
        val_indices = sorted({round(i * (len(val_set) - 1) / max(wanted - 1, 1)) for i in range(wanted)})
    val_loader = DataLoader(
        Subset(val_set, val_indices[env.rank :: env.world_size]),  # exact shards, no padding
        batch_size=recipe.eval_batch_size or micro, num_workers=recipe.workers, pin_memory=cuda,
    )
    return loader, val_loader


def _open_run_folder(run: RunState, start: ResumePoint, tensorboard: bool, micro: int) -> MetricsWriter:
    """Rank 0: write ``config.json``, open ``metrics.jsonl`` (cut back to the resumed epoch) and log what will run."""
    recipe, out = run.recipe, run.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(recipe.to_dict(), indent=2) + "\n")
    writer = MetricsWriter(out, tensorboard=tensorboard, keep_until=start.state["epoch"] if start.state else None)
    if run.metrics:
        writer.write(run.metrics)  # the checkpoint's epoch, if its line was lost in a crash
    log.info(
        "training %s%s on %s: %d classes, %d epochs x %d steps of %d images (%d rank(s) x %d x %d accum), lr %g",
        "SE-" if recipe.se else "", recipe.arch, recipe.data, run.model_config["num_classes"], recipe.epochs,
        run.steps_per_epoch, recipe.batch_size, run.env.world_size, micro, recipe.accum_steps, recipe.lr,
    )
    return writer


def _run_epoch(run: RunState, loader: DataLoader, val_loader: DataLoader, epoch: int, epoch_step: int,
               totals: torch.Tensor, progress: bool, writer: MetricsWriter | None) -> None:
    """Train ``epoch`` from ``epoch_step`` on, evaluate, save ``last.pt`` (and ``best.pt``) and write its metrics."""
    recipe, env, raw = run.recipe, run.env, run.raw
    run.sampler.set_epoch(epoch)
    run.sampler.position = epoch_step * recipe.batch_size
    started = time.perf_counter()
    totals, images = _train_epoch(run, loader, epoch, epoch_step, totals, progress)
    train_seconds = time.perf_counter() - started
    broadcast_buffers(raw, env)
    val = _evaluate(raw, val_loader, env, recipe)
    crc = check_replicas_in_sync(raw, env)
    loss_sum, correct, seen = totals.tolist()
    run.metrics = {
        "epoch": epoch + 1, **_rates(run, epoch), "train_loss": loss_sum / seen, "train_top1": 100 * correct / seen,
        **val,
        "images_per_s": images / train_seconds, "seconds": time.perf_counter() - started,
        "world_size": env.world_size, "weights_crc32": crc,
    }
    is_best, run.best = val["val_top1"] > run.best, max(run.best, val["val_top1"])
    # best.pt first: once last.pt says the epoch is done, its best.pt is on disk
    run.save(("best.pt", "last.pt") if is_best else ("last.pt",), epoch + 1, 0, torch.zeros(3, dtype=torch.float64))
    if writer is not None:
        writer.write(run.metrics)
        log.info("epoch %d/%d: %s", epoch + 1, recipe.epochs, _format_metrics(run.metrics))


def _rates(run: RunState, epoch: int) -> dict[str, float]:
    """The metrics' learning rates at an epoch's first step: ``lr``, and ``se_lr`` when the new parameters have their
    own."""
    lrs = group_lrs(run.recipe)
    split = any(g.get("name") == "new" for g in run.optimizer.param_groups)
    rate = {k: lr_at(v, run.recipe, epoch, 0, run.steps_per_epoch) for k, v in lrs.items()}
    return {"lr": rate["pretrained"], **({"se_lr": rate["new"]} if split else {})}


def _evaluate_start(run: RunState, val_loader: DataLoader, writer: MetricsWriter | None) -> None:
    """A run from pretrained weights: evaluate them before any step, as ``metrics.jsonl``'s epoch-0 line."""
    val = _evaluate(run.raw, val_loader, run.env, run.recipe)
    row = {"epoch": 0, **val, "world_size": run.env.world_size}
    if writer is not None:
        writer.write(row)
        log.info("epoch 0 (the starting weights): val_loss %.4g, val_top1 %.4g, val_top5 %.4g", val["val_loss"],
                 val["val_top1"], val["val_top5"])


def _wrap(model: nn.Module, recipe: Recipe, env: Env) -> tuple[nn.Module, nn.Module]:
    """``(raw, model)``: what is saved and evaluated (on the device, SyncBN if asked) and what trains (compiled, in
    DDP).

    torch.compile wraps the module inside DDP, as torch recommends (DDP's hooks stay outside the compiled graphs,
    which DDP's graph splitting cuts at its gradient buckets); ``raw`` keeps its own forward, so its state_dict keys
    carry no wrapper prefix and evaluation runs eagerly (no recompile for eval mode or a smaller last batch).
    Weights are loaded into ``raw`` before this, and compilation happens at the first training step.
    """
    model.to(env.device)
    if recipe.channels_last:
        model.to(memory_format=torch.channels_last)
    if recipe.sync_bn and env.world_size > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    raw = model  # no DDP / compile wrappers in the state_dict keys
    if recipe.compile:
        model = torch.compile(model)
    if env.world_size > 1:
        model = DistributedDataParallel(model, device_ids=[env.device] if env.device.type == "cuda" else None)
    return raw, model


def _train_epoch(run: RunState, loader: DataLoader, epoch: int, epoch_step: int, totals: torch.Tensor,
                 progress: bool) -> tuple[torch.Tensor, int]:
    """One epoch from ``epoch_step`` on; returns the epoch's global ``[loss_sum, correct, seen]`` and images here.

    Raises:
        TrainError: the loss of some rank became NaN or inf: every rank raises the same error at the same step, before
            the optimizer step, so no rank is left waiting for the others and ``last.pt`` stays the last good one.
    """
    recipe, env, model, optimizer = run.recipe, run.env, run.model, run.optimizer
    steps, accum = run.steps_per_epoch, recipe.accum_steps
    model.train()
    if recipe.freeze_backbone:
        freeze_norms(run.raw)
    local = torch.zeros(3, dtype=torch.float64)
    bar = tqdm(total=steps, initial=epoch_step, desc=f"epoch {epoch + 1}/{recipe.epochs}", unit="step",
               disable=not (progress and env.is_main), dynamic_ncols=True, leave=False)
    started, images, step, micro_index = time.perf_counter(), 0, epoch_step, 0
    run.position = (epoch, step)
    for batch, target in _plain_errors(loader):
        batch, target = _to_device(batch, target, env, recipe)
        _seed_micro_step(run, epoch, step, micro_index)
        last_micro = micro_index == accum - 1
        with contextlib.nullcontext() if last_micro or env.world_size == 1 else model.no_sync():
            with torch.autocast(env.device.type, dtype=torch.bfloat16, enabled=recipe.amp):
                logits = model(batch)
            loss = nn.functional.cross_entropy(logits.float(), target)
            (loss / accum).backward()
        value, correct = _check_loss(run, loss, logits, target, bar, epoch, step)
        local += torch.tensor([value * len(target), correct, len(target)], dtype=torch.float64)
        images += len(target) * env.world_size
        micro_index += 1
        if not last_micro:
            continue
        set_lrs(optimizer, recipe, epoch, step, steps)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step, micro_index = step + 1, 0
        run.position = (epoch, step)
        bar.update()
        if bar.n % 5 == 0 or step == steps:
            rate = images / (time.perf_counter() - started)
            bar.set_postfix(loss=f"{local[0] / local[2]:.3f}", top1=f"{100 * local[1] / local[2]:.1f}",
                            img_s=f"{rate:.0f}", refresh=False)
        if recipe.ckpt_every and step % recipe.ckpt_every == 0 and step < steps:
            run.save(("last.pt",), epoch, step, totals + all_sum(local.clone(), env))
    bar.close()
    return totals + all_sum(local, env), images


def _to_device(images: torch.Tensor, target: torch.Tensor, env: Env,
               recipe: Recipe) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch on this rank's device, in the model's memory format."""
    images = images.to(env.device, non_blocking=True)
    target = target.to(env.device, non_blocking=True)
    if recipe.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, target


def _seed_micro_step(run: RunState, epoch: int, step: int, micro_index: int) -> None:
    """Reseed the global RNG (dropout & co.) from ``(seed, epoch, step, micro-batch, rank)``."""
    step_seed = seed_of(run.recipe.seed, epoch, step, micro_index, run.env.rank)
    if run.env.device.type == "cuda":
        torch.manual_seed(step_seed)
    else:  # the CPU generator alone: see SeededDataset (no CUDA seed queued with a stack trace per call)
        torch.default_generator.manual_seed(step_seed)


def _check_loss(run: RunState, loss: torch.Tensor, logits: torch.Tensor, target: torch.Tensor, bar: tqdm,
                epoch: int, step: int) -> tuple[float, float]:
    """This rank's ``(loss, correct)`` of a micro-batch, once every rank's loss is known to be finite.

    One host sync per step: every rank's loss (for the NaN check all ranks agree on) and correct count together;
    one small all-reduce under DDP, none on a single process.

    Raises:
        TrainError: some rank's loss is NaN or inf (on every rank alike), naming the step and the last good checkpoint.
    """
    env = run.env
    rows = per_rank(torch.stack([loss.detach().double(), topk_correct(logits.detach(), target, (1,))[0]]), env)
    rows = rows.tolist()
    bad = [rank for rank, (value, _) in enumerate(rows) if not math.isfinite(value)]
    if bad:
        bar.close()
        where = f" on rank {', '.join(map(str, bad))}" if env.world_size > 1 else ""
        raise TrainError(
            f"the loss became {rows[bad[0]][0]}{where} at step {epoch * run.steps_per_epoch + step + 1} (epoch "
            f"{epoch + 1}); {'nothing saved since; ' if run.saved else ''}{run.last_good()}: lower --lr and "
            f"{_go_on(run.saved)}"
        )
    value, correct = rows[env.rank]
    return value, correct


@torch.no_grad()
def _evaluate(model: nn.Module, loader: DataLoader, env: Env, recipe: Recipe) -> dict[str, float]:
    """Loss, top-1 and top-5 over the whole validation set: each rank its own shard, then exact sums."""
    sums = torch.zeros(4, dtype=torch.float64)  # loss_sum, top1, top5, n
    with eval_mode(model):
        for images, target in _plain_errors(loader):
            images, target = _to_device(images, target, env, recipe)
            with torch.autocast(env.device.type, dtype=torch.bfloat16, enabled=recipe.amp):
                logits = model(images).float()
            loss = nn.functional.cross_entropy(logits, target, reduction="sum")
            sums += torch.cat([loss.double().cpu()[None], topk_correct(logits, target).cpu(),
                               torch.tensor([len(target)], dtype=torch.float64)])
    loss_sum, top1, top5, n = all_sum(sums, env).tolist()
    return {"val_loss": loss_sum / n, "val_top1": 100 * top1 / n, "val_top5": 100 * top5 / n}


def _plain_errors(loader: DataLoader):
    """Iterate ``loader``; an error of the package raised in a worker process comes out as its own one line."""
    try:
        yield from loader
    except SESurgeryError as error:
        raise unwrap_worker_error(error) from None


def _format_metrics(metrics: dict[str, Any]) -> str:
    keys = ("train_loss", "train_top1", "val_loss", "val_top1", "val_top5", "images_per_s", "seconds")
    return ", ".join(f"{k} {metrics[k]:.4g}" for k in keys)

