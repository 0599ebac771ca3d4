"""Parameters and multiply-adds of an SE model side by side with its base model (``python -m se_surgery.describe``).

Multiply-adds are counted two ways, both on one forward of a zero input of any rank (N x C x L, N x C x H x W,
N x C x D x H x W, ...):

- :func:`count_macs`: the multiply-adds of the convolutions and linear layers (and matrix products), as torch's
  flop counter finds them; an SE adds its two FC layers.
- :func:`count_paper_macs`: the SENet paper's count (its "GFLOPs"): the same, plus one pass of each SE block's
  squeeze, one add (or comparison, for a max squeeze) per element of the tensor u it pools, so C x S per image for a
  u of C channels and spatial size S (the product of its non-channel dims: H x W, L, D x H x W). The scaling u * s
  is not counted. This is what fits the paper's figures: SE-ResNet-50 3.86 -> 3.87 GFLOPs needs the pooling pass
  (the FC layers alone give 3.86), and SE-MobileNet 569 -> 572 MFLOPs (Table 3) excludes the scaling (counting it too
  gives 575).

An SE block is a module that :func:`~se_surgery.add_se` inserted (it carries add_se's ``_se_surgery`` metadata,
whatever its class: :class:`~.se_module.SELayer`, a ``se_layer=`` such as timm's ``SEModule`` or ``EcaModule``),
or a network's own block of a known SE class (torchvision's ``SqueezeExcitation``, timm's ``SEModule``,
``EffectiveSEModule``, ``SqueezeExcite``, ``EcaModule``, ``CecaModule``). A NoSqueeze block
(``squeeze="none"``) pools nothing and adds 0. Each call of a block counts once (a block called twice, twice).
"""

from __future__ import annotations

import contextlib
import logging
import re
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..errors import SESurgeryError, SurgeryError
from ..modes import eval_mode
from ..paper import ABLATIONS, COST_TABLES, RESNET50

__all__ = [
    "Summary", "summary", "count_parameters", "count_macs", "count_paper_macs", "count_costs", "squeeze_blocks",
    "NetworkCost", "network_cost", "paper_tables", "format_columns",
]

logger = logging.getLogger(__name__)

_SE_CLASSES = {  # a network's own SE blocks, known by (library, class name), so timm stays optional
    ("torchvision", "SqueezeExcitation"), ("timm", "SEModule"), ("timm", "EffectiveSEModule"),
    ("timm", "SqueezeExcite"), ("timm", "EcaModule"), ("timm", "CecaModule"),
}


def format_columns(rows: Sequence[Sequence[str]], left: int = 1, gap: int = 2) -> str:
    """``rows`` of cells as lines of columns as wide as their widest cell, ``gap`` spaces apart: the first ``left``
    columns aligned left, the others right. However wide a number, columns never run together."""
    widths = [max(len(row[i]) for row in rows if i < len(row)) for i in range(max(map(len, rows)))]
    lines = []
    for row in rows:
        cells = [cell.ljust(w) if i < left else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))]
        lines.append((" " * gap).join(cells).rstrip())
    return "\n".join(lines)


@dataclass(frozen=True)
class Summary:
    """Cost of the SE version next to its base: multiply-adds as torch's flop counter finds them (conv + linear,
    ``macs_*``) and the paper's way (plus one pass of each SE's squeeze, ``paper_macs_*``); see the module doc."""

    se_blocks: int
    params_base: int
    params_se: int
    macs_base: int
    macs_se: int
    paper_macs_base: int
    paper_macs_se: int

    @property
    def params_overhead(self) -> float:
        return self.params_se / self.params_base - 1

    @property
    def macs_overhead(self) -> float:
        return self.macs_se / self.macs_base - 1

    @property
    def paper_macs_overhead(self) -> float:
        return self.paper_macs_se / self.paper_macs_base - 1

    def __str__(self) -> str:
        rows = [
            ["", "base", "SE", "overhead"],
            ["parameters", f"{self.params_base:,}", f"{self.params_se:,}", f"{self.params_overhead:+.2%}"],
            ["multiply-adds", f"{self.macs_base:,}", f"{self.macs_se:,}", f"{self.macs_overhead:+.2%}"],
            ["paper's way", f"{self.paper_macs_base:,}", f"{self.paper_macs_se:,}",
             f"{self.paper_macs_overhead:+.2%}"],
        ]
        return (f"{format_columns(rows)}\n"
                f"({self.se_blocks} SE blocks; paper's way: multiply-adds + one pass of each SE's squeeze pooling)")


def count_parameters(model: nn.Module) -> int:
    """Parameters of ``model`` (every tensor once, shared ones counted once, as ``model.parameters()`` yields them)."""
    return sum(p.numel() for p in model.parameters())


