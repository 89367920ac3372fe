"""Aspect-ratio grouped distributed sampler: grouping, sharding, determinism, resume position."""

from __future__ import annotations

from training.sampler import GroupedBatchSampler

GROUPS = [0, 1, 1, 0, 1, 1, 1, 0, 0, 1, 1]


def test_batches_group_by_aspect_except_the_leftover() -> None:
    sampler = GroupedBatchSampler(GROUPS, 2, seed=3)
    batches = list(sampler)
    assert sorted(i for b in batches for i in b) == list(range(len(GROUPS)))
    full_groups = [{GROUPS[i] for i in b} for b in batches[:-1] if len(b) == 2]
    mixed = [b for b in batches if len({GROUPS[i] for i in b}) > 1]
    assert len(mixed) <= 1  # only the leftover batch may mix
    assert sum(len(g) == 1 for g in full_groups) >= len(full_groups) - 1
    assert len(batches) == sampler.batches_per_epoch() == 6


def test_ranks_are_disjoint_cover_and_yield_equal_counts() -> None:
    per_rank = [list(GroupedBatchSampler(GROUPS, 2, world_size=3, rank=r, seed=1)) for r in range(3)]
    assert len({len(b) for b in per_rank}) == 1
    seen = [i for batches in per_rank for b in batches for i in b]
    assert set(seen) == set(range(len(GROUPS)))
    assert len(seen) == 12  # padded to a multiple of the world size, as mmengine's DefaultSampler


def test_epochs_shuffle_deterministically() -> None:
    a, b = GroupedBatchSampler(GROUPS, 2, seed=7), GroupedBatchSampler(GROUPS, 2, seed=7)
    a.set_epoch(1)
    b.set_epoch(1)
    assert list(a) == list(b)
    b.set_epoch(2)
    assert list(a) != list(b)


def test_resume_position_gives_the_remaining_batches() -> None:
    full = GroupedBatchSampler(GROUPS, 2, seed=5)
    full.set_epoch(4)
    expected = list(full)[2:]
    resumed = GroupedBatchSampler(GROUPS, 2, seed=5)
    resumed.set_position(4, 2)
    assert list(resumed) == expected
    assert len(resumed) == len(expected)
