import numpy as np

from training.recipe.batching import LengthGroupedBatchSampler


def _padding(batches, lengths):
    return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)


def test_every_index_once_and_seeded():
    lengths = np.random.default_rng(0).integers(3, 60, size=1000)
    sampler = LengthGroupedBatchSampler(lengths, 32, seed=7)
    sampler.set_epoch(1)
    first = list(sampler)
    assert sorted(i for b in first for i in b) == list(range(1000))
    assert len(first) == len(sampler) == 32
    assert list(sampler) == first  # same seed and epoch, same order
    sampler.set_epoch(2)
    assert list(sampler) != first


def test_grouping_cuts_padding():
    lengths = np.random.default_rng(0).integers(3, 60, size=4000)
    grouped = list(LengthGroupedBatchSampler(lengths, 32, seed=1))
    plain = list(LengthGroupedBatchSampler(lengths, 32, seed=1, group_by_length=False))
    assert _padding(grouped, lengths) < 0.2 * _padding(plain, lengths)


def test_evaluation_order_is_by_length_and_complete():
    lengths = [5, 9, 1, 7]
    batches = list(LengthGroupedBatchSampler(lengths, 3, shuffle=False))
    assert batches == [[1, 3, 0], [2]]
