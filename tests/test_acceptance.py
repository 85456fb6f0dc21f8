"""The core issue's accuracy check on the real FashionMNIST (Debian's files)."""

import pytest

from spfl_vmap import Config, run
from spfl_vmap.data.loaders import DEBIAN_FASHION_MNIST

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (DEBIAN_FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file(), reason="needs dataset-fashion-mnist"),
]


def test_fashion_mnist_lr_hetero_reaches_075(tmp_path):
    # spfl run --dataset fashion_mnist --model lr --partition_method hetero --partition_alpha 0.5
    #   --client_num_in_total 100 --client_num_per_round 10 --comm_round 30 --epochs 1 --batch_size 10
    #   --client_optimizer sgd --lr 0.03   (issue: >= 0.75; a per-client-loop FedAvg gets ~0.78-0.80)
    cfg = Config(dataset="fashion_mnist", model="lr", partition_method="hetero", partition_alpha=0.5,
                 client_num_in_total=100, client_num_per_round=10, comm_round=30, epochs=1, batch_size=10,
                 client_optimizer="sgd", lr=0.03, progress=False, device="cpu", out=str(tmp_path / "run"))
    hist = run(cfg)
    assert hist.final["round"] == 30
    assert hist.final["test_acc"] >= 0.75
    for f in ("config.json", "metrics.jsonl", "summary.json", "accuracy.png"):
        assert (tmp_path / "run" / f).is_file()
