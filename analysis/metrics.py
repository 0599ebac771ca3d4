"""Numbers on the paper's claims, per SE block, from the streaming sums of :class:`ExcitationStats`.

Sec. 7.2 of the SENet paper says: early excitations are class-agnostic, later ones class-specific; SE_5_2 saturates
near 1 (the block is close to an identity); SE_5_3 has one shape for all classes up to scale. Each claim gets a number:

Class-specificity (one-way ANOVA, class as the factor). An image gives a C-vector of excitations, so there is one
ANOVA per channel ``c``: ``SS_between,c = sum_k n_k (mean_kc - mean_c)^2``, ``SS_within,c = sum_k M2_kc``,
``F_c = (SS_between,c / (K-1)) / (SS_within,c / (N-K))``, ``p_c`` from scipy's F distribution. They are summarised
per block as:

- ``eta2``: ``sum_c SS_between,c / sum_c SS_total,c`` - the share of all excitation variance of the block that lies
  between classes (the multivariate "trace" eta squared; channels weigh by their variance, so near-constant channels
  do not inflate it). ``omega2`` is the same with the usual small-sample correction (eta squared is biased upwards:
  under no class effect it is about (K-1)/(N-1)).
- ``eta2_channel_median``: the median of the per-channel eta squared.
- ``anova_F_median``: the median per-channel F. ``anova_p``: ``min(1, C * min_c p_c)``, Bonferroni over channels: a
  valid test of "no channel differs between classes" whatever the correlation between channels (their F statistics are
  not independent, so a pooled F with summed degrees of freedom would overstate the evidence).
  ``share_channels_significant``: channels with ``p_c < 0.05 / C``.
- An ANOVA of the channel-averaged excitation would miss classes that differ in *shape* but not in level, which is
  exactly what Fig. 6 shows, so it is not used.

Profiles (Fig. 6): the class profile is the class's mean excitation per channel. For the Jensen-Shannon distance a
profile is divided by its sum, so it becomes a distribution of excitation mass over channels: the distance (base 2, in
[0, 1]) then compares shapes and ignores scale. ``js_mean`` is the mean over class pairs, ``js_to_all`` the mean
distance of each class to the all-class profile. ``agreement_mean`` / ``agreement_min``: Pearson correlation of each
class profile with the all-class profile (invariant to scale and offset: SE_5_3's "same shape up to scale").

Effect size in units of s (what the eye sees in Fig. 6): eta2 is a ratio of variances, so when the gates barely vary
within a class a tiny difference between classes is still most of the variance (0.5 vs 0.51 in every image gives
eta2 near 1 while the curves lie on top of each other). Beside it:

- ``gap``: the mean absolute gap between each class profile and the all-class profile, ``mean_k mean_c |mean_kc -
  mean_c|``, in units of s (classes weigh equally, as curves do); ``gap_max`` the same for the most distinct class.
- ``spread``: the standard deviation of s over every captured image and channel of the block; ``gap_ratio`` =
  ``gap / spread``: how large the class gaps are against everything the block's excitations do.
- ``verdict``: ``class-specific`` only when the class curves are visibly apart (``gap >= VISIBLE_GAP``, 0.05 of the
  s axis) and the ANOVA is significant; ``slight`` for gaps between ``FAINT_GAP`` (0.02) and 0.05; else
  ``class-agnostic`` (whatever eta2 says: the curves are indistinguishable).

Saturation: ``saturated_share``, the share of channels whose all-class mean excitation is > 0.9, and ``one_minus_s``,
the mean over channels of ``1 - mean s`` (0 for a block that passes its input through unchanged). For a gate that is
not a sigmoid (``add_se(excitation="tanh" | "relu")``, s not in [0, 1]) both are NaN and ``note`` says why.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy import stats as sps
from scipy.spatial.distance import jensenshannon

from analysis.collected import ExcitationStats

__all__ = ["FAINT_GAP", "SATURATION_LEVEL", "VISIBLE_GAP", "block_metrics", "metrics_frame", "verdict"]

SATURATION_LEVEL = 0.9
"""A channel whose mean excitation is above this counts as saturated."""

VISIBLE_GAP = 0.05
"""Mean class-to-all gap (units of s) from which class curves are clearly apart in Fig. 6: on a 2-inch panel whose
y axis spans s in [0, 1], 0.05 is 0.1 inch, about seven line widths."""

FAINT_GAP = 0.02
"""Below this mean gap (0.04 inch, under three line widths) class curves cannot be told apart by eye."""

CLASS_SPECIFIC, SLIGHT, AGNOSTIC = "class-specific", "slight", "class-agnostic"


def _anova(n: np.ndarray, mean: np.ndarray, m2: np.ndarray) -> dict[str, float]:
    """Per-channel one-way ANOVA from per-class counts ``(K,)``, means and M2 ``(K, C)``, summarised per block."""
    k, total, channels = len(n), n.sum(), mean.shape[1]
    grand = (n[:, None] * mean).sum(0) / total
    ss_between = (n[:, None] * (mean - grand) ** 2).sum(0)
    ss_within = m2.sum(0)
    ss_total = ss_between + ss_within
    df_b, df_w = k - 1, total - k
    with np.errstate(divide="ignore", invalid="ignore"):
        f = (ss_between / df_b) / (ss_within / df_w) if df_w > 0 else np.full(channels, np.nan)
        eta2_c = ss_between / ss_total
    p = sps.f.sf(f, df_b, df_w) if df_w > 0 else np.full(channels, np.nan)
    ms_within = ss_within.sum() / df_w if df_w > 0 else math.nan
    sst = ss_total.sum()
    return {
        "eta2": ss_between.sum() / sst if sst > 0 else math.nan,
        "omega2": (ss_between.sum() - df_b * ms_within) / (sst + ms_within) if sst > 0 else math.nan,
        "eta2_channel_median": _nan_stat(np.nanmedian, eta2_c),
        "anova_F_median": _nan_stat(np.nanmedian, f),
        "anova_p": _bonferroni(_nan_stat(np.nanmin, p), channels),
        "share_channels_significant": float(np.mean(p < 0.05 / channels)),
        "df_between": float(df_b),
        "df_within": float(df_w),
    }


def _bonferroni(p_min: float, tests: int) -> float:
    """``min(1, tests * p_min)``, NaN when ``p_min`` is (``min(1.0, nan)`` would be 1.0)."""
    return math.nan if math.isnan(p_min) else min(1.0, tests * p_min)


def _nan_stat(fn, x: np.ndarray) -> float:
    """``fn`` over the non-NaN values of ``x``; NaN when there are none."""
    return float(fn(x)) if (~np.isnan(x)).any() else math.nan


def _profiles(mean: np.ndarray, overall: np.ndarray) -> dict[str, float]:
    """Jensen-Shannon distances and scale-free agreement between class profiles and the all-class profile."""
    js_pairs = [jensenshannon(mean[i][None, :], mean[i + 1 :], base=2, axis=1) for i in range(len(mean) - 1)]
    js_pairs = np.concatenate(js_pairs) if js_pairs else np.array([])
    js_all = jensenshannon(mean, overall[None, :], base=2, axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.array([np.corrcoef(row, overall)[0, 1] for row in mean])
    return {
        "js_mean": _nan_stat(np.nanmean, js_pairs),
        "js_max": _nan_stat(np.nanmax, js_pairs),
        "js_to_all": _nan_stat(np.nanmean, js_all),
        "agreement_mean": _nan_stat(np.nanmean, r),
        "agreement_min": _nan_stat(np.nanmin, r),
    }


def _effect_size(mean: np.ndarray, overall: np.ndarray, n_all: float, m2_all: np.ndarray) -> dict[str, float]:
    """Class-to-all gaps in units of s, the block's spread of s, and their ratio (see the module docstring)."""
    if len(mean) < 2:
        gap = gap_max = math.nan
    else:
        per_class = np.abs(mean - overall[None, :]).mean(1)
        gap, gap_max = float(per_class.mean()), float(per_class.max())
    values = n_all * overall.size
    total_ss = m2_all.sum() + n_all * np.square(overall - overall.mean()).sum()  # around the grand mean of s
    spread = float(np.sqrt(total_ss / (values - 1))) if values > 1 else math.nan
    ratio = gap / spread if spread > 0 else math.nan
    return {"gap": gap, "gap_max": gap_max, "spread": spread, "gap_ratio": ratio}


