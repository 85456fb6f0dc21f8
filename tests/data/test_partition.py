import numpy as np
import pytest

from spfl_vmap.data import partition, partition_stats
from spfl_vmap.errors import DataError


def labels(n=2000, classes=10, seed=0):
    return np.random.default_rng(seed).integers(0, classes, n)


@pytest.mark.parametrize("method", ["homo", "hetero", "shards"])
@pytest.mark.parametrize("K", [1, 7, 50])
def test_partitions_cover_every_sample_once(method, K):
    y = labels()
    parts = partition(y, K, method, alpha=0.5, seed=3)
    allidx = np.concatenate(parts)
    assert len(parts) == K
    assert len(np.unique(allidx)) == len(allidx)  # no sample twice
    if method == "shards":  # remainder of n / 2K is dropped by construction
        assert len(allidx) == (len(y) // (2 * K)) * 2 * K
    else:
        assert sorted(allidx.tolist()) == list(range(len(y)))


@pytest.mark.parametrize("method", ["homo", "hetero", "shards"])
def test_partitions_are_deterministic(method):
    y = labels()
    a = partition(y, 20, method, alpha=0.5, seed=1)
    b = partition(y, 20, method, alpha=0.5, seed=1)
    c = partition(y, 20, method, alpha=0.5, seed=2)
    assert all(np.array_equal(p, q) for p, q in zip(a, b))
    assert not all(np.array_equal(p, q) for p, q in zip(a, c))


def test_hetero_respects_minimum_and_skews_labels():
    y = labels(5000)
    parts = partition(y, 50, "hetero", alpha=0.1, seed=0, min_samples=10)
    assert min(len(p) for p in parts) >= 10
    st = partition_stats(parts, y)
    iid = partition_stats(partition(y, 50, "homo", seed=0), y)
    assert st["classes"]["median"] < iid["classes"]["median"]  # alpha 0.1 concentrates labels
    assert st["samples"]["max"] > st["samples"]["min"]


def test_shards_give_two_label_blocks():
    y = np.repeat(np.arange(10), 100)
    parts = partition(y, 10, "shards", seed=0)
    assert all(len(np.unique(y[p])) <= 2 for p in parts)


def test_impossible_hetero_is_a_clear_error():
    with pytest.raises(DataError, match="at least 10 samples per client"):
        partition(labels(100), 50, "hetero", seed=0, min_samples=10)


def test_hetero_repairs_small_datasets_to_the_minimum():
    """1,437 digits over 100 clients: no Dirichlet(0.5) draw gives everyone 10; the repair does."""
    y = np.random.default_rng(0).integers(0, 10, 1437)
    parts = partition(y, 100, "hetero", alpha=0.5, seed=0, min_samples=10)
    assert min(len(p) for p in parts) >= 10
    allidx = np.concatenate(parts)
    assert sorted(allidx.tolist()) == list(range(len(y)))
    assert partition_stats(parts, y)["classes"]["median"] < 10  # still label-skewed
