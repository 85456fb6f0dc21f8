"""Loaders read standard file layouts; a missing dataset is one clear error."""

import gzip
import pickle
import struct

import numpy as np
import pytest
import torch

from spfl_vmap.data import load_dataset
from spfl_vmap.data.loaders import DEBIAN_FASHION_MNIST, read_idx
from spfl_vmap.errors import DataError


def write_idx(path, arr: np.ndarray, gz: bool):
    header = bytes([0, 0, 8, arr.ndim]) + b"".join(struct.pack(">I", d) for d in arr.shape)
    data = header + arr.astype(np.uint8).tobytes()
    (gzip.open if gz else open)(path, "wb").write(data)


def make_mnist_layout(root, folder, n_train=30, n_test=10, gz=True):
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    sfx = ".gz" if gz else ""
    xtr = rng.integers(0, 256, (n_train, 28, 28))
    write_idx(raw / f"train-images-idx3-ubyte{sfx}", xtr, gz)
    write_idx(raw / f"train-labels-idx1-ubyte{sfx}", rng.integers(0, 10, n_train), gz)
    write_idx(raw / f"t10k-images-idx3-ubyte{sfx}", rng.integers(0, 256, (n_test, 28, 28)), gz)
    write_idx(raw / f"t10k-labels-idx1-ubyte{sfx}", rng.integers(0, 10, n_test), gz)
    return xtr


@pytest.mark.parametrize("gz", [True, False])
def test_torchvision_mnist_layout(tmp_path, gz):
    xtr = make_mnist_layout(tmp_path, "MNIST", gz=gz)
    ds = load_dataset("mnist", str(tmp_path))
    assert ds.x_train.shape == (30, 1, 28, 28) and ds.x_test.shape == (10, 1, 28, 28)
    expect = (torch.tensor(xtr[0], dtype=torch.float32) / 255 - 0.1307) / 0.3081
    assert torch.allclose(ds.x_train[0, 0], expect, atol=1e-6)
    rgb = load_dataset("mnist_rgb", str(tmp_path))
    assert rgb.x_train.shape == (30, 3, 32, 32) and torch.equal(rgb.x_train[:, 0], rgb.x_train[:, 2])


def test_torchvision_fashion_layout(tmp_path):
    make_mnist_layout(tmp_path, "FashionMNIST")
    ds = load_dataset("fashion_mnist", str(tmp_path))
    assert ds.source.endswith("FashionMNIST/raw") and ds.num_classes == 10


def test_cifar_python_layout(tmp_path):
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        pickle.dump({"data": rng.integers(0, 256, (4, 3072)).astype(np.uint8), "labels": list(range(4))}, open(d / name, "wb"))
    ds = load_dataset("cifar10", str(tmp_path))
    assert ds.x_train.shape == (20, 3, 32, 32) and ds.x_test.shape == (4, 3, 32, 32)


@pytest.mark.parametrize("name,hint", [("mnist", "--download"), ("cifar10", "--download"), ("cifar100", "--download")])
def test_missing_dataset_error_says_where_and_how(tmp_path, name, hint):
    with pytest.raises(DataError) as e:
        load_dataset(name, str(tmp_path / "empty"))
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_path / "empty") in msg and hint in msg


def test_missing_fashion_mentions_debian_package(tmp_path, monkeypatch):
    monkeypatch.setattr("spfl_vmap.data.loaders.DEBIAN_FASHION_MNIST", tmp_path / "nope")
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion_mnist", str(tmp_path))


def test_truncated_idx_is_a_clear_error(tmp_path):
    p = tmp_path / "bad-idx"
    p.write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 9, 1, 2]))
    with pytest.raises(DataError, match="truncated"):
        read_idx(p)


def test_digits_and_synthetic_always_available():
    d = load_dataset("digits")
    assert d.x_train.shape[1:] == (1, 8, 8) and len(d.y_train) + len(d.y_test) == 1797
    s1, s2 = load_dataset("synthetic", synthetic_train=50, synthetic_test=10), load_dataset("synthetic", synthetic_train=50, synthetic_test=10)
    assert torch.equal(s1.x_train, s2.x_train)


@pytest.mark.skipif(not (DEBIAN_FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file(), reason="Debian FashionMNIST not installed")
def test_debian_fashion_mnist_is_the_real_dataset():
    ds = load_dataset("fashion_mnist", "/nonexistent")
    assert ds.x_train.shape == (60000, 1, 28, 28) and ds.x_test.shape == (10000, 1, 28, 28)
    assert torch.bincount(ds.y_train).tolist() == [6000] * 10  # FashionMNIST is class-balanced