def verdict(gap: float, anova_p: float) -> str:
    """``class-specific`` / ``slight`` / ``class-agnostic`` from the mean gap (units of s) and the ANOVA p-value;
    ``n/a`` with fewer than two classes. A significant ANOVA alone never makes a block class-specific."""
    if math.isnan(gap):
        return "n/a"
    significant = not math.isnan(anova_p) and anova_p < 0.05
    if significant and gap >= VISIBLE_GAP:
        return CLASS_SPECIFIC
    return SLIGHT if significant and gap >= FAINT_GAP else AGNOSTIC


def block_metrics(stats: ExcitationStats, block: str) -> dict[str, float | int | str]:
    """Every metric of one block (see the module docstring for their definitions).

    Args:
        stats: Captured statistics.
        block: SE module name or paper name.

    Returns:
        A flat dict: ``block, paper_name, depth, channels, classes, images`` and the metrics. Metrics that need two
        classes (ANOVA, distances) are NaN with fewer.
    """
    block = stats.block(block)
    classes = stats.classes
    m = stats.moments[block]
    n, mean, m2 = (t.cpu().numpy()[classes] for t in (m.n, m.mean, m.m2))
    n_all, overall, m2_all = stats.moments_of(block)
    anova, effect = _anova(n, mean, m2), _effect_size(mean, overall, n_all, m2_all)
    return {
        "block": block,
        "paper_name": stats.paper_name(block),
        "depth": stats.depth(block),
        "channels": int(mean.shape[1]),
        "classes": len(classes),
        "images": int(n.sum()),
        **anova,
        **effect,
        "verdict": verdict(effect["gap"], anova["anova_p"]),
        **_profiles(mean, overall),
        **_saturation(overall, bounded=block not in stats.unbounded),
    }


def _saturation(overall: np.ndarray, *, bounded: bool) -> dict[str, float | str]:
    """Saturation metrics of a [0, 1] gate; NaN, with a note, for a gate that is not bounded by 1."""
    if not bounded:
        return {"saturated_share": math.nan, "one_minus_s": math.nan, "mean_s": float(np.mean(overall)),
                "note": "gate not in [0, 1] (tanh/relu excitation): no saturation at 1 to measure"}
    return {"saturated_share": float(np.mean(overall > SATURATION_LEVEL)), "one_minus_s": float(np.mean(1.0 - overall)),
            "mean_s": float(np.mean(overall)), "note": ""}


def metrics_frame(stats: ExcitationStats) -> pd.DataFrame:
    """:func:`block_metrics` of every captured block, one row each, in forward order."""
    return pd.DataFrame([block_metrics(stats, b) for b in stats.blocks])
