"""Figures: the right panels and curves, readable files (Agg backend, no display)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.image as mpimg  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from analysis import ExcitationStats, capture_excitations  # noqa: E402
from analysis.metrics import metrics_frame  # noqa: E402
from analysis.moments import ClassMoments  # noqa: E402
from analysis.plots import fig6_blocks, plot_fig6, plot_fig7, plot_specificity, save_figure  # noqa: E402

from .helpers import make_loader, seeded_model  # noqa: E402


def fake_stats(paper: list[str], classes: int = 3, channels: int = 64) -> ExcitationStats:
    g = torch.Generator().manual_seed(0)
    moments = {}
    for name in paper:
        m = ClassMoments(classes, channels)
        labels = torch.arange(60) % classes
        m.update(torch.rand(60, channels, generator=g), labels)
        moments[f"{name}.se"] = m
    return ExcitationStats(moments, [f"c{k}" for k in range(classes)], {f"{p}.se": p for p in paper})


def resnet_names(blocks_per_stage: list[int]) -> list[str]:
    return [f"SE_{s + 2}_{b + 1}" for s, n in enumerate(blocks_per_stage) for b in range(n)]


@pytest.mark.parametrize(
    ("layout", "expected"),
    [
        ([3, 4, 6, 3], ["SE_2_3", "SE_3_4", "SE_4_6", "SE_5_1", "SE_5_2", "SE_5_3"]),  # ResNet-50: the paper's six
        ([2, 2, 2, 2], ["SE_2_2", "SE_3_2", "SE_4_2", "SE_5_1", "SE_5_2"]),  # ResNet-18: last of each, all of stage 5
    ],
)
def test_fig6_blocks_follow_the_paper(layout: list[int], expected: list[str]) -> None:
    stats = fake_stats(resnet_names(layout), channels=4)
    assert [stats.paper_name(b) for b in fig6_blocks(stats)] == expected


def test_fig6_blocks_without_paper_names_spread_over_depth() -> None:
    stats = capture_excitations(seeded_model(), make_loader(n=16))
    assert fig6_blocks(stats) == ["layer1.1.se", "layer2.0.se"]  # layer<k>.<i> blocks: SE_2_2 and SE_3_1
    stats.paper_names = {}
    assert fig6_blocks(stats) == ["layer1.0.se", "layer1.1.se", "layer2.0.se"]


def test_fig6_draws_each_class_and_the_all_class_mean_on_50_channels() -> None:
    stats = fake_stats(resnet_names([2, 2, 2, 2]))
    fig = plot_fig6(stats)
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in axes] == ["SE_2_2", "SE_3_2", "SE_4_2", "SE_5_1", "SE_5_2"]
    lines = axes[-1].get_lines()
    assert [line.get_label() for line in lines] == ["c0", "c1", "c2", "all classes"]
    assert len(lines[0].get_xdata()) == 50
    assert (lines[-1].get_ydata() == stats.mean("SE_5_2")[:50]).all()
    assert axes[0].get_ylabel() == "mean excitation" and axes[0].get_xlabel() == "channel index"


def test_fig7_bands_and_specificity_axes(tmp_path) -> None:
    stats = fake_stats(resnet_names([1, 1]))
    fig = plot_fig7(stats, classes=["c2"])
    assert [line.get_label() for line in fig.axes[0].get_lines()] == ["class c2 (n=20)"]
    assert len(fig.axes[0].collections) == 1  # the +/- std band
    spec = plot_specificity(metrics_frame(stats))
    assert [t.get_text() for t in spec.axes[0].get_xticklabels()] == ["SE_2_1", "SE_3_1"]
    assert {ax.get_title() for ax in spec.axes} == {"class-specificity", "saturation"}
    paths = save_figure(spec, tmp_path, "specificity")
    assert [p.name for p in paths] == ["specificity.png", "specificity.pdf"]
    image = mpimg.imread(paths[0])
    assert image.shape[1] >= 1000 and image.std() > 0.05  # paper width at 200 dpi, not blank
    assert paths[1].read_bytes().startswith(b"%PDF")
