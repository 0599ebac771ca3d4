"""Forward hooks on SE gates and the streaming capture of their excitations.

The gate of an SE block is the module whose output is the excitation ``s`` (``sigma`` in the paper's eq. 3, in
[0, 1] for a sigmoid). It is found by the SE module's type or name, so the model never learns it is watched:

- torchvision's ``SqueezeExcitation`` (EfficientNet, MobileNetV3, RegNetY, and every variant :func:`se_surgery.add_se`
  makes, at ``<owner>.se`` / ``se_1``): its ``scale_activation``;
- timm's ``SEModule``, ``EffectiveSEModule``, ``SqueezeExcite`` (EfficientNet / MobileNetV3 blocks): their ``gate``;
- timm's legacy SENet ``SEModule`` (``legacy_seresnet50``, the paper's own model): its ``sigmoid``;
- any other module named ``se`` / ``se_<k>`` / ``se_module`` with one of those children.

A gate whose output keeps its spatial map (``N x C x H x W``, ``add_se(squeeze="none")``) is averaged over space per
channel. A gate that is not a sigmoid (``excitation="tanh"`` / ``"relu"``) is marked unbounded: its values are not in
[0, 1], so saturation is not measured for it.

The hooks live in :class:`GateRecorder`, a context manager that always removes them, even when the forward raises.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from analysis.collected import ExcitationStats, resolve_classes, select_blocks
from analysis.errors import AnalysisError
from analysis.moments import ClassMoments, LabelBatch, work_dtype
from se_surgery.modes import eval_mode
from se_surgery.surgery import paper_names
from se_surgery.surgery.layer_types import LayerKind, is_layer
from se_surgery.surgery.naming import SE_LEAF, is_resnet_block, paper_names_for

__all__ = [
    "GateRecorder", "SEGates", "capture_excitations", "find_gates", "is_known_se", "model_paper_names",
    "record_excitations", "unbounded_gates",
]

logger = logging.getLogger(__name__)

_GATE_CHILDREN = ("scale_activation", "gate", "sigmoid")  # torchvision and add_se, timm, timm's legacy SENet
_SE_LEAVES = {"se_module"}  # timm's legacy SENet; add_se's se / se_<k> are matched by SE_LEAF


def is_known_se(module: nn.Module) -> bool:
    """Whether ``module`` is one of torchvision's or timm's SE modules (add_se's too), each returning its input * s."""
    return is_layer(module, LayerKind.SE_MODULE)


def find_gates(model: nn.Module) -> dict[str, str]:
    """SE module name -> name of its gate module (whose output is s), in registration order.

    Examples:
        >>> find_gates(se_resnet18)["layer1.0.se"]
        'layer1.0.se.scale_activation'
    """
    gates = {}
    for name, module in model.named_modules():
        leaf = name.rpartition(".")[2]
        named_se = bool(name) and (SE_LEAF.fullmatch(leaf) is not None or leaf in _SE_LEAVES)
        if not (is_known_se(module) or named_se):
            continue
        child = next((c for c in _GATE_CHILDREN if isinstance(getattr(module, c, None), nn.Module)), None)
        if child is not None:
            gates[name] = f"{name}.{child}" if name else child
    return gates


def unbounded_gates(model: nn.Module, gates: dict[str, str]) -> set[str]:
    """The SE blocks whose gate is not a sigmoid (hard or not), so whose s is not confined to [0, 1]."""
    return {b for b, g in gates.items() if "sigmoid" not in type(model.get_submodule(g)).__name__.lower()}


def model_paper_names(model: nn.Module, gates: dict[str, str] | None = None) -> dict[str, str]:
    """SE module name -> the paper's ``SE_<stage>_<block>`` name; empty where the model has none.

    SE blocks inserted by :func:`se_surgery.add_se` carry their name. Other SE networks get one when each SE block has
    its own owner named as a ResNet's (``layer<k>.<i>``: timm's ``seresnet50`` and ``legacy_seresnet50``); the rest
    (EfficientNet, MobileNetV3, RegNetY) keep their module names.
    """
    names = paper_names(model)
    if names:
        return dict(names)
    owners = {block: block.rpartition(".")[0] for block in (find_gates(model) if gates is None else gates)}
    if not owners or not all(is_resnet_block(o) for o in owners.values()) or len(set(owners.values())) < len(owners):
        return {}
    by_owner = paper_names_for(owners.values())
    return {block: by_owner[owner] for block, owner in owners.items()}


@dataclass(frozen=True)
class SEGates:
    """A model's SE blocks, found once: each one's gate module and, where it has one, its paper name.

    Attributes:
        gates: SE module name -> name of its gate module (whose output is s), in registration order.
        paper_names: SE module name -> ``SE_<stage>_<block>``, for the blocks that have one.
    """

    gates: dict[str, str]
    paper_names: dict[str, str]

    @classmethod
    def find(cls, model: nn.Module) -> SEGates:
        """The SE blocks of ``model`` (:func:`find_gates`) with their paper names (:func:`model_paper_names`)."""
        gates = find_gates(model)
        return cls(gates, model_paper_names(model, gates))

    @property
    def blocks(self) -> list[str]:
        """SE module names in registration order."""
        return list(self.gates)

    def select(self, names: Iterable[str] | None) -> list[str]:
        """SE module names of ``names`` (module or paper names; ``None`` = every block), as :func:`select_blocks`."""
        return select_blocks(self.gates, self.paper_names, names)

    def only(self, blocks: Iterable[str]) -> SEGates:
        """The same, restricted to ``blocks`` (SE module names of this model), in their order."""
        blocks = list(blocks)
        return SEGates({b: self.gates[b] for b in blocks}, {b: self.paper_names[b] for b in blocks
                                                            if b in self.paper_names})


def dataset_classes(loader: Iterable) -> list[str] | None:
    """The class names of the loader's dataset (looking through ``Subset`` wrappers), or ``None``."""
    dataset = getattr(loader, "dataset", None)
    while dataset is not None and not hasattr(dataset, "classes"):
        dataset = getattr(dataset, "dataset", None)
    return [str(c) for c in dataset.classes] if dataset is not None else None


# Gate values held back before they are folded in, over all blocks (32 MiB in float32), and images held back (the
# bound on a batch's one-hot label matrix).
_FLUSH_ELEMENTS = 1 << 23
_FLUSH_IMAGES = 4096


class GateRecorder:
    """Context manager: forward hooks that stream each gate's output into per-class moments.

    Set :attr:`labels` to the classes of the batch before each forward. Gate outputs of shape ``(N, C, 1, 1)`` or
    ``(N, C)`` are used as they are; a gate with a spatial map is averaged over space.

    Args:
        model: The model to watch; it is not modified.
        gates: SE module name -> gate module name.
        num_classes: Class rows to allocate (grows as labels need).
        bins: Histogram bins over [0, 1].
        device: Where the accumulators live.
    """

    def __init__(
        self, model: nn.Module, gates: dict[str, str], num_classes: int, *, bins: int = 20,
        device: torch.device | str = "cpu",
    ) -> None:
        self.model, self.gates, self.num_classes, self.bins, self.device = model, gates, num_classes, bins, device
        self.labels: torch.Tensor | None = None
        self.moments: dict[str, ClassMoments] = {}  # filled in forward order, the first time each gate fires
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        # Gate outputs wait here and are folded in a few batches at a time, every block at once: one update per
        # batch and block would cost more small-tensor ops than the gates themselves, and blocks that saw the same
        # images share their labels' one-hot matrix. Bounded by _FLUSH_ELEMENTS and _FLUSH_IMAGES, not by the
        # image count.
        self._pending: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self._held = 0  # gate values waiting, all blocks
        self._images: dict[str, int] = {}  # images waiting, per block

    def __enter__(self) -> GateRecorder:
        try:
            for block, gate in self.gates.items():
                module = self.model.get_submodule(gate)
                self._handles.append(module.register_forward_hook(self._hook(block)))
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()
        self._flush()

    def _flush(self) -> None:
        """Fold every block's waiting gate outputs in; blocks that saw the same batches share one LabelBatch."""
        prepared: dict[tuple, LabelBatch] = {}
        for block, pending in self._pending.items():
            gate = pending[0][0] if len(pending) == 1 else torch.cat([v for v, _ in pending])
            values = gate.flatten(1)  # N x C
            if block not in self.moments:
                self.moments[block] = ClassMoments(self.num_classes, values.shape[1], bins=self.bins,
                                                   device=self.device)
            dtype = work_dtype(values.dtype)
            key = (dtype, *(id(y) for _, y in pending))  # the label tensors are alive (held here): ids are unique
            if key not in prepared:
                labels = pending[0][1] if len(pending) == 1 else torch.cat([y for _, y in pending])
                prepared[key] = LabelBatch(labels, self.bins, dtype, self.device)
            self.moments[block].fold(values, prepared[key])
        self._pending.clear()
        self._images.clear()
        self._held = 0

    def remove(self) -> None:
        """Remove every hook (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, block: str):
        def hook(module: nn.Module, args: Any, output: torch.Tensor) -> None:
            if self.labels is None:
                return
            # N x C x 1 x 1 waits as the gate gave it (flattened once per flush); a spatial map is averaged now.
            s = output.detach() if output.shape[2:].numel() == 1 else output.detach().flatten(2).mean(2)
            self._pending.setdefault(block, []).append((s, self.labels))
            self._held += s.numel()
            self._images[block] = images = self._images.get(block, 0) + len(self.labels)
            if self._held >= _FLUSH_ELEMENTS or images >= _FLUSH_IMAGES:
                self._flush()

        return hook


class _Quota:
    """Which images of each batch are still wanted: of a selected class, and under the per-class quota (the first
    ones the loader yields). Counted with tensor operations: no Python loop over a batch's labels."""

    def __init__(self, selected: Iterable[int] | None, per_class: int | None, wanted: Iterable[int] | None) -> None:
        self.selected = torch.tensor(sorted(selected), dtype=torch.long) if selected is not None else None
        self.wanted = torch.tensor(sorted(wanted), dtype=torch.long) if wanted is not None else None
        self.per_class = per_class
        self.seen = torch.zeros(0, dtype=torch.long)  # images taken so far, per class

    def keep(self, labels: torch.Tensor) -> torch.Tensor | None:
        """Mask of the batch's images to capture (on the labels' device); ``None`` when every image is."""
        if (self.selected is None and self.per_class is None) or not len(labels):
            return None
        labels = labels.long()
        mask = (torch.isin(labels, self.selected.to(labels.device)) if self.selected is not None
                else torch.ones_like(labels, dtype=torch.bool))
        if self.per_class is not None:
            k = max(int(labels.max()) + 1, len(self.seen))
            if k > len(self.seen) or self.seen.device != labels.device:
                self.seen = torch.cat([self.seen.to(labels.device),
                                       self.seen.new_zeros(k - len(self.seen), device=labels.device)])
            taken = F.one_hot(labels, k) * mask.unsqueeze(1)
            before = taken.cumsum(0).gather(1, labels.unsqueeze(1)).squeeze(1) - 1  # earlier images of its class
            mask &= self.seen[labels] + before < self.per_class
            self.seen += torch.bincount(labels[mask], minlength=k)
        return mask

    def done(self) -> bool:
        """Whether every wanted class has its quota (never, without a quota or a known class list)."""
        if self.per_class is None or self.wanted is None or not len(self.wanted):
            return False
        if int(self.wanted.max()) >= len(self.seen):
            return False
        return bool((self.seen[self.wanted.to(self.seen.device)] >= self.per_class).all())


def capture_excitations(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    blocks: Iterable[str] | None = None,
    classes: Sequence[int | str] | None = None,
    per_class: int | None = None,
    bins: int = 20,
    progress: bool = False,
) -> ExcitationStats:
    """Run ``model`` over ``loader`` and stream per-class statistics of every SE gate's output.

    Memory does not grow with the number of images: only per-class sums are kept (float64, Chan's update). The model
    runs in eval mode under ``torch.no_grad`` on the device of its parameters; each module's train/eval flag is
    restored afterwards and the hooks are always removed. Under ``torch.distributed`` the statistics of all ranks are
    pooled (``per_class`` then applies to each rank's shard).

    Args:
        model: A model holding SE blocks (from :func:`se_surgery.add_se`, timm, or torchvision).
        loader: Yields ``(images, labels)``.
        blocks: SE module names or paper names (``"SE_5_2"``); ``None`` = every SE block.
        classes: Class indices or names to capture; ``None`` = all.
        per_class: At most this many images per class (the first ones the loader yields); ``None`` = all.
        bins: Histogram bins over [0, 1].
        progress: Show a tqdm bar.

    Returns:
        The statistics, blocks in forward order.

    Raises:
        AnalysisError: the model has no SE gate; an unknown block or class; no image was captured.

    Examples:
        >>> stats = capture_excitations(model, val_loader, classes=["0", "7"], per_class=50)
        >>> stats.mean("SE_5_2", "7")[:5]
    """
    found = SEGates.find(model)
    if not found.gates:
        raise AnalysisError(
            "the model has no SE block (no SqueezeExcitation, timm SEModule / EffectiveSEModule / SqueezeExcite, or "
            "'*.se' module with a gate): "
            "add them with se_surgery.add_se and train it first"
        )
    chosen = found.select(blocks)
    names = dataset_classes(loader)
    return record_excitations(model, loader, found.only(chosen), class_names=names,
                              classes=resolve_classes(classes, names), per_class=per_class, bins=bins,
                              progress=progress)


def record_excitations(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    found: SEGates,
    *,
    class_names: Sequence[str] | None,
    classes: Sequence[int] | None = None,
    per_class: int | None = None,
    bins: int = 20,
    progress: bool = False,
) -> ExcitationStats:
    """:func:`capture_excitations` once its inputs are resolved: nothing is looked up again.

    Args:
        model: The model ``found`` was found in.
        loader: Yields ``(images, labels)``.
        found: The SE blocks to watch (:meth:`SEGates.only` of the chosen ones).
        class_names: The dataset's class names (index order), or ``None`` (then classes are named by index).
        classes: Class indices to capture; ``None`` = all.
        per_class, bins, progress: As for :func:`capture_excitations`.
    """
    device = next(model.parameters()).device
    names = list(class_names) if class_names is not None else None
    num_classes = len(names) if names else max(classes or [0]) + 1
    selected = set(classes) if classes is not None else None
    wanted = selected if selected is not None else (set(range(len(names))) if names else None)
    quota = _Quota(selected, per_class, wanted)
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    bar = tqdm(loader, desc="excitations", unit="batch", disable=not progress or rank != 0, leave=False)
    with eval_mode(model), torch.no_grad(), GateRecorder(
        model, found.gates, num_classes, bins=bins, device=device
    ) as recorder:
        for images, labels in bar:
            keep = quota.keep(labels)
            if keep is not None and not keep.all():
                images, labels = images[keep.to(images.device)], labels[keep]
            if len(labels):
                recorder.labels = labels.to(device)
                model(images.to(device, non_blocking=True))
            if quota.done():
                break
    bar.close()
    if not recorder.moments:
        raise AnalysisError("no image was captured: check that the loader yields images of the chosen classes")
    moments = recorder.moments
    names = names or [str(k) for k in range(max(m.num_classes for m in moments.values()))]
    unbounded = unbounded_gates(model, {b: found.gates[b] for b in moments})
    paper = {b: found.paper_names[b] for b in moments if b in found.paper_names}
    stats = ExcitationStats(moments, names, paper, unbounded).all_reduce()
    for m in moments.values():
        m.to("cpu")
    logger.info("captured %d SE blocks over %d images", len(moments), stats.count(stats.blocks[0]))
    return stats
