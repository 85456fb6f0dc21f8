"""A job of several runs under torch.distributed, for ``tests/test_distributed.py``.

Every process of the job runs ``python tests/distributed_job.py SPEC.json`` with torchrun's
environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``). ``SPEC.json``::

    {"runs": [{"argv": ["run", ...]},                                  # through the spfl command
              {"config": {...}, "result": "PATH.pt"}, ...],            # through spfl_vmap.run
     "attacks": {"cases": [...], "result": "PATH.pt"},                # attacks on sharded cohorts
     "fail": {"rank": 1, "round": 2, "config": {...}}}                 # then a run that fails there

Rank 0 saves each API run's final model, metrics rows and summary to its ``result`` file, and
the attacked rows of every attack case (each rank's own rows gathered back) with its metrics.
"""

from __future__ import annotations

import json
import sys
from typing import Optional

import torch

from spfl_vmap import Config, distributed, run
from spfl_vmap.attacks import Cohort, attack_cohort
from spfl_vmap.cli import main as spfl
from spfl_vmap.stages import Guard, Metrics, RoundContext


class FailAt(Guard):
    """Raises in one rank before one round: an injected failure of that rank alone."""

    name = "fail_at"

    def __init__(self, rank: int, round: int) -> None:
        self.rank, self.round = rank, round

    def before_round(self, ctx: RoundContext) -> tuple[Optional[str], Metrics]:
        if ctx.round == self.round and distributed.rank() == self.rank:
            raise RuntimeError(f"injected failure in rank {self.rank} before round {self.round}")
        return None, {}


def sharded_attacks(cases: list[dict]) -> dict:
    """Each case's attack on a cohort whose rows are split over the ranks by ``case["owner"]``.

    Every rank builds the same ``U (N, D)`` from the case's seed, keeps its own rows and runs
    :func:`attack_cohort` on them; the attacked rows are gathered back for the comparison."""
    out = {}
    for case in cases:
        N, D = len(case["owner"]), case["dim"]
        U = torch.randn(N, D, generator=torch.Generator().manual_seed(case["seed"]))
        mal = torch.zeros(N, dtype=torch.bool)
        mal[case["malicious"]] = True
        sh = distributed.Sharding(torch.tensor(case["owner"]), distributed.rank(), distributed.world_size())
        parts = sh.rows(list(range(N)))
        mine = U[parts[sh.rank]]  # (n_r, D)
        got, metrics = attack_cohort(case["attack"], Cohort.sharded(mine, mal, sh, parts),
                                     generator=torch.Generator().manual_seed(7), **case["kwargs"])
        out[case["id"]] = (sh.gather_rows(got, parts), metrics)
    return out


def main(spec_path: str) -> None:
    spec = json.loads(open(spec_path).read())
    with distributed.exit_on_error("distributed_job"):
        for job in spec["runs"]:
            if "argv" in job:
                if spfl(job["argv"]) != 0:
                    raise RuntimeError(f"spfl {' '.join(job['argv'])} failed")
                continue
            hist = run(Config.from_dict(job["config"]))
            if distributed.is_main():
                torch.save({"model": hist.model_state, "rows": hist.rows, "summary": hist.summary}, job["result"])
        if "attacks" in spec:
            result = sharded_attacks(spec["attacks"]["cases"])
            if distributed.is_main():
                torch.save(result, spec["attacks"]["result"])
        if "fail" in spec:
            fail = spec["fail"]
            run(Config.from_dict(fail["config"]), stages=[FailAt(fail["rank"], fail["round"])])


if __name__ == "__main__":
    main(sys.argv[1])
