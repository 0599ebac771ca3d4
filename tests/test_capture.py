"""Capture: streaming statistics against torch.mean / torch.std of the stored gate outputs (micrograd-style)."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from analysis import AnalysisError, ExcitationStats, capture_excitations
from analysis.capture import find_gates
from analysis.moments import ClassMoments

from .helpers import make_loader, seeded_model


def stored_gate_outputs(model: nn.Module, loader) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The reference: every gate output of every image, kept whole, in float64."""
    outputs: dict[str, list[torch.Tensor]] = {}
    handles = [
        model.get_submodule(gate).register_forward_hook(
            lambda m, a, out, block=block: outputs.setdefault(block, []).append(out.flatten(1).double())
        )
        for block, gate in find_gates(model).items()
    ]
    labels = []
    model.eval()
    with torch.no_grad():
        for images, y in loader:
            model(images)
            labels.append(y)
    for h in handles:
        h.remove()
    return {b: torch.cat(v) for b, v in outputs.items()}, torch.cat(labels)


@pytest.mark.parametrize("timm_se", [False, True], ids=["torchvision-se", "timm-se"])
def test_streaming_mean_std_match_stored_outputs(timm_se: bool) -> None:
    model, loader = seeded_model(timm_se=timm_se), make_loader(n=70, batch_size=16)  # last batch is partial
    stats = capture_excitations(model, loader)
    stored, labels = stored_gate_outputs(model, loader)
    assert stats.blocks == ["layer1.0.se", "layer1.1.se", "layer2.0.se"]
    for block, s in stored.items():
        for k in range(4):
            ref = s[labels == k]
            assert stats.count(block, k) == len(ref)
            torch.testing.assert_close(torch.from_numpy(stats.mean(block, k)), ref.mean(0), atol=1e-6, rtol=0)
            torch.testing.assert_close(torch.from_numpy(stats.std(block, k)), ref.std(0), atol=1e-6, rtol=0)
        torch.testing.assert_close(torch.from_numpy(stats.mean(block)), s.mean(0), atol=1e-6, rtol=0)
        torch.testing.assert_close(torch.from_numpy(stats.std(block)), s.std(0), atol=1e-6, rtol=0)
        hist, edges = stats.histogram(block)
        assert hist.sum() == s.numel() and edges[0] == 0 and edges[-1] == 1
        ref_hist = torch.histc(s.float(), bins=len(hist), min=0, max=1)
        assert abs(hist - ref_hist.numpy()).sum() <= 2  # only values on a bin edge may fall differently


def test_chan_merge_of_parts_equals_whole() -> None:
    g = torch.Generator().manual_seed(1)
    values, labels = torch.rand(500, 7, generator=g, dtype=torch.float64), torch.randint(0, 5, (500,), generator=g)
    whole = ClassMoments(5, 7)
    whole.update(values, labels)
    parts = [ClassMoments(1, 7) for _ in range(3)]  # grows as labels need
    for part, idx in zip(parts, torch.tensor_split(torch.randperm(500, generator=g), [13, 200])):
        part.update(values[idx], labels[idx])
    merged = parts[0].merge(parts[1]).merge(parts[2])
    for a, b in [(merged.n, whole.n), (merged.mean, whole.mean), (merged.m2, whole.m2), (merged.hist, whole.hist)]:
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


