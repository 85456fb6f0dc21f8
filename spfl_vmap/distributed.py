"""The client dimension sharded over ``torch.distributed``, launched by ``torchrun``.

    torchrun --nproc_per_node P -m spfl_vmap run ...        (or: torchrun --no-python ... spfl run ...)

Every process (rank) runs the same round loop on the same config, so it samples the same cohort,
draws the same random numbers (all are functions of ``(seed, purpose, round, client)``) and ends
every round with the same global model. Only the clients' data and their local training are
split:

* **Data.** Clients are assigned to ranks once, balanced by sample counts (greedy
  largest-first bin packing: Graham, "Bounds on Multiprocessing Timing Anomalies", SIAM J. Appl.
  Math. 1969), and each rank packs only its own clients' samples (:func:`pack_owned`), so the
  training data held per process falls with P (:func:`keep_owned` drops the full training
  images once loading is over). The index table ``[K, n_max]`` keeps one row per client of the
  federation, so client ids stay row numbers for every trainer; other ranks' clients have count
  0 there.
* **Training.** Each round a rank trains its own clients of the cohort with the run's trainer
  (:class:`ShardedTrainer`) and the update rows are gathered back in cohort order, so attacks,
  aggregators and the server step run identically on every rank.
* **Evaluation.** Each rank evaluates every P-th test batch; the per-batch counts and loss sums
  are all_reduced and added in batch order (``RoundLoop.evaluate``), the one-process bits.
* **Reduction.** Where the aggregate is a weighted sum of rows (mean / FedAvg, DP-FedAvg's
  clipped sum) and no stage reads the whole ``U``, nothing is gathered: each rank sums its own
  rows and one ``all_reduce`` adds the partial sums (``RobustAggregation.sharded_rows``,
  ``DPFedAvg.sharded_apply``).
  DP-FedAvg's noise is drawn from ``(seed, "dp-fedavg", round)`` after the reduction and added
  once. Krum and Multi-Krum select from ``(N, N)`` distances computed in per-rank row blocks
  (:meth:`Sharding.sqdist`) and reduce the selected rows. The coordinate-wise median and
  trimmed mean work on ``U`` sharded by columns (:meth:`Sharding.columns`, one ``all_to_all``)
  and gather the ``(D,)`` result. Norm clipping, centered clipping, FLTrust, RLR and FLAME (its
  cosine distances in blocks) gather per-row scalars and reduce their sums (the rules' ``on_rows`` cores on sharded
  ``spfl_vmap.aggregators.Rows``). Byzantine attacks (all but
  ``agr_tal``) rewrite each rank's own malicious rows, the benign statistics taken by
  collectives (``spfl_vmap.attacks.Cohort``). Every other rule (Bulyan, geometric median, DnC, FoolsGold, ...)
  and every other update stage sees all of ``U``, gathered.

Equality with the one-process run: local training is per client, so each client's row of ``U``
is bit-identical; with every row gathered (any rule, or ``--dist_gather``) the whole run is
bit-identical. A sum split over ranks adds in another order, so the all_reduce path equals the
one-process run to float rounding (relative 1e-6 of the model), and exactly across ranks: every
rank receives the same reduced bits.

Failures: collectives time out after ``--dist_timeout`` seconds, and :func:`exit_on_error` ends a
failing rank at once with its error and a nonzero status, so torchrun stops the others.

Without torchrun's environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``) with
more than one process, nothing here changes anything. A ``Simulator`` built in each process of
such a job (or where the caller has set up a process group of more than one rank) shards itself
the same way; ``spfl_vmap.run`` also leaves the run directory to rank 0.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
import os
import sys
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist

from .config import SECTIONS, Config, need
from .data import Dataset
from .data.packing import PackedClients, pack_clients
from .engine.local import LocalResult, Trainer
from .errors import ConfigError, SpflError
from .stages import BatchTransform, Metrics, RoundContext

BACKENDS = ("auto", "gloo", "nccl")
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@SECTIONS.register("distributed")
def validate(cfg: Config) -> None:
    """The ``--dist_*`` flags (read only under torchrun)."""
    need(cfg.dist_backend in BACKENDS, f"--dist_backend must be one of {BACKENDS}, got {cfg.dist_backend!r}")
    need(math.isfinite(cfg.dist_timeout) and cfg.dist_timeout > 0, f"--dist_timeout must be > 0 seconds, got {cfg.dist_timeout}")


# ---- the process group ------------------------------------------------------------------------
def launched() -> bool:
    """Started by torchrun (its environment) with more than one process."""
    return all(k in os.environ for k in TORCHRUN_ENV) and int(os.environ["WORLD_SIZE"]) > 1


def active() -> bool:
    """A process group of more than one rank is up."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (from torchrun's environment before the group is up); 0 alone."""
    if active():
        return dist.get_rank()
    return int(os.environ["RANK"]) if launched() else 0


