"""pytest-benchmark: one round of a backdoor run against one round of the clean run of the same size.

Run with ``pytest bench/bench_backdoor.py`` (not part of ``scripts/test``). Compare the
``badnets`` / ``dba`` rows with the ``clean`` row of the same model; ``spfl bench backdoor``
prints the ratios directly, alternating the variants in one process.
"""

from __future__ import annotations

import pytest
import torch

from spfl_vmap import Config, Simulator
from spfl_vmap.data import load_dataset

CUDA = torch.cuda.is_available()
DATASET = "fashion_mnist"


@pytest.fixture(scope="module")
def data():
    try:
        return load_dataset(DATASET, "data")
    except Exception as e:  # the benchmark needs the real files (scripts/test installs them)
        pytest.skip(f"{DATASET} not available: {e}")


@pytest.mark.parametrize("model", ["lr", "cnn"])
@pytest.mark.parametrize("variant", ["clean", "badnets", "dba"])
def test_round(benchmark, data, model: str, variant: str) -> None:
    attack = {} if variant == "clean" else {"bd_attack": variant, "by_frac": 0.1}
    cfg = Config(dataset=DATASET, model=model, client_num_in_total=100, client_num_per_round=10, comm_round=20,
                 frequency_of_the_test=10**6, progress=False, device="cuda" if CUDA else "cpu", **attack)
    sim = Simulator(cfg, data)
    sim.step()  # warm-up

    def call():
        m = sim.step()
        if CUDA:
            torch.cuda.synchronize()
        return m

    benchmark.pedantic(call, rounds=3, warmup_rounds=0)
    benchmark.extra_info.update({"variant": variant, "strategy": sim.trainer.strategy})
