"""The SENet paper's training recipe as one dataclass, and a scaled-down version for the embedded digits.

Numbers cite Hu et al., "Squeeze-and-Excitation Networks" (TPAMI 2019), Sec. 6 (ImageNet implementation details)
and Shen et al., "Relay Backpropagation" (ECCV 2016) for the class-aware sampling. Every field is a flag of
``python -m se_surgery.train`` (its ``help`` metadata is the flag's help), and the resolved recipe is saved as the
run folder's ``config.json`` and in every checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import SurgeryError, TrainError
from ..surgery import SEConfig
from .data import DIGITS, default_mean

__all__ = ["Recipe", "RECIPES", "RECIPE_NAMES", "SCHEDULES", "FINETUNE", "SE_FIELDS", "get_recipe", "flag_of",
           "given_flags", "recipe_from_flags"]

log = logging.getLogger(__name__)

SE_FIELDS = {"reduction": "reduction", "se_init": "init", "position": "position", "squeeze": "squeeze",
             "excitation": "excitation", "se_bias": "bias", "divisor": "divisor"}
"""Recipe field -> the :class:`~se_surgery.SEConfig` option it sets (the recipe's names are its flags')."""
_SE_DEFAULTS, _SE_CHOICES = SEConfig.defaults(), SEConfig.choices()
SCHEDULES = ("step", "cosine")
"""The learning-rate schedules (see :mod:`se_surgery.train.schedule`)."""


def _flag(default: Any, help: str, **kw: Any) -> Any:
    """A recipe field and its flag: ``help`` and the other ``kw`` go to ``add_argument`` (``flag=`` names the flag)."""
    factory = {"default_factory": lambda: type(default)(default)} if isinstance(default, (dict, list)) else {}
    return field(**(factory or {"default": default}), metadata={"help": help, **kw})


@dataclass
class Recipe:
    """Everything a training run needs; the defaults are the paper's ImageNet recipe (``--recipe paper``)."""

    # --- what to train -----------------------------------------------------------------------------------------
    data: str = _flag(DIGITS, "'digits' (embedded, no download) or a folder with train/<class>/* and val/<class>/*")
    arch: str = _flag("resnet50", "torchvision.models.get_model name, or timm:<name> (SE-ResNet-50 is the paper's "
                      "model)")
    arch_kwargs: dict = _flag({}, "extra keyword arguments for the architecture, as a JSON object (a recipe's own are "
                              "dropped, with a note, for an --arch that does not take them)", metavar="JSON")
    se: bool = _flag(True, "add SE blocks with se_surgery.add_se (--no-se trains the plain baseline)")
    reduction: int = _flag(_SE_DEFAULTS["reduction"], "SE reduction ratio r; the paper's default, ablated over 2..32 "
                           "(Table 10)")
    se_init: str = _flag(_SE_DEFAULTS["init"], "SE weight init: he (the paper's, from scratch) or identity (gates "
                         "start at 1)", choices=_SE_CHOICES["init"])
    gate_start: float = _flag(1.0, "with --se-init identity on pretrained weights: every gate fed by a BatchNorm "
                              "starts at s = S and that BatchNorm is divided by S, so the outputs still start "
                              "unchanged but the gates can learn (at s = 1 the sigmoid's slope is 5e-5: they hardly "
                              "move); 1: no rescaling", metavar="S")
    position: str = _flag(_SE_DEFAULTS["position"], "where the SE sits in each residual block: standard (on the "
                          "branch, Fig. 5b), pre, post, identity (Table 14) or 3x3 (after the branch's spatial conv, "
                          "Table 15)", choices=_SE_CHOICES["position"])
    squeeze: str = _flag(_SE_DEFAULTS["squeeze"], "squeeze: avg (global average pooling), max (Table 11) or none "
                         "(NoSqueeze, Table 16)", choices=_SE_CHOICES["squeeze"])
    excitation: str = _flag(_SE_DEFAULTS["excitation"], "excitation gate: sigmoid, tanh or relu (Table 12)",
                            choices=_SE_CHOICES["excitation"])
    se_bias: bool = _flag(_SE_DEFAULTS["bias"], "biases in the SE's two FC layers (the released models); the "
                          "paper's ablation runs (Tables 10-16) use none: --no-bias", flag="--bias")
    divisor: int | None = _flag(_SE_DEFAULTS["divisor"], "round each SE's hidden width C / r to a multiple of this "
                                "(timm's SE-ResNets: 8, so that an SE-ResNet-18/34's weights load into timm's "
                                "seresnet18/34); default: no rounding", metavar="N")
    where: list | None = _flag(None, "SE only in these blocks: paper stages (--where 4, Table 13), owner prefixes "
                               "(layer3) or paper names (SE_5_2); default: every residual block", nargs="+", type=str,
                               metavar="STAGE|BLOCK")
    pretrained: bool = _flag(False, "start from torchvision's/timm's pretrained weights (downloads them)")
    weights: str | None = _flag(None, "start from this weights file: a state_dict (torch.save), .safetensors, a timm "
                                "train.py or torchvision-reference checkpoint, or one of ours; plain weights load "
                                "before add_se, SE weights after (read from the keys); a classifier of another class "
                                "count is replaced by a new head", metavar="FILE")
    ema: bool = _flag(False, "with --weights: take the file's EMA weights (timm's state_dict_ema, torchvision's "
                      "model_ema)")
    new_head: bool = _flag(False, "with --weights: a new, randomly initialised classifier even when the file's fits "
                           "(other classes of the same number); one of another class count is replaced anyway")
    freeze_backbone: bool = _flag(False, "train only the SE blocks and the classifier; the rest, BatchNorm statistics "
                                  "included, stays as loaded (needs --weights or --pretrained)")
    # --- optimisation: "synchronous SGD with momentum 0.9 and a minibatch size of 1024" ---------------------------
    epochs: int = _flag(100, "epochs; the paper trains 100 from scratch")
    batch_size: int = _flag(1024, "global batch over all ranks and accumulation steps (paper: 1024)")
    lr: float | None = _flag(None, "initial learning rate; default 0.6 x batch_size / 1024 (paper: 0.6 at 1024)")
    momentum: float = _flag(0.9, "SGD momentum (paper: 0.9)")
    weight_decay: float = _flag(1e-4, "L2 weight decay (1e-4, the ResNet value the SENet recipe keeps)")
    se_lr: float | None = _flag(None, "learning rate of the new parameters: the SE blocks and a new head (default: "
                                "--lr); fine-tuning gives them the from-scratch rate and the pretrained ones a tenth",
                                metavar="LR")
    schedule: str = _flag("step", "learning-rate schedule: step (the paper's: x lr_gamma every lr_step epochs) or "
                          "cosine (to 0 at the end, set at every optimizer step)", choices=SCHEDULES)
    warmup_epochs: float = _flag(0.0, "linear warmup over this many epochs, set at every optimizer step (the first "
                                 "step runs at lr / warmup steps); 0: none", metavar="EPOCHS")
    lr_step: int = _flag(30, "divide the learning rate by 1/lr_gamma every lr_step epochs (paper: 10x every 30)")
    lr_gamma: float = _flag(0.1, "learning-rate factor at each step")
    accum_steps: int = _flag(1, "gradient accumulation steps, so a 1024 batch fits on fewer GPUs")
    # --- data: "random-size cropping to 224x224 pixels and random horizontal flipping", "mean-channel subtraction"
    input_size: int = _flag(224, "training and evaluation crop (paper 224; 299 for the Inception-style setting)",
                            flag="--crop")
    resize: int = _flag(256, "evaluation: resize the shorter side to this, then centre-crop (paper 256; 352 with 299)")
    min_scale: float = _flag(0.08, "smallest random-size crop area fraction (0.08: Inception's random-size crop)")
    flip: bool = _flag(True, "random horizontal flips during training")
    mean: list | None = _flag(None, "per-channel mean in [0,1] to subtract (no std division); default: ImageNet's, "
                              "or the digits' own", nargs=3, type=float, metavar=("R", "G", "B"))
    std: list | None = _flag(None, "per-channel std in [0,1] to divide by after the mean; default: none (the "
                             "paper's mean subtraction); torchvision's and timm's weights were trained with "
                             "0.229 0.224 0.225", nargs=3, type=float, metavar=("R", "G", "B"))
    classes: list | None = _flag(None, "train and evaluate on these class folders only (e.g. --classes 5 6 7 8 9), "
                                 "numbered in the folder's order; default: all", nargs="+", type=str, metavar="CLASS")
    class_aware: bool = _flag(True, "class-aware sampling (Relay Backpropagation), the paper's 'balanced data "
                              "strategy'")
    num_samples: int | None = _flag(None, "training images per epoch (all ranks); default: the training set's size")
    val_samples: int | None = _flag(None, "evaluate on this many evenly spaced val images (quick checks); default: all")
    # --- machinery ---------------------------------------------------------------------------------------------
    seed: int = _flag(0, "seed for initialisation, sampling and augmentation: the same seed gives the same numbers")
    workers: int = _flag(8, "DataLoader worker processes per rank")
    eval_batch_size: int | None = _flag(None, "evaluation batch per rank; default: the training batch per rank")
    ckpt_every: int = _flag(0, "also write last.pt every N optimizer steps (0: only at the end of each epoch)")
    amp: bool = _flag(False, "bf16 autocast for training and evaluation (on GPUs and on the CPU)")
    channels_last: bool = _flag(False, "channels-last memory format for the model and its inputs (GPUs and CPU)")
    compile: bool = _flag(False, "torch.compile (inductor) the training forward and backward (GPUs and CPU; the first "
                          "steps then take a while)")
    sync_bn: bool = _flag(False, "synchronised BatchNorm across GPUs under DDP (needs CUDA and 2+ ranks; else ignored, "
                          "with a note)")

    def resolved(self) -> Recipe:
        """A copy with the derived defaults filled in (lr from the batch, mean from the data), checked."""
        lr = 0.6 * self.batch_size / 1024 if self.lr is None else self.lr
        mean = [float(m) for m in (default_mean(self.data) if self.mean is None else self.mean)]
        out = dataclasses.replace(self, lr=lr, mean=mean)
        out.check()
        return out

    def check(self) -> None:
        """Raise :class:`TrainError` for values that cannot work, one line naming the flag, the value and a fix."""
        for name in ("epochs", "batch_size", "accum_steps", "input_size", "resize", "lr_step", "reduction"):
            _at_least(self, name, 1)
        for name in ("num_samples", "val_samples", "eval_batch_size"):  # None: the default
            if getattr(self, name) is not None:
                _at_least(self, name, 1)
        _at_least(self, "workers", 0)
        _at_least(self, "ckpt_every", 0)
        if self.batch_size % self.accum_steps:
            raise TrainError(
                f"--batch-size {self.batch_size} does not split into --accum-steps {self.accum_steps} equal "
                f"micro-batches: pass a --batch-size divisible by {self.accum_steps}"
            )
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise TrainError(f"--lr {self.lr} must be a positive finite number: pass e.g. --lr 0.1")
        if self.se_lr is not None and not (math.isfinite(self.se_lr) and self.se_lr > 0):
            raise TrainError(f"--se-lr {self.se_lr} must be a positive finite number: pass e.g. --se-lr 0.1")
        if not (math.isfinite(self.warmup_epochs) and self.warmup_epochs >= 0):
            raise TrainError(f"--warmup-epochs {self.warmup_epochs} must be a finite number >= 0: pass e.g. "
                             "--warmup-epochs 1 (0: none)")
        if not 0 < self.gate_start <= 1:  # nan fails too
            raise TrainError(f"--gate-start {self.gate_start} must be in (0, 1]: pass e.g. --gate-start 0.5 (1: gates "
                             "start open, unscaled)")
        if self.schedule not in SCHEDULES:
            raise TrainError(f"schedule={self.schedule!r}: use one of {', '.join(SCHEDULES)}")
        self._check_start()
        if not 0 <= self.momentum < 1:  # nan fails too
            raise TrainError(f"--momentum {self.momentum} must be in [0, 1): pass e.g. --momentum 0.9 (0: plain SGD)")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise TrainError(f"--weight-decay {self.weight_decay} must be a finite number >= 0: pass e.g. "
                             "--weight-decay 1e-4 (0: none)")
        if not 0 < self.lr_gamma <= 1:
            raise TrainError(f"--lr-gamma {self.lr_gamma} must be in (0, 1]: pass e.g. --lr-gamma 0.1 "
                             "(1: a constant learning rate)")
        if not 0 < self.min_scale <= 1:
            raise TrainError(f"--min-scale {self.min_scale} must be in (0, 1]: pass e.g. --min-scale 0.08")
        if not 0 <= self.seed < 2**63:
            raise TrainError(f"--seed {self.seed} must be in [0, 2**63): pass e.g. --seed 0")
        if self.mean is not None:
            if len(self.mean) != 3:
                raise TrainError(f"mean={self.mean} needs three values (R G B, in [0, 1])")
            if not all(0 <= m <= 1 for m in self.mean):
                raise TrainError(f"--mean {' '.join(map(str, self.mean))}: the mean is in [0, 1] pixel units "
                                 "(not 0..255): pass e.g. --mean 0.485 0.456 0.406")
        if self.std is not None:
            if len(self.std) != 3 or not all(0 < v <= 1 for v in self.std):
                raise TrainError(f"--std {' '.join(map(str, self.std))}: three values in (0, 1] pixel units (not "
                                 "0..255): pass e.g. --std 0.229 0.224 0.225")
        if self.classes is not None and (not self.classes or len(set(self.classes)) != len(self.classes)):
            raise TrainError(f"--classes {' '.join(self.classes)}: name each class folder once, e.g. --classes 5 6 7")
        self._check_se()
        if not isinstance(self.arch_kwargs, dict):
            raise TrainError(f"--arch-kwargs {self.arch_kwargs!r} must be a JSON object: pass e.g. "
                             "--arch-kwargs '{\"zero_init_residual\": true}' (or '{}')")

    def _check_start(self) -> None:
        """The flags that say what the run starts from fit together."""
        if self.weights is not None and self.pretrained:
            raise TrainError(f"--weights {self.weights} and --pretrained both give the starting weights: pass one")
        if self.new_head and self.weights is None:
            raise TrainError("--new-head replaces the classifier of a --weights file: pass --weights FILE, or drop "
                             "--new-head")
        if self.ema and self.weights is None:
            raise TrainError("--ema picks the EMA weights of a --weights file: pass --weights FILE, or drop --ema")
        if self.freeze_backbone and self.weights is None and not self.pretrained:
            raise TrainError("--freeze-backbone keeps pretrained weights fixed, but the run starts from random ones: "
                             "pass --weights FILE (or --pretrained), or drop --freeze-backbone")

    def _check_se(self) -> None:
        for name, option in SE_FIELDS.items():
            allowed = _SE_CHOICES.get(option)
            if allowed and getattr(self, name) not in allowed:
                raise TrainError(f"{name}={getattr(self, name)!r}: use one of {', '.join(allowed)}")
        if self.se:
            try:
                self.se_config()
            except SurgeryError as error:
                raise TrainError(f"the SE flags do not fit together: {error}") from None

    def se_config(self) -> SEConfig:
        """The SE that ``add_se`` puts in for this recipe (its ``reduction``, ``se_init``, ... fields).

        Raises:
            SurgeryError: values that no SE takes.
        """
        return SEConfig(**{option: getattr(self, name) for name, option in SE_FIELDS.items()})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Recipe:
        """Inverse of :meth:`to_dict`; unknown keys raise :class:`TrainError`."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise TrainError(f"unknown recipe field(s) {unknown}: valid ones are {sorted(names)}")
        return cls(**values)


def flag_of(name: str) -> str:
    """The command-line flag of the recipe field ``name`` (``input_size`` -> ``--crop``)."""
    meta = next(f.metadata for f in dataclasses.fields(Recipe) if f.name == name)
    return meta.get("flag", "--" + name.replace("_", "-"))


def _at_least(recipe: Recipe, name: str, low: int) -> None:
    value = getattr(recipe, name)
    if value < low:
        flag = flag_of(name)
        what = "a positive integer" if low == 1 else f"an integer >= {low}"
        raise TrainError(f"{flag} {value} must be {what}: pass e.g. {flag} {_EXAMPLES.get(name, low)}")


# A sensible value to suggest for each integer field a message may name.
_EXAMPLES = {"epochs": 100, "batch_size": 256, "accum_steps": 1, "input_size": 224, "resize": 256, "lr_step": 30,
             "reduction": 16, "num_samples": 1024, "val_samples": 1000, "eval_batch_size": 256, "workers": 8,
             "ckpt_every": "0 (only at the end of each epoch)"}

# The paper's recipe is the dataclass's defaults.
PAPER = Recipe()

# The same recipe scaled down so that a CPU trains it to >= 97% val top-1 on the digits in a few hundred steps.
DEMO = dataclasses.replace(
    PAPER,
    data=DIGITS,
    # ResNet-18 rather than -50: 4x cheaper and plenty for 10 classes. The architecture is left unchanged: the digits
    # are upsampled 8x8 -> 32x32, so the stride-4 ImageNet stem hands layer1 the digits' native 8x8 grid.
    arch="resnet18",
    # No architecture options: the paper trains from He initialisation, every block's last BN at gamma 1. A
    # zero-initialised last BN (Goyal et al.'s zero_init_residual) would make the branch u about 0 early on, so the
    # gates would get almost no gradient (they stay near 0.5 and class-agnostic) and tanh/relu gates, which start
    # at s = 0, would never learn at all; it is also a torchvision ResNet option that other archs do not take.
    # The 100-epoch schedule (Sec. 6) compressed to 8 epochs of 44 steps, /10 for the last 2: fewer epochs can end
    # below 97%, more do no better.
    epochs=8,
    batch_size=32,  # 44 steps an epoch on the 1,437 training images: SGD needs steps more than big batches here
    lr=0.1,  # above 0.6 x 32/1024: the short schedule needs the faster start
    lr_step=6,  # the paper's step decay, compressed: /10 for the last 2 of 8 epochs
    input_size=32,
    resize=32,  # evaluate on the whole 32x32 image (a 256 -> 224 style crop would cut strokes off)
    min_scale=0.8,  # 8% of a digit is a stroke fragment; mild crops keep the digit and the short run fast
    flip=False,  # mirrored digits are other symbols (or no digit at all)
    workers=0,  # the digits are in memory: worker processes would cost more than they save
)

RECIPES: dict[str, Recipe] = {"paper": PAPER, "demo": DEMO}
"""The full recipes; ``finetune`` (:data:`FINETUNE`) is an overlay on one of them."""
RECIPE_NAMES = ("demo", "finetune", "paper")
"""What ``--recipe`` takes."""

FINETUNE: dict[str, dict[str, Any]] = {
    # On every base: the SE blocks start as identity maps, so the pretrained network's outputs are kept at step 0,
    # with their gates at s = 0.5 (the BatchNorm before each doubled), where the sigmoid is steepest: at s = 1 its
    # slope is 5e-5 and the gates would hardly learn (surgery/gate_start.py). The learning rate warms up linearly for
    # an epoch, then decays on a cosine to 0 (the schedule of timm's and torchvision's fine-tuning recipes: no large
    # step while the new gates are still random in their first layer, and no abrupt drop at the end of a short run).
    "*": {"se_init": "identity", "gate_start": 0.5, "schedule": "cosine", "warmup_epochs": 1.0},
    # The digits: half the demo's 8 epochs; the new parameters (SE, a new head) at the demo's from-scratch rate, the
    # pretrained ones at a tenth of it, the usual 10x of discriminative fine-tuning.
    "demo": {"epochs": 4, "lr": 0.01, "se_lr": 0.1},
    # A folder: 10 epochs at batch 256 (one node, no accumulation), the paper's rate 0.6 x 256 / 1024 = 0.15 for the
    # new parameters and a tenth for the pretrained ones; torchvision's and timm's ImageNet weights also divide by
    # the std (pass --std 1 1 1 for weights trained with mean subtraction only, as this trainer's own).
    "paper": {"epochs": 10, "batch_size": 256, "lr": 0.015, "se_lr": 0.15, "std": [0.229, 0.224, 0.225]},
}
"""``--recipe finetune``: the overrides put on the data's default recipe (``demo`` on the digits, ``paper``
elsewhere) for a run that starts from pretrained weights (``--weights FILE`` or ``--pretrained``)."""


def get_recipe(name: str | None = None, data: str = DIGITS, **overrides: Any) -> Recipe:
    """A named recipe with ``overrides`` applied; ``name=None`` picks ``demo`` for the digits, ``paper`` otherwise.

    The recipe's own ``arch_kwargs`` belong to its own ``arch``: with another ``arch`` (and no ``arch_kwargs`` in
    ``overrides``) those the new architecture does not take are dropped, with a note in the log. ``arch_kwargs``
    given here are kept as they are (an architecture that rejects them is a :class:`TrainError` when it is built).

    Examples:
        >>> r = get_recipe(data="/data/imagenet", batch_size=256).resolved()
        >>> r.arch, r.lr, r.epochs
        ('resnet50', 0.15, 100)
    """
    name = name or ("demo" if data == DIGITS else "paper")
    if name not in RECIPE_NAMES:
        raise TrainError(f"unknown recipe {name!r}: use one of {', '.join(RECIPE_NAMES)}")
    if name == "finetune":
        under = "demo" if data == DIGITS else "paper"
        base = dataclasses.replace(RECIPES[under], **FINETUNE["*"], **FINETUNE[under])
    else:
        base = RECIPES[name]
    arch = overrides.get("arch", base.arch)
    if arch != base.arch and base.arch_kwargs and "arch_kwargs" not in overrides:
        from .models import accepted_kwargs  # builds the architecture once: only when it matters

        kept = accepted_kwargs(arch, base.arch_kwargs)
        if kept != base.arch_kwargs:
            dropped = {k: v for k, v in base.arch_kwargs.items() if k not in kept}
            log.info("note: %s does not take the %s recipe's arch_kwargs %s; dropped them (pass --arch-kwargs to "
                     "set its own)", arch, name, json.dumps(dropped))
            overrides["arch_kwargs"] = kept
    return dataclasses.replace(base, data=data, **overrides)


def given_flags(flags: argparse.Namespace | Mapping[str, Any]) -> dict[str, Any]:
    """The recipe fields among ``flags`` (the trainer's parser leaves a recipe flag out of its namespace when it is
    not given, so these are the ones the command line set)."""
    values = vars(flags) if isinstance(flags, argparse.Namespace) else dict(flags)
    names = {f.name for f in dataclasses.fields(Recipe)}
    return {k: v for k, v in values.items() if k in names}


def recipe_from_flags(flags: argparse.Namespace | Mapping[str, Any], *, saved: Mapping[str, Any] | None = None,
                      defaults: Mapping[str, Any] | None = None) -> Recipe:
    """The recipe the trainer's flags ask for, as ``python -m se_surgery.train`` and the ablation sweep build it.

    Args:
        flags: The trainer parser's namespace (or a dict like it): its ``recipe`` (the base recipe's name, ``None``
            for the default) and the recipe fields given.
        saved: A resumed run's own recipe (its :meth:`Recipe.to_dict`): the given flags go on top of it, not on a
            named recipe.
        defaults: Field values for the flags not given, on top of the named recipe (the sweep's own defaults).

    Raises:
        TrainError: an unknown recipe name or field.
    """
    given = given_flags(flags)
    if saved is not None:
        return Recipe.from_dict({**saved, **given})
    name = getattr(flags, "recipe", None) if isinstance(flags, argparse.Namespace) else flags.get("recipe")
    data = given.pop("data", DIGITS)
    return get_recipe(name, data, **{**(defaults or {}), **given})