def world_size() -> int:
    if active():
        return dist.get_world_size()
    return int(os.environ["WORLD_SIZE"]) if launched() else 1


def is_main() -> bool:
    """Rank 0: the process that prints and writes the run directory."""
    return rank() == 0


def setup(backend: str, timeout_s: float, device: torch.device) -> torch.device:
    """Join torchrun's process group (once per process) and return the device this rank uses.

    Args:
        backend: ``auto`` (NCCL on CUDA, gloo on the CPU), ``gloo`` or ``nccl``.
        timeout_s: How long a collective waits for the other ranks before it fails.
        device: The run's resolved device; ``cuda`` becomes ``cuda:LOCAL_RANK``.

    Returns:
        ``device`` unchanged without torchrun's environment.
    """
    if not launched():
        return device
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise SpflError(f"local rank {local} has no GPU: this node has {torch.cuda.device_count()}; "
                            f"use --nproc_per_node {torch.cuda.device_count()} or --device cpu")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise ConfigError("--dist_backend nccl needs CUDA tensors; use --dist_backend gloo (or auto) with --device cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend, init_method="env://", timeout=timedelta(seconds=timeout_s))
    return device


@contextmanager
def exit_on_error(prog: str) -> Iterator[None]:
    """Under torchrun, end this process at once when the block raises: the error, with this
    rank's number, goes to stderr, and ``os._exit`` returns a nonzero status (2 for a user error,
    1 otherwise) without running exit handlers that could wait on the other ranks. torchrun then
    stops the other ranks, which would otherwise sit in a collective until ``--dist_timeout``.
    Without torchrun this does nothing."""
    if not launched():
        yield
        return
    where = f"rank {rank()} of {world_size()}"
    try:
        yield
    except SystemExit:  # argparse's --help and usage errors end every rank alike
        raise
    except SpflError as e:
        print(f"{prog}: error ({where}): {e}", file=sys.stderr, flush=True)
        _abort(2)
    except KeyboardInterrupt:
        _abort(130)
    except BaseException:
        traceback.print_exc()
        print(f"{prog}: {where} failed; stopping the job", file=sys.stderr, flush=True)
        _abort(1)


def _abort(code: int) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# ---- which rank owns which client -----------------------------------------------------------
def assign_clients(counts: Sequence[int], world: int) -> list[int]:
    """The owner rank of each client: greedy largest-first bin packing by sample count.

    Clients in decreasing count (ties: lower id first) each go to the rank with the least data so
    far (ties: fewer clients, then lower rank). Deterministic; the loads differ by at most the
    largest count (Graham 1969's LPT rule). Equal counts are dealt round robin, and with ``K >= P``
    every rank gets a client.

    Args:
        counts: ``(K,)`` sample counts of all clients.
        world: Number of ranks P.

    Returns:
        ``(K,)`` ranks in ``[0, P)``.
    """
    heap = [(0, 0, r) for r in range(world)]  # (samples, clients, rank)
    owner = [0] * len(counts)
    for k in sorted(range(len(counts)), key=lambda k: (-counts[k], k)):
        load, n, r = heapq.heappop(heap)
        owner[k] = r
        heapq.heappush(heap, (load + int(counts[k]), n + 1, r))
    return owner


@dataclass(frozen=True)
class Sharding:
    """The static assignment of clients to ranks, and the collectives over the cohort's rows."""

    owner: torch.Tensor  # (K,) long on the CPU: the rank holding each client's data
    rank: int
    world: int

    def rows(self, client_ids: Sequence[int]) -> list[list[int]]:
        """Each rank's positions in the cohort ``client_ids``, ascending: ``[P][n_r]``."""
        own = self.owner[torch.tensor(list(client_ids), dtype=torch.long)]  # (N,)
        return [torch.nonzero(own == r).flatten().tolist() for r in range(self.world)]

    def gather_rows(self, local: torch.Tensor, rows: list[list[int]]) -> torch.Tensor:
        """The cohort's ``(N, ...)`` tensor from each rank's ``local (n_r, ...)`` rows.

        Every rank pads its rows to the largest ``n_r`` for one ``all_gather``; the rows are then
        put back at their cohort positions.
        """
        N = sum(len(r) for r in rows)
        rest = tuple(local.shape[1:])
        n_max = max(len(r) for r in rows)
        if n_max == 0:
            return local.new_empty((0, *rest))
        buf = local.new_zeros((n_max, *rest))
        buf[: len(rows[self.rank])] = local
        parts = [torch.empty_like(buf) for _ in range(self.world)]
        dist.all_gather(parts, buf)
        out = local.new_empty((N, *rest))
        for r, pos in enumerate(rows):
            if pos:
                out[torch.tensor(pos, dtype=torch.long, device=out.device)] = parts[r][: len(pos)]
            parts[r] = buf  # release rank r's block
        return out

    def sqdist(self, local: torch.Tensor, rows: list[list[int]]) -> torch.Tensor:
        """The cohort's ``(N, N)`` squared distances from each rank's rows ``local (n_r, D)``,
        without any rank holding all of ``U``.

        Each rank broadcasts its (padded) rows in turn; every rank computes its row block against
        them, ``|a|^2 + |b|^2 - 2ab`` clamped at 0 as :func:`spfl_kernels.pairwise_sqdist`, so it
        holds its own rows and one other shard at a time. The ``(n_r, N)`` blocks are then
        gathered (``N x N`` floats); the diagonal is exactly 0.
        """
        X = local.float()
        sq = (X * X).sum(1)  # (n_r,)
        N = sum(len(r) for r in rows)
        n_max = max(len(r) for r in rows)
        block = X.new_zeros((X.shape[0], N))  # (n_r, N)
        for src, pos in enumerate(rows):
            buf = X.new_zeros((n_max, X.shape[1]))
            if src == self.rank:
                buf[: X.shape[0]] = X
            dist.broadcast(buf, src)
            if pos and X.shape[0]:
                other = buf[: len(pos)]  # (n_src, D)
                d = (sq[:, None] + (other * other).sum(1)[None, :] - 2.0 * (X @ other.T)).clamp_min_(0.0)
                block[:, torch.tensor(pos, dtype=torch.long, device=X.device)] = d
            del buf
        D = self.gather_rows(block, rows)  # (N, N)
        D.fill_diagonal_(0.0)
        return D

    def columns(self, local: torch.Tensor, rows: list[list[int]]) -> tuple[torch.Tensor, tuple[int, int]]:
        """Every cohort row's values in this rank's block of columns, from each rank's rows
        ``local (n_r, D)``: ``(N, hi - lo)`` and ``(lo, hi)``.

        The columns are split into P contiguous blocks (``[r D / P, (r + 1) D / P)``) and one
        ``all_to_all`` sends each rank's rows' part of every block to that block's rank: ``U``
        sharded by columns instead of rows, ``N x D / P`` values per rank, for coordinate-wise
        rules (median, trimmed mean).
        """
        D, P, r = local.shape[1], self.world, self.rank
        bounds = [q * D // P for q in range(P + 1)]
        lo, hi = bounds[r], bounds[r + 1]
        counts = [len(pos) for pos in rows]
        send = torch.cat([local[:, bounds[q] : bounds[q + 1]].reshape(-1) for q in range(P)])  # (n_r * D,)
        recv = local.new_empty(sum(counts) * (hi - lo))  # (N * (hi - lo),)
        dist.all_to_all_single(recv, send, [counts[r] * (bounds[q + 1] - bounds[q]) for q in range(P)],
                               [n * (hi - lo) for n in counts])
        out = local.new_empty((sum(counts), hi - lo))
        offset = 0
        for pos in rows:
            k = len(pos) * (hi - lo)
            if k:
                out[torch.tensor(pos, dtype=torch.long, device=out.device)] = recv[offset : offset + k].view(len(pos), hi - lo)
            offset += k
        return out, (lo, hi)

    def join_columns(self, part: torch.Tensor, dim: int) -> torch.Tensor:
        """The ``(dim,)`` vector from each rank's block ``part (hi - lo,)`` of :meth:`columns`."""
        P = self.world
        bounds = [q * dim // P for q in range(P + 1)]
        width = max(bounds[q + 1] - bounds[q] for q in range(P))
        buf = part.new_zeros(width)
        buf[: part.numel()] = part
        parts = [torch.empty_like(buf) for _ in range(P)]
        dist.all_gather(parts, buf)
        return torch.cat([parts[q][: bounds[q + 1] - bounds[q]] for q in range(P)])

    def sum(self, partial: torch.Tensor) -> torch.Tensor:
        """``partial`` summed over the ranks (every rank receives the same bits)."""
        return self.reduce(partial, "sum")

    def reduce(self, t: torch.Tensor, op: str) -> torch.Tensor:
        """``t`` reduced elementwise over the ranks: ``op`` is ``sum``, ``max`` or ``min``."""
        out = t.clone()
        dist.all_reduce(out, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op])
        return out


def barrier() -> None:
    """Wait for every rank (nothing in one process)."""
    if active():
        dist.barrier()


def all_reduce(t: torch.Tensor, op: Any) -> torch.Tensor:
    """``t`` reduced over the ranks with ``op`` (a ``dist.ReduceOp``); ``t`` itself in one process."""
    if not active():
        return t
    out = t.clone()
    dist.all_reduce(out, op=op)
    return out


# ---- the data each rank holds ---------------------------------------------------------------
@dataclass
class ShardedClients(PackedClients):
    """This rank's clients' data (``x``, ``y``: their samples only); ``index`` and ``counts`` keep
    one row per client of the federation, with count 0 for the clients other ranks hold."""

    sharding: Sharding = None  # type: ignore[assignment]


def pack_owned(x: torch.Tensor, y: torch.Tensor, parts: list[np.ndarray], device: torch.device) -> PackedClients:
    """:func:`~spfl_vmap.data.packing.pack_clients` of every client in one process; under torchrun
    only this rank's clients (:class:`ShardedClients`), assigned by :func:`assign_clients`.

    Args:
        x: ``(n_train, C, H, W)`` the training samples.
        y: ``(n_train,)`` labels.
        parts: ``(K,)`` each client's sample indices into ``x``.
        device: Where the packed data lives.
    """
    if not active():
        return pack_clients(x, y, parts, device)
    P, r, K = world_size(), rank(), len(parts)
    counts = [len(p) for p in parts]
    if K < P:
        raise ConfigError(f"{K} clients cannot be shared by {P} processes; use at most {K} processes (--nproc_per_node)")
    owner = assign_clients(counts, P)
    mine = [k for k in range(K) if owner[k] == r]
    samples = np.concatenate([np.asarray(parts[k], dtype=np.int64) for k in mine])  # this rank's samples, client by client
    index = np.zeros((K, max(1, max(counts[k] for k in mine))), dtype=np.int64)
    local_counts = np.zeros(K, dtype=np.int64)
    at = 0
    for k in mine:
        index[k, : counts[k]] = np.arange(at, at + counts[k])
        local_counts[k] = counts[k]
        at += counts[k]
    take = torch.from_numpy(samples)
    return ShardedClients(
        x=x[take].to(device).contiguous(), y=y[take].to(device),
        index=torch.from_numpy(index).to(device), counts=torch.from_numpy(local_counts).to(device),
        sharding=Sharding(torch.tensor(owner, dtype=torch.long), r, P),
    )


def keep_owned(ds: Dataset, packed: PackedClients) -> Dataset:
    """``ds`` as a rank keeps it: under sharding without the training images (the rank's own are
    in ``packed.x``; ``x_train`` becomes an empty ``(0, C, H, W)`` tensor), so the full training
    set is freed once loading is over. ``ds`` itself in one process."""
    if not isinstance(packed, ShardedClients):
        return ds
    return dataclasses.replace(ds, x_train=ds.x_train.new_empty((0, *ds.x_train.shape[1:])))


def extremes(x: torch.Tensor) -> torch.Tensor:
    """What statistics of the training images (per-channel min and max) should read.

    In one process ``x (n, C, H, W)`` itself. Under sharding a ``(2, C, 1, 1)`` stand-in holding
    the per-channel minimum and maximum over every rank's samples, so ``amin`` / ``amax`` over
    ``(0, 2, 3)`` give the whole training set's values (the backdoor trigger's white, the
    pixel range of datasets without constants).
    """
    if not active():
        return x
    C = x.shape[1]
    inf = torch.full((C,), math.inf, dtype=x.dtype, device=x.device)
    lo = x.amin(dim=(0, 2, 3)) if len(x) else inf
    hi = x.amax(dim=(0, 2, 3)) if len(x) else -inf
    lo, hi = all_reduce(lo, dist.ReduceOp.MIN), all_reduce(hi, dist.ReduceOp.MAX)
    return torch.stack([lo, hi])[:, :, None, None]


# ---- training this rank's part of the cohort --------------------------------------------------
def cohort_subset(ctx: RoundContext, rows: Sequence[int]) -> RoundContext:
    """``ctx`` restricted to the cohort positions ``rows``: their client ids, counts, malicious
    flags and weights (and a vectorized sweep's per-row models and hyperparameters)."""
    idx = torch.tensor(list(rows), dtype=torch.long, device=ctx.device)
    change: dict[str, Any] = {
        "client_ids": [ctx.client_ids[i] for i in rows],
        "counts": [ctx.counts[i] for i in rows],
        "malicious": ctx.malicious[idx.to(ctx.malicious.device)],
        "weights": ctx.weights[idx.to(ctx.weights.device)],
    }
    for name in ("row_params", "row_hypers"):
        per_row = getattr(ctx, name, None)
        if per_row is not None:
            change[name] = {k: v[idx.to(v.device)] for k, v in per_row.items()}
    return dataclasses.replace(ctx, **change)


class CohortRows(BatchTransform):
    """A batch transform seen from a sub-cohort: the trainer's ``rows`` (positions in the
    sub-context) become positions in the whole cohort, and the transform gets the whole round's
    context, so rules that read the cohort (DBA's rank among the round's malicious clients)
    act as in one process."""

    def __init__(self, inner: BatchTransform, ctx: RoundContext, rows: torch.Tensor) -> None:
        self.inner, self.ctx, self.rows = inner, ctx, rows  # rows (n_r,): cohort positions
        self.name = inner.name

    def apply(
        self, ctx: RoundContext, x: torch.Tensor, y: torch.Tensor, rows: torch.Tensor, valid: torch.Tensor
    ) -> tuple[tuple[torch.Tensor, torch.Tensor], Metrics]:
        return self.inner.apply(self.ctx, x, y, self.rows[rows.to(self.rows.device)], valid)


class ShardedTrainer:
    """The engine's trainer interface over another trainer that trains only this rank's clients.

    ``train(ctx)`` splits the cohort by ownership (:class:`Sharding`), trains this rank's part as
    a sub-context with the wrapped trainer (batch transforms see the whole cohort through
    :class:`CohortRows`) and gathers the rows back in cohort order: ``U (N, D)`` and the training
    losses ``(N,)``. With ``reduce`` (set by the builder for sum aggregations) ``U`` stays this
    rank's rows ``(n_r, D)``, which the aggregation's ``sharded_apply`` reduces.

    Args:
        inner: The run's trainer over the rank's :class:`ShardedClients`.
        sharding: The assignment of clients to ranks.
    """

    def __init__(self, inner: Trainer, sharding: Sharding) -> None:
        self.inner, self.sharding = inner, sharding
        self.reduce = False
        self.path = "all_gather of U"  # how the round's rows meet (``describe``); set with ``reduce``

    @property
    def strategy(self) -> str:
        return self.inner.strategy

    @property
    def chunk(self) -> int:
        return self.inner.chunk

    def train(self, ctx: RoundContext, transforms: Sequence[BatchTransform] = ()) -> LocalResult:
        rows = self.sharding.rows(ctx.client_ids)
        mine = rows[self.sharding.rank]
        if mine:
            pos = torch.tensor(mine, dtype=torch.long, device=ctx.device)
            local = self.inner.train(cohort_subset(ctx, mine), [CohortRows(t, ctx, pos) for t in transforms])
        else:  # none of this round's clients live here
            empty = torch.empty(0, ctx.spec.dim, device=ctx.device)
            local = LocalResult(empty, torch.empty(0, device=ctx.device), self.inner.strategy, self.inner.chunk)
        loss = self.sharding.gather_rows(local.train_loss, rows)  # (N,)
        U = local.U if self.reduce else self.sharding.gather_rows(local.U, rows)  # (n_r, D) or (N, D)
        return dataclasses.replace(local, U=U, train_loss=loss)

    def describe(self) -> dict[str, Any]:
        return {"processes": self.sharding.world, "backend": dist.get_backend(),
                "aggregation": self.path}


def sharded_trainer(trainer: Trainer, packed: PackedClients) -> Trainer:
    """``trainer`` wrapped in a :class:`ShardedTrainer` when ``packed`` is a rank's shard."""
    return ShardedTrainer(trainer, packed.sharding) if isinstance(packed, ShardedClients) else trainer


def describe(trainer: Trainer) -> dict[str, Any]:
    """``{"distributed": ...}`` for ``config.json`` and the summary; empty in one process."""
    return {"distributed": trainer.describe()} if isinstance(trainer, ShardedTrainer) else {}
