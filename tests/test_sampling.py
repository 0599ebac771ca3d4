"""ClassAwareSampler: balanced classes, Relay-BP list cycling, rank sharding, epochs and resume."""

import numpy as np
import pytest
from scipy.stats import chisquare

from se_surgery.train.sampling import ClassAwareSampler, ShuffleSampler

# 100:1 imbalance: class 0 has 1000 images, classes 1..4 have 10 each.
IMBALANCED = np.repeat(np.arange(5), [1000, 10, 10, 10, 10])


def _classes(stream):
    return IMBALANCED[np.asarray(stream)]


def test_classes_are_drawn_uniformly_despite_imbalance():
    stream = list(ClassAwareSampler(IMBALANCED, seed=3, num_samples=5000))
    counts = np.bincount(_classes(stream), minlength=5)
    assert chisquare(counts).pvalue > 0.01  # uniform over classes, not proportional to class size
    assert counts.max() - counts.min() <= 1  # the class list makes it exact, one pass at a time


def test_class_list_and_image_lists_cycle_as_relay_backprop_says():
    labels, num_classes = IMBALANCED, 5
    stream = np.array(list(ClassAwareSampler(labels, seed=1, num_samples=3000)))
    classes = labels[stream]
    for start in range(0, len(stream) - num_classes + 1, num_classes):  # each pass of the class list
        assert sorted(classes[start : start + num_classes]) == list(range(num_classes))
    for c in range(num_classes):  # each class's draws walk through whole permutations of its images
        members = np.flatnonzero(labels == c)
        draws = stream[classes == c]
        for lap in range(len(draws) // len(members)):
            assert sorted(draws[lap * len(members) : (lap + 1) * len(members)]) == members.tolist()
    assert len(set(stream[classes == 1][:10])) == 10 and len(stream[classes == 1]) > 10  # it did wrap around


def test_empty_classes_are_skipped():
    labels = [0, 0, 0, 7, 7, 9]  # classes 1..6 and 8 have no image
    stream = list(ClassAwareSampler(labels, num_samples=30))
    counts = np.bincount(np.array(labels)[stream], minlength=10)
    assert counts.tolist() == [10, 0, 0, 0, 0, 0, 0, 10, 0, 10]


@pytest.mark.parametrize("replicas, num_samples", [(2, 1000), (3, 1000), (4, 998)])
def test_rank_streams_interleave_to_the_single_process_stream(replicas, num_samples):
    single = list(ClassAwareSampler(IMBALANCED, seed=5, num_samples=num_samples))
    ranks = [list(ClassAwareSampler(IMBALANCED, num_replicas=replicas, rank=r, seed=5, num_samples=num_samples))
             for r in range(replicas)]
    assert len({len(stream) for stream in ranks}) == 1  # equal shares, so DDP steps stay in lockstep
    interleaved = [index for group in zip(*ranks) for index in group]
    assert interleaved[:num_samples] == single  # beyond num_samples: the same stream, drawn further


def test_set_epoch_reshuffles_deterministically():
    sampler = ClassAwareSampler(IMBALANCED, seed=0)
    epoch0 = list(sampler)
    assert list(sampler) == epoch0
    sampler.set_epoch(1)
    epoch1 = list(sampler)
    assert epoch1 != epoch0
    sampler.set_epoch(0)
    assert list(sampler) == epoch0
    assert list(ClassAwareSampler(IMBALANCED, seed=1)) != epoch0


@pytest.mark.parametrize("cls, arg", [(ClassAwareSampler, IMBALANCED), (ShuffleSampler, len(IMBALANCED))])
def test_state_round_trip_resumes_mid_epoch(cls, arg):
    full = [list(cls(arg, num_replicas=2, rank=r, seed=9)) for r in range(2)]
    for rank in range(2):
        sampler = cls(arg, num_replicas=2, rank=rank, seed=9)
        sampler.set_epoch(4)
        sampler.set_epoch(0)
        sampler.position = 2 * 37  # 37 draws consumed on each of the 2 ranks
        state = sampler.state_dict()
        fresh = cls(arg, num_replicas=2, rank=rank, seed=123)
        fresh.load_state_dict(state)
        assert list(fresh) == full[rank][37:]
        assert len(fresh) == len(full[rank]) - 37
    with pytest.raises(ValueError, match="multiple of num_replicas"):
        fresh.load_state_dict({**state, "position": 3})


def test_shuffle_sampler_epochs_are_permutations():
    sampler = ShuffleSampler(50, seed=2)
    first = list(sampler)
    sampler.set_epoch(1)
    assert sorted(first) == sorted(sampler) == list(range(50)) and list(sampler) != first


def test_bad_arguments_say_what_to_do():
    with pytest.raises(ValueError, match="rank"):
        ClassAwareSampler([0, 1], num_replicas=2, rank=2)
    with pytest.raises(ValueError, match="empty"):
        ClassAwareSampler([], num_samples=4)
