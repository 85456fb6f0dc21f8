"""Splitting a dataset's training indices among clients.

All partitions are deterministic for a seed and cover every training sample exactly once
(``shards`` drops the remainder when the sample count is not a multiple of the shard count).
"""

from __future__ import annotations

import numpy as np

from ..errors import DataError
from ..rng import derive_seed


def partition(
    labels: np.ndarray, num_clients: int, method: str, alpha: float = 0.5, seed: int = 0, min_samples: int = 10
) -> list[np.ndarray]:
    """Return one int64 index array per client.

    Args:
        labels: ``[n]`` integer labels of the training set.
        num_clients: number of clients K.
        method: ``homo`` (IID), ``hetero`` (Dirichlet) or ``shards`` (pathological non-IID).
        alpha: Dirichlet concentration for ``hetero``.
        seed: partition seed.
        min_samples: minimum client size for ``hetero``.
    """
    rng = np.random.default_rng(derive_seed(seed, "partition", method))
    n = len(labels)
    if n < num_clients:
        raise DataError(f"cannot give {num_clients} clients at least one sample each from {n} training samples")
    if method == "homo":
        return [np.sort(p) for p in np.array_split(rng.permutation(n), num_clients)]
    if method == "hetero":
        return dirichlet_partition(labels, num_clients, alpha, rng, min_samples)
    if method == "shards":
        return shard_partition(labels, num_clients, rng)
    raise DataError(f"unknown partition method {method!r}")


def dirichlet_partition(
    labels: np.ndarray, num_clients: int, alpha: float, rng: np.random.Generator, min_samples: int, max_tries: int = 100
) -> list[np.ndarray]:
    """Label-skewed split: per class, client shares ~ Dir(alpha) (Hsu et al. 2019; Yurochkin et al. 2019).

    As in the original toolkit, a client already holding more than ``n / K`` samples gets no
    share of further classes, and the draw repeats until every client has ``min_samples``.
    When ``max_tries`` draws all leave some client short (small datasets with many clients),
    the draw with the largest minimum is repaired: short clients take random samples from the
    currently largest client until they reach ``min_samples``. This keeps the label skew of the
    draw and changes only as many samples as the shortfall.
    """
    n = len(labels)
    if n < num_clients * min_samples:
        raise DataError(
            f"hetero partition needs at least {min_samples} samples per client: {num_clients} clients x {min_samples} "
            f"> {n} training samples; use fewer clients, a smaller --partition_min_samples, or --partition_method homo"
        )
    classes = np.unique(labels)
    by_class = [np.flatnonzero(labels == c) for c in classes]
    best: list[np.ndarray] | None = None
    for _ in range(max_tries):
        buckets: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        sizes = np.zeros(num_clients, dtype=np.int64)
        for idx in by_class:
            idx = rng.permutation(idx)
            p = rng.dirichlet(np.full(num_clients, alpha))
            p = p * (sizes < n / num_clients)
            p = p / p.sum() if p.sum() > 0 else np.full(num_clients, 1.0 / num_clients)
            cuts = (np.cumsum(p) * len(idx)).astype(np.int64)[:-1]
            for k, part in enumerate(np.split(idx, cuts)):
                buckets[k].append(part)
                sizes[k] += len(part)
        parts = [np.concatenate(b) for b in buckets]
        if sizes.min() >= min_samples:
            return [np.sort(p) for p in parts]
        if best is None or sizes.min() > min(len(p) for p in best):
            best = parts
    assert best is not None
    return [np.sort(p) for p in top_up(best, min_samples, rng)]


def top_up(parts: list[np.ndarray], min_samples: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Move random samples from the largest clients to clients below ``min_samples``."""
    parts = [rng.permutation(p) for p in parts]
    for k in range(len(parts)):
        while len(parts[k]) < min_samples:
            donor = int(np.argmax([len(p) for p in parts]))
            take = min(min_samples - len(parts[k]), len(parts[donor]) - min_samples)
            parts[k] = np.concatenate([parts[k], parts[donor][:take]])
            parts[donor] = parts[donor][take:]
    return parts


def shard_partition(labels: np.ndarray, num_clients: int, rng: np.random.Generator, shards_per_client: int = 2) -> list[np.ndarray]:
    """McMahan et al. 2017's pathological non-IID split: sort by label, cut 2K shards, deal 2 each."""
    num_shards = shards_per_client * num_clients
    if len(labels) < num_shards:
        raise DataError(f"shards partition needs >= {num_shards} samples, have {len(labels)}")
    order = np.argsort(labels, kind="stable")
    shard_size = len(labels) // num_shards
    shards = order[: shard_size * num_shards].reshape(num_shards, shard_size)
    assign = rng.permutation(num_shards).reshape(num_clients, shards_per_client)
    return [np.sort(shards[a].reshape(-1)) for a in assign]


def partition_stats(parts: list[np.ndarray], labels: np.ndarray) -> dict[str, dict[str, float]]:
    """Min/median/max of samples and distinct classes per client."""
    sizes = np.array([len(p) for p in parts])
    classes = np.array([len(np.unique(labels[p])) for p in parts])
    def mmm(a: np.ndarray) -> dict[str, float]:
        return {"min": int(a.min()), "median": float(np.median(a)), "max": int(a.max())}
    return {"samples": mmm(sizes), "classes": mmm(classes)}


def stratified_holdout(labels: np.ndarray, n: int, num_classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A class-stratified sample of ``n`` training indices held out for the server, and the rest.

    Each class gets ``n // num_classes`` samples, and the first ``n % num_classes`` classes one
    more (FLTrust's root set, Cao et al. 2021, and FLPoison's 100 class-stratified samples),
    drawn without replacement with a generator seeded by ``(seed, "root_set")``.

    Args:
        labels: ``[n_train]`` integer labels.
        n: root-set size, ``0 <= n``.
        num_classes: number of classes.
        seed: run seed.

    Returns:
        ``(root indices [n], remaining indices [n_train - n])``, both sorted int64.

    Raises:
        DataError: a class has fewer samples than its share.
    """
    if n <= 0:
        return np.zeros(0, dtype=np.int64), np.arange(len(labels), dtype=np.int64)
    rng = np.random.default_rng(derive_seed(seed, "root_set"))
    picked = []
    for c in range(num_classes):
        share = n // num_classes + (1 if c < n % num_classes else 0)
        pool = np.flatnonzero(labels == c)
        if len(pool) < share:
            raise DataError(f"the server root set needs {share} samples of class {c}, but the training set has {len(pool)}; "
                            f"lower --root_samples")
        picked.append(rng.choice(pool, size=share, replace=False))
    root = np.sort(np.concatenate(picked)).astype(np.int64)
    rest = np.setdiff1d(np.arange(len(labels), dtype=np.int64), root, assume_unique=True)
    return root, rest