def direct_moments(values: torch.Tensor, labels: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class mean and sample std of ``values`` computed whole in float64 by the two-pass formula (the reference;
    ``torch.std(0)`` itself strays by 1e-12 where the std is 1e-5 of the mean)."""
    rows = [values.double()[labels == c] for c in range(k)]
    means = [r.mean(0) for r in rows]
    return (torch.stack(means),
            torch.stack([((r - m).square().sum(0) / (len(r) - 1)).sqrt() for r, m in zip(rows, means)]))


@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-12), (torch.float32, 1e-6), (torch.bfloat16, 1e-6)])
def test_batch_sums_in_the_gate_dtype_agree_with_a_float64_reference(dtype, rtol) -> None:
    # Gates as a trained network has them: some near 0.5, some saturated near 0 or 1 (a small variance near a large
    # mean is where a sum-of-squares formula would lose every digit), folded in batches of uneven size.
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(3000, 40, generator=g, dtype=torch.float64) * 0.5 + torch.linspace(-9, 9, 40).double()
    values, labels = torch.sigmoid(logits).to(dtype), torch.randint(0, 6, (3000,), generator=g)
    moments = ClassMoments(2, 40)  # grows to 6 classes
    for idx in torch.tensor_split(torch.arange(3000), [1, 64, 700, 2999]):
        moments.update(values[idx], labels[idx])
    mean, std = direct_moments(values, labels, 6)
    torch.testing.assert_close(moments.mean, mean, rtol=rtol, atol=0)
    torch.testing.assert_close(moments.std(), std, rtol=rtol, atol=0)
    assert moments.n.tolist() == torch.bincount(labels).double().tolist()
    ref_hist = torch.stack([torch.histc(values[labels == c].double(), bins=20, min=0, max=1) for c in range(6)])
    assert (moments.hist - ref_hist.long()).abs().sum() <= 2  # only a value on a bin edge may fall differently


def test_float64_capture_agrees_with_the_stored_outputs_to_1e_12() -> None:
    model, loader = seeded_model().double(), make_loader(n=70, batch_size=16)
    loader = [(x.double(), y) for x, y in loader]
    stats = capture_excitations(model, loader)
    stored, labels = stored_gate_outputs(model, loader)
    for block, s in stored.items():
        mean, std = direct_moments(s, labels, 4)
        torch.testing.assert_close(torch.from_numpy(stats.mean(block, 2)), mean[2], rtol=1e-12, atol=0)
        torch.testing.assert_close(torch.from_numpy(stats.std(block, 2)), std[2], rtol=1e-12, atol=0)


def test_nan_and_out_of_range_values_land_in_the_end_bins() -> None:
    moments = ClassMoments(1, 4, bins=10)
    moments.update(torch.tensor([[float("nan"), -3.0, 7.0, 1.0]]), torch.tensor([0]))
    assert moments.hist[0].tolist() == [2, 0, 0, 0, 0, 0, 0, 0, 0, 2]


def test_a_nan_gate_value_stays_in_its_own_class():
    values, labels = torch.rand(6, 3, dtype=torch.float64), torch.tensor([0, 0, 1, 1, 2, 2])
    values[0, 0] = float("nan")
    moments = ClassMoments(1, 3)
    moments.update(values.float(), labels)
    assert torch.isnan(moments.mean[0, 0])
    torch.testing.assert_close(moments.mean[1:, 0], torch.stack([values[2:4, 0].mean(), values[4:, 0].mean()]))


def test_negative_labels_are_refused_before_anything_changes_and_empty_batches_change_nothing():
    moments = ClassMoments(2, 3)
    with pytest.raises(ValueError, match="labels must be class indices >= 0, got -1"):
        moments.update(torch.rand(4, 3), torch.tensor([0, 1, -1, -1]))
    moments.update(torch.rand(0, 3), torch.tensor([], dtype=torch.long))
    assert moments.n.tolist() == [0, 0] and moments.hist.sum() == 0


def quota_reference(batches, selected, per_class):
    """The per-image rule the capture's quota follows, written as a plain loop."""
    seen: dict[int, int] = {}
    masks = []
    for labels in batches:
        keep = []
        for label in labels.tolist():
            ok = (selected is None or label in selected) and (per_class is None or seen.get(label, 0) < per_class)
            seen[label] = seen.get(label, 0) + ok
            keep.append(ok)
        masks.append(keep)
    return masks


@pytest.mark.parametrize("selected, per_class", [({1, 3}, None), (None, 4), ({0, 2, 5}, 3), (None, None)])
def test_quota_takes_the_first_images_of_each_selected_class(selected, per_class) -> None:
    from analysis.capture import _Quota

    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 6, (n,), generator=g) for n in (7, 1, 16, 5, 9)]
    quota = _Quota(selected, per_class, selected if selected is not None else range(6))
    for labels, ref in zip(batches, quota_reference(batches, selected, per_class)):
        keep = quota.keep(labels)
        assert (keep.tolist() if keep is not None else [True] * len(labels)) == ref


def test_excitation_stats_merge_equals_single_capture(tiny_senet) -> None:
    model = tiny_senet
    first, second = make_loader(n=32, seed=0), make_loader(n=48, seed=1)
    merged = capture_excitations(model, first).merge(capture_excitations(model, second))
    whole = capture_excitations(model, [*first, *second])
    for block in whole.blocks:
        assert merged.count(block) == whole.count(block) == 80
        torch.testing.assert_close(merged.mean(block, 2), whole.mean(block, 2), atol=1e-9, rtol=0)
        torch.testing.assert_close(merged.std(block), whole.std(block), atol=1e-9, rtol=0)


def test_classes_and_per_class_limit_what_is_captured() -> None:
    stats = capture_excitations(seeded_model(), make_loader(n=80), classes=["class1", 3], per_class=5)
    assert stats.classes == [1, 3]
    assert [stats.count("layer2.0.se", k) for k in range(4)] == [0, 5, 0, 5]
    frame = stats.to_frame()
    assert list(frame.columns) == ["block", "paper_name", "depth", "class", "channel", "n", "mean", "std"]
    assert set(frame["class"]) == {"class1", "class3", "all"}
    assert len(frame) == 3 * (8 + 8 + 16)
    assert frame.groupby("block")["depth"].first().to_dict() == {"layer1.0.se": 1, "layer1.1.se": 2, "layer2.0.se": 3}