def _is_known_se(module: nn.Module) -> bool:
    return any((cls.__module__.partition(".")[0], cls.__name__) in _SE_CLASSES for cls in type(module).__mro__)


def squeeze_blocks(model: nn.Module) -> dict[str, nn.Module]:
    """The SE blocks whose squeeze :func:`count_paper_macs` counts, by name: add_se's (they carry its
    ``_se_surgery`` metadata) and the network's own of a known SE class; a block inside another counts as part of it."""
    found: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if any(name.startswith(outer + ".") for outer in found if outer):
            continue
        if isinstance(module.__dict__.get("_se_surgery"), dict) or _is_known_se(module):
            found[name] = module
    return found


def _squeezed(module: nn.Module, args: tuple, kwargs: dict) -> int:
    """Elements of u that ``module``'s squeeze reads in this call (0 for NoSqueeze)."""
    if getattr(module, "squeeze", None) == "none":
        return 0
    u = args[0] if args else next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)
    return u.numel() if isinstance(u, torch.Tensor) else 0


def _check_size(input_size: Sequence[int]) -> tuple[int, ...]:
    size = tuple(input_size)
    if len(size) < 3 or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in size):
        raise SurgeryError(
            f"input_size {input_size!r} must be N x C x one or more spatial sizes, all positive integers: pass e.g. "
            "(1, 3, 224, 224) for images, (1, 1, 16000) for audio, (1, 3, 16, 112, 112) for video"
        )
    return size


def count_costs(model: nn.Module, input_size: Sequence[int] = (1, 3, 224, 224)) -> tuple[int, int]:
    """Both multiply-add counts of one forward on a zero input of ``input_size`` (any rank), in one pass:
    ``(count_macs, count_paper_macs)``; see the module doc for what each counts."""
    size = _check_size(input_size)
    ref = next(model.parameters(), None)
    x = torch.zeros(size, device=getattr(ref, "device", None), dtype=getattr(ref, "dtype", None))
    pooled = [0]

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        pooled[0] += _squeezed(module, args, kwargs)

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in squeeze_blocks(model).values()]
    try:
        with eval_mode(model), torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    macs = counter.get_total_flops() // 2  # torch counts 2 FLOPs per multiply-add
    return macs, macs + pooled[0]


def count_macs(model: nn.Module, input_size: Sequence[int] = (1, 3, 224, 224)) -> int:
    """Multiply-adds of one forward: convolutions and linear layers (half of torch's FLOP count, which counts 2 per
    multiply-add); ``input_size`` of any rank, batch first."""
    return count_costs(model, input_size)[0]


def count_paper_macs(model: nn.Module, input_size: Sequence[int] = (1, 3, 224, 224)) -> int:
    """Multiply-adds the SENet paper's way: :func:`count_macs` plus one pass of each SE block's squeeze pooling
    (C x S adds per image for a u of C channels and spatial size S); see the module doc."""
    return count_costs(model, input_size)[1]


def summary(model: nn.Module, input_size: Sequence[int] = (1, 3, 224, 224), **se_options: Any) -> Summary:
    """Parameters and multiply-adds (both counts) of ``model`` (an :func:`add_se` result) and of its base (all SE
    removed).

    Args:
        model: an :func:`add_se` result, or a plain model, which then gets ``add_se(model, **se_options)`` first.
        input_size: the input the multiply-adds are counted on, batch first, any rank: ``(1, 3, 224, 224)``,
            ``(1, 1, 16000)`` for a 1-D model, ``(1, 3, 16, 112, 112)`` for a video one.
        se_options: :func:`add_se`'s keywords (``reduction``, ``where``, ``position``, ``squeeze``, ...).
    """
    from .insert import add_se
    from .remove import remove_se, se_blocks

    size = _check_size(input_size)
    if se_options or not se_blocks(model):
        if se_blocks(model):
            raise SurgeryError(
                f"summary(..., {', '.join(se_options)}=...) needs the plain model; this one has SE blocks"
            )
        model = add_se(model, **se_options)
    base = remove_se(model)
    (macs_base, paper_base), (macs_se, paper_se) = count_costs(base, size), count_costs(model, size)
    return Summary(
        se_blocks=len(se_blocks(model)),
        params_base=count_parameters(base),
        params_se=count_parameters(model),
        macs_base=macs_base,
        macs_se=macs_se,
        paper_macs_base=paper_base,
        paper_macs_se=paper_se,
    )


