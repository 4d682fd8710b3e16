import numpy as np
import pytest

from srmoa_dist.experts.placement import jump_hash, shard_of

# Generated from the reference C++ code (Lamping & Veach), as published with dgryski/go-jump's tests:
# key -> buckets for n_buckets = 1, 2, ...
REFERENCE = {
    0: [0] * 20,
    1: [0, 0, 0, 0, 0, 0, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 17, 17],
    0xDEADBEEF: [0, 1, 2, 3, 3, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 16, 16, 16],
    0x0DDC0FFEEBADF00D: [0, 1, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 15, 15, 15, 15],
}


@pytest.mark.parametrize("key", list(REFERENCE))
def test_reference_values(key):
    want = REFERENCE[key]
    assert [jump_hash(key, n + 1) for n in range(len(want))] == want
    keys = np.array([key], dtype=np.uint64)
    assert [int(shard_of(keys, n + 1)[0]) for n in range(len(want))] == want


@pytest.mark.parametrize("n", [1, 2, 3, 10, 1000])
def test_vectorised_equals_scalar(n):
    ids = np.random.default_rng(n).integers(0, 2**63 - 1, 3000)
    ids[:5] = [0, 1, 2, 3, 2**63 - 1]
    want = [jump_hash(int(i), n) for i in ids]
    np.testing.assert_array_equal(shard_of(ids, n), want)
    np.testing.assert_array_equal(shard_of(ids[:7], n), want[:7])  # the small-batch path


def test_deterministic_and_shape_preserving():
    ids = np.arange(24).reshape(4, 6)
    a, b = shard_of(ids, 5), shard_of(ids.copy(), 5)
    assert a.shape == (4, 6) and a.dtype == np.int64
    np.testing.assert_array_equal(a, b)
    assert shard_of(np.array([], dtype=np.int64), 3).shape == (0,)
    assert shard_of([], 3).shape == (0,)
    assert shard_of([5, 6], 3).tolist() == [jump_hash(5, 3), jump_hash(6, 3)]


@pytest.mark.parametrize("n", [1, 4, 7, 16])
def test_balanced_and_minimal_movement(n):
    ids = np.arange(200_000)
    before, after = shard_of(ids, n), shard_of(ids, n + 1)
    counts = np.bincount(after, minlength=n + 1)
    assert counts.min() > 0.95 * len(ids) / (n + 1) and counts.max() < 1.05 * len(ids) / (n + 1)
    moved = before != after
    assert abs(moved.mean() - 1 / (n + 1)) < 0.01
    assert (after[moved] == n).all()  # ids only move to the new shard


def test_random_ids_balanced():
    ids = np.random.default_rng(0).integers(0, 2**62, 100_000)
    counts = np.bincount(shard_of(ids, 8), minlength=8)
    assert counts.min() > 0.95 * 12_500 and counts.max() < 1.05 * 12_500


def test_bad_arguments():
    with pytest.raises(ValueError, match="n_buckets must be positive, got 0"):
        jump_hash(1, 0)
    with pytest.raises(ValueError, match="n_shards must be a positive integer, got 0"):
        shard_of([1], 0)
    with pytest.raises(ValueError, match="ids must be integers"):
        shard_of(np.array([1.5]), 2)