def test_hooks_removed_and_modes_restored_even_when_forward_fails() -> None:
    model = seeded_model().train()
    model.layer1[1].bn.eval()  # a mixed state must come back as it was

    def failing_loader():
        yield from make_loader(n=16)
        raise RuntimeError("disk gone")

    with pytest.raises(RuntimeError, match="disk gone"):
        capture_excitations(model, failing_loader())
    capture_excitations(model, make_loader(n=16))
    assert all(not m._forward_hooks for m in model.modules())
    assert model.training and model.layer1[0].bn.training and not model.layer1[1].bn.training


def test_blocks_accept_names_and_reject_unknown_ones(tiny_senet) -> None:
    model = tiny_senet
    stats = capture_excitations(model, make_loader(n=16), blocks=["layer2.0.se"])
    assert isinstance(stats, ExcitationStats) and stats.blocks == ["layer2.0.se"]
    with pytest.raises(AnalysisError, match=r"unknown SE block.*SE_2_1, SE_2_2, SE_3_1"):  # ResNet-like names
        capture_excitations(model, make_loader(n=16), blocks=["layer9.se"])
    with pytest.raises(AnalysisError, match="unknown class 'dog'.*class0, class1"):
        capture_excitations(model, make_loader(n=16), classes=["dog"])
    with pytest.raises(AnalysisError, match="no SE block"):
        capture_excitations(nn.Sequential(nn.Conv2d(3, 4, 3)), make_loader(n=16))


def _rank_capture(rank: int, world: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    shard = [batch for i, batch in enumerate(make_loader(n=64, batch_size=8)) if i % world == rank]
    stats = capture_excitations(seeded_model(), shard)
    if rank == 0:
        queue.put({b: (stats.count(b, 1), stats.mean(b, 1), stats.std(b)) for b in stats.blocks})
    dist.destroy_process_group()


def test_statistics_are_reduced_across_ranks() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    queue = mp.get_context("fork").SimpleQueue()  # fork: the ranks need not import torch again
    mp.start_processes(_rank_capture, args=(2, port, queue), nprocs=2, start_method="fork")
    reduced = queue.get()
    single = capture_excitations(seeded_model(), make_loader(n=64, batch_size=8))
    for block, (count, mean, std) in reduced.items():
        assert count == single.count(block, 1) == 16
        # 1e-6, not 1e-9: the ranks' float32 forwards run single-threaded, so they round a little differently
        torch.testing.assert_close(mean, single.mean(block, 1), atol=1e-6, rtol=0)
        torch.testing.assert_close(std, single.std(block), atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=["float64", "bf16"])
def test_fixed_gates_follow_the_inputs_dtype(dtype: torch.dtype) -> None:
    """--ablate's constant gates give the captured float64 means in the input's own dtype (and device)."""
    from analysis.removal import fix_gates

    model = seeded_model().to(dtype)
    stats = capture_excitations(model, [(x.to(dtype), y) for x, y in make_loader(n=16)])
    means = {b: stats.mean(b) for b in stats.blocks}
    fixed = fix_gates(model, means)
    seen = {}
    gates = find_gates(fixed)
    handles = [fixed.get_submodule(gates[b]).register_forward_hook(
        lambda m, a, out, b=b: seen.setdefault(b, out)) for b in stats.blocks]
    with torch.no_grad():
        fixed(torch.randn(2, 3, 16, 16, dtype=dtype))
    for h in handles:
        h.remove()
    for block, out in seen.items():
        assert out.dtype == dtype and out.shape[:2] == (2, means[block].size)
        expected = torch.as_tensor(means[block], dtype=torch.float64).to(dtype)
        assert torch.equal(out[0].flatten(), expected) and torch.equal(out[1].flatten(), expected)


def test_block_and_class_names_resolve_in_one_place() -> None:
    from analysis.collected import resolve_classes, select_blocks
    from se_surgery.surgery.naming import resolve_blocks

    paper = {"layer1.0.se": "SE_2_1", "layer4.1.se": "SE_5_2"}
    assert resolve_blocks(["SE_5_2", "layer1.0.se", "layer4.1.se", "x"], paper, paper) == (
        ["layer4.1.se", "layer1.0.se"], ["x"])
    assert select_blocks(paper, paper, None) == list(paper)
    assert resolve_classes(["b", 0, "2", "pug"], ["a", "b", "c"], aliases=["x", "y", "pug"]) == [1, 0, 2, 2]
    with pytest.raises(AnalysisError, match="unknown class '3'"):
        resolve_classes(["3"], ["a", "b", "c"])
    assert resolve_classes(None, ["a"]) is None