@dataclass(frozen=True)
class NetworkCost:
    """One network and its SE version (r = 16 unless told), both counts; the SE fields are None where add_se
    refused the network, ``refusal`` then says why."""

    se_blocks: int | None
    params_base: int
    params_se: int | None
    macs_base: int
    macs_se: int | None
    paper_macs_base: int
    paper_macs_se: int | None
    refusal: str | None = None


def network_cost(
    make_base: Callable[[], nn.Module],
    input_size: Sequence[int] = (1, 3, 224, 224),
    *,
    meta: bool = True,
    **se_options: Any,
) -> NetworkCost:
    """Costs of ``make_base()`` and of ``add_se(make_base(), **se_options)`` at ``input_size`` (a Table 2-3 row).

    Args:
        make_base: builds the plain network at random init (``torchvision.models.resnet50``).
        input_size: where multiply-adds are counted, batch first.
        meta: build and count on the meta device (shapes only: no memory, no weight init, forwards take no time),
            which gives the same counts; a network or surgery that fails there for any reason other than a refusal
            is counted again on the CPU.
        se_options: :func:`add_se`'s keywords (``example_input`` included, on the CPU; it is moved to meta).

    A network add_se refuses (a :class:`~se_surgery.errors.SESurgeryError`) gets its base costs and the refusal's
    first clause instead of SE costs.
    """
    size = _check_size(input_size)
    if meta:
        try:
            cost = _network_cost(make_base, size, "meta", se_options)
        except Exception as err:  # an op meta tensors lack, a model that reads its weights' values, ...
            logger.info("network_cost: counting on the CPU, the meta device failed (%s)", err)
        else:
            if cost.refusal is None or "meta" not in cost.refusal:
                return cost
    return _network_cost(make_base, size, None, se_options)


def _network_cost(make_base: Callable[[], nn.Module], size: tuple[int, ...], device: str | None,
                  se_options: dict[str, Any]) -> NetworkCost:
    from .insert import add_se
    from .remove import se_blocks

    with torch.device(device) if device else contextlib.nullcontext():
        base = make_base()
    options = dict(se_options)
    if device and isinstance(options.get("example_input"), torch.Tensor):
        options["example_input"] = options["example_input"].to(device)
    macs_base, paper_base = count_costs(base, size)
    params_base = count_parameters(base)
    try:
        model = add_se(base, **options)
    except SESurgeryError as err:
        causes = [err, err.__cause__] if err.__cause__ is not None else [err]
        if device and any("meta" in str(e) for e in causes):
            raise
        return NetworkCost(None, params_base, None, macs_base, None, paper_base, None, _gist(err))
    macs_se, paper_se = count_costs(model, size)
    return NetworkCost(len(se_blocks(model)), params_base, count_parameters(model), macs_base, macs_se, paper_base,
                       paper_se)


def _gist(err: BaseException) -> str:
    """An error's first clause: ``"found no residual sum in VGG: no module adds ..."`` -> its part before ``": "``."""
    text = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return re.split(r": |\. ", text, maxsplit=1)[0].rstrip(".")


def paper_tables(
    make_base: Callable[[], nn.Module], input_size: Sequence[int] = (1, 3, 224, 224), *, meta: bool = True
) -> list[dict[str, Any]]:
    """Our cost of every variant in :data:`se_surgery.paper.COST_TABLES` beside the paper's (its
    :data:`~se_surgery.paper.ABLATIONS`), one dict per row.

    Args:
        make_base: builds the plain network (``torchvision.models.resnet50``); called once.
        input_size: where multiply-adds are counted (only for rows whose table gives GFLOPs).
        meta: build and count on the meta device, as :func:`network_cost` (same counts, no weight init, no compute);
            the CPU where that fails.
    """
    size = _check_size(input_size)
    if meta:
        try:
            return _paper_tables(make_base, size, "meta")
        except Exception as err:  # an op meta tensors lack, a model that reads its weights' values, ...
            logger.info("paper_tables: counting on the CPU, the meta device failed (%s)", err)
    return _paper_tables(make_base, size, None)


def _paper_tables(make_base: Callable[[], nn.Module], size: tuple[int, ...], device: str | None) -> list[dict]:
    from .insert import add_se

    with torch.device(device) if device else contextlib.nullcontext():
        base = make_base()
    rows = []
    for key, variants in COST_TABLES.items():
        for label, options in variants.items():
            paper = RESNET50 if options is None else ABLATIONS[key].rows[label]
            model = base if options is None else add_se(base, **options)
            macs, paper_macs = count_costs(model, size) if paper.gflops is not None else (None, None)
            rows.append({
                "table": ABLATIONS[key].title, "variant": label, "options": options,
                "params": count_parameters(model), "paper params (M)": paper.params_m,
                "macs": macs, "paper's way": paper_macs, "paper GFLOPs": paper.gflops,
            })
    return rows
