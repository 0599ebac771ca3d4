"""Per-block metrics against scipy run on the raw samples (an independent reference)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats as sps
from scipy.spatial.distance import jensenshannon

from analysis import ExcitationStats
from analysis.metrics import block_metrics, metrics_frame
from analysis.moments import ClassMoments


def synthetic(values: torch.Tensor, labels: torch.Tensor, batch: int = 37) -> ExcitationStats:
    """Stats of one block fed in uneven batches, as capture would."""
    moments = ClassMoments(1, values.shape[1])
    for v, y in zip(values.split(batch), labels.split(batch)):
        moments.update(v, y)
    names = [f"c{k}" for k in range(int(labels.max()) + 1)]
    return ExcitationStats({"layer4.1.se": moments}, names, {"layer4.1.se": "SE_5_2"})


@pytest.fixture
def sample() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (300,), generator=g)
    shift = torch.rand(4, 12, generator=g) * 0.3  # class-specific shapes on channels
    values = (0.4 + shift[labels] + 0.1 * torch.randn(300, 12, generator=g)).clamp(0, 1).double()
    return values, labels


def test_anova_matches_scipy_per_channel(sample) -> None:
    values, labels = sample
    got = block_metrics(synthetic(values, labels), "SE_5_2")
    x, y = values.numpy(), labels.numpy()
    groups = [x[y == k] for k in range(4)]
    f, p = sps.f_oneway(*groups)  # per channel (axis 0)
    ss_total = ((x - x.mean(0)) ** 2).sum(0)
    ss_between = sum(len(g) * (g.mean(0) - x.mean(0)) ** 2 for g in groups)
    assert got["eta2"] == pytest.approx(ss_between.sum() / ss_total.sum(), abs=1e-9)
    assert got["eta2_channel_median"] == pytest.approx(np.median(ss_between / ss_total), abs=1e-9)
    assert got["anova_F_median"] == pytest.approx(np.median(f), rel=1e-9)
    assert got["anova_p"] == pytest.approx(min(1.0, 12 * p.min()), rel=1e-6, abs=1e-300)
    assert got["share_channels_significant"] == pytest.approx(np.mean(p < 0.05 / 12))
    assert (got["df_between"], got["df_within"]) == (3, 296)
    assert got["block"] == "layer4.1.se" and got["paper_name"] == "SE_5_2" and got["images"] == 300


def test_profile_distances_and_agreement_match_scipy(sample) -> None:
    values, labels = sample
    got = block_metrics(synthetic(values, labels), "layer4.1.se")
    x, y = values.numpy(), labels.numpy()
    profiles = np.stack([x[y == k].mean(0) for k in range(4)])
    overall = x.mean(0)
    unit = lambda v: v / v.sum()  # noqa: E731 - the documented normalisation: excitation mass over channels
    pairs = [jensenshannon(unit(profiles[i]), unit(profiles[j]), base=2) for i in range(4) for j in range(i + 1, 4)]
    assert got["js_mean"] == pytest.approx(np.mean(pairs), abs=1e-9)
    assert got["js_max"] == pytest.approx(np.max(pairs), abs=1e-9)
    assert got["js_to_all"] == pytest.approx(np.mean([jensenshannon(unit(p), unit(overall), base=2) for p in profiles]))
    r = [sps.pearsonr(p, overall).statistic for p in profiles]
    assert got["agreement_mean"] == pytest.approx(np.mean(r)) and got["agreement_min"] == pytest.approx(np.min(r))


def test_specific_agnostic_and_saturated_blocks_are_told_apart() -> None:
    g = torch.Generator().manual_seed(1)
    labels = torch.arange(400) % 4
    noise = 0.05 * torch.randn(400, 16, generator=g, dtype=torch.float64)
    agnostic = synthetic(0.5 + noise, labels)
    specific = synthetic(0.5 + 0.2 * torch.rand(4, 16, generator=g, dtype=torch.float64)[labels] + noise, labels)
    saturated = synthetic((0.97 + 0.2 * noise).clamp(max=1), labels)
    a, s, sat = (block_metrics(st, "SE_5_2") for st in (agnostic, specific, saturated))
    assert a["eta2"] < 0.05 < 0.5 < s["eta2"]
    assert a["anova_p"] > 1e-3 > 1e-20 > s["anova_p"]
    assert s["js_mean"] > 5 * a["js_mean"]
    assert sat["saturated_share"] == 1.0 and a["saturated_share"] == 0.0
    assert sat["one_minus_s"] == pytest.approx(0.03, abs=0.01) and a["one_minus_s"] == pytest.approx(0.5, abs=0.01)


def test_one_class_gives_nan_class_metrics_not_an_error(sample) -> None:
    values, _ = sample
    frame = metrics_frame(synthetic(values, torch.zeros(300, dtype=torch.long)))
    row = frame.iloc[0]
    assert row["classes"] == 1 and row["eta2"] == 0.0
    assert math.isnan(row["anova_F_median"]) and math.isnan(row["js_mean"]) and 0 <= row["saturated_share"] <= 1
    assert math.isnan(row["anova_p"])  # as documented: no test with one class (min(1.0, nan) would say 1.0)


def test_gap_and_spread_match_numpy_on_the_stored_values(sample) -> None:
    values, labels = sample
    got = block_metrics(synthetic(values, labels), "SE_5_2")
    x, y = values.numpy(), labels.numpy()
    overall = x.mean(0)
    per_class = [np.abs(x[y == k].mean(0) - overall).mean() for k in range(4)]
    assert got["gap"] == pytest.approx(np.mean(per_class), abs=1e-12)
    assert got["gap_max"] == pytest.approx(np.max(per_class), abs=1e-12)
    assert got["spread"] == pytest.approx(x.std(ddof=1), abs=1e-12)
    assert got["gap_ratio"] == pytest.approx(np.mean(per_class) / x.std(ddof=1), abs=1e-12)


def test_separable_but_flat_curves_are_not_called_class_specific() -> None:
    """The demo's case: gates at 0.48-0.51 with almost no spread inside a class: eta2 near 1, ANOVA p ~ 0, and yet
    the curves lie on top of each other, so the verdict is class-agnostic; visibly apart curves are class-specific."""
    g = torch.Generator().manual_seed(2)
    labels = torch.arange(400) % 4
    flat = synthetic(0.48 + 0.01 * labels[:, None].double() + 0.0005 * torch.randn(400, 16, generator=g,
                                                                                  dtype=torch.float64), labels)
    apart = synthetic(0.3 + 0.15 * labels[:, None].double() + 0.05 * torch.randn(400, 16, generator=g,
                                                                                dtype=torch.float64), labels)
    f, a = block_metrics(flat, "SE_5_2"), block_metrics(apart, "SE_5_2")
    assert f["eta2"] > 0.95 and f["anova_p"] < 1e-50 and f["gap"] == pytest.approx(0.01, abs=1e-3)
    assert f["verdict"] == "class-agnostic" and a["verdict"] == "class-specific" and a["gap"] > 0.15


def test_unbounded_gates_report_no_saturation(sample) -> None:
    values, labels = sample
    stats = synthetic(values * 2 - 1, labels)  # a tanh gate: s in [-1, 1]
    stats.unbounded.add("layer4.1.se")
    got = block_metrics(stats, "SE_5_2")
    assert math.isnan(got["saturated_share"]) and math.isnan(got["one_minus_s"]) and "tanh" in got["note"]
    assert got["gap"] > 0 and 0 <= got["eta2"] <= 1
