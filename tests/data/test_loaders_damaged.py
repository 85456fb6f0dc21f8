"""Damaged dataset files are one-line DataErrors naming the file, never tracebacks or wrong data.

Each test builds a valid layout in ``tmp_path``, damages one file, and loads through
``load_dataset(..., data_dir=tmp_path)``. MNIST is used for the IDX cases because it has no
system fallback, so the damaged tmp files are the ones read.
"""

import gzip
import pickle
import struct

import numpy as np
import pytest

from spfl_vmap.data import load_dataset
from spfl_vmap.errors import DataError

IMAGES = "train-images-idx3-ubyte"
LABELS = "train-labels-idx1-ubyte"


def idx_bytes(arr: np.ndarray, dtype_code: int = 8) -> bytes:
    header = bytes([0, 0, dtype_code, arr.ndim]) + b"".join(struct.pack(">I", d) for d in arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def make_idx_layout(raw, n_train=30, n_test=10, gz=True):
    """A valid MNIST layout in ``raw``; returns ``{stem: path}``."""
    raw.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = {
        IMAGES: rng.integers(0, 256, (n_train, 28, 28)),
        LABELS: rng.integers(0, 10, n_train),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test),
    }
    paths = {}
    for stem, arr in arrays.items():
        paths[stem] = raw / (stem + (".gz" if gz else ""))
        data = idx_bytes(arr)
        paths[stem].write_bytes(gzip.compress(data) if gz else data)
    return paths


def load_error(name, data_dir) -> str:
    with pytest.raises(DataError) as e:
        load_dataset(name, data_dir=str(data_dir))
    msg = str(e.value)
    assert "\n" not in msg
    return msg


@pytest.fixture
def mnist(tmp_path):
    return make_idx_layout(tmp_path / "MNIST" / "raw")


@pytest.fixture
def mnist_raw(tmp_path):
    return make_idx_layout(tmp_path / "MNIST" / "raw", gz=False)


# ---- gzip / file level -------------------------------------------------------------------------
def test_truncated_gz(tmp_path, mnist):
    p = mnist[IMAGES]
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])  # an interrupted download
    msg = load_error("mnist", tmp_path)
    assert str(p) in msg and "--download" in msg
    with pytest.raises(DataError, match=r"truncated: the gzip stream ends"):
        load_dataset("mnist", data_dir=str(tmp_path))


def test_garbage_with_gz_name(tmp_path, mnist):
    mnist[LABELS].write_bytes(b"this is not gzip at all" * 10)
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte\.gz is not a valid gzip file"):
        load_dataset("mnist", data_dir=str(tmp_path))


def test_corrupt_deflate_data(tmp_path, mnist):
    good = mnist[IMAGES].read_bytes()
    mnist[IMAGES].write_bytes(good[:10] + b"\xff" * 30 + good[40:])  # valid gzip header, broken payload
    with pytest.raises(DataError, match=r"is corrupt: its gzip data does not decompress"):
        load_dataset("mnist", data_dir=str(tmp_path))


@pytest.mark.parametrize("gz", [True, False])
def test_empty_idx_file(tmp_path, gz):
    paths = make_idx_layout(tmp_path / "MNIST" / "raw", gz=gz)
    paths[IMAGES].write_bytes(b"")
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte(\.gz)? is empty"):
        load_dataset("mnist", data_dir=str(tmp_path))


def test_gzipped_content_without_gz_name_gets_a_hint(tmp_path, mnist_raw):
    p = mnist_raw[IMAGES]
    p.write_bytes(gzip.compress(p.read_bytes()))
    with pytest.raises(DataError, match=r"not an IDX file .*looks gzipped, so name it \*\.gz"):
        load_dataset("mnist", data_dir=str(tmp_path))


# ---- IDX header and payload --------------------------------------------------------------------
def test_label_file_where_images_expected(tmp_path, mnist_raw):
    mnist_raw[IMAGES].write_bytes(mnist_raw[LABELS].read_bytes())
    expect = r"train-images-idx3-ubyte is an idx1 file \(magic 0x00000801.*idx3 file \(magic 0x00000803"
    with pytest.raises(DataError, match=expect):
        load_dataset("mnist", data_dir=str(tmp_path))


def test_image_file_where_labels_expected(tmp_path, mnist_raw):
    mnist_raw[LABELS].write_bytes(mnist_raw[IMAGES].read_bytes())
    with pytest.raises(DataError, match=r"is an idx3 file .*images.* where an idx1 file .*labels"):
        load_dataset("mnist", data_dir=str(tmp_path))


def test_wrong_dtype_code(tmp_path, mnist_raw):
    mnist_raw[IMAGES].write_bytes(idx_bytes(np.zeros((30, 28, 28)), dtype_code=0x0D))  # 0x0D: float32
    with pytest.raises(DataError, match=r"dtype code 0x0d, expected 0x08"):
        load_dataset("mnist", data_dir=str(tmp_path))


def test_bad_magic(tmp_path, mnist_raw):
    mnist_raw[LABELS].write_bytes(b"\x12\x34" + mnist_raw[LABELS].read_bytes()[2:])
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte is not an IDX file \(magic 0x12340801"):
        load_dataset("mnist", data_dir=str(tmp_path))


def test_payload_shorter_than_header(tmp_path, mnist_raw):
    p = mnist_raw[IMAGES]
    p.write_bytes(p.read_bytes()[:-100])
    with pytest.raises(DataError, match=r"truncated: expected 23520 values, found 23420"):
        load_dataset("mnist", data_dir=str(tmp_path))


def test_payload_longer_than_header(tmp_path, mnist_raw):
    p = mnist_raw[LABELS]
    p.write_bytes(p.read_bytes() + b"\x01\x02\x03")
    with pytest.raises(DataError, match=r"has 3 bytes beyond the 30 values its header declares"):
        load_dataset("mnist", data_dir=str(tmp_path))


def test_header_cut_short(tmp_path, mnist_raw):
    mnist_raw[IMAGES].write_bytes(bytes([0, 0, 8, 3, 0, 0]))
    with pytest.raises(DataError, match=r"truncated inside its header"):
        load_dataset("mnist", data_dir=str(tmp_path))


def test_images_of_the_wrong_size(tmp_path, mnist_raw):
    mnist_raw[IMAGES].write_bytes(idx_bytes(np.zeros((30, 32, 32))))
    with pytest.raises(DataError, match=r"holds items of shape 32x32, expected 28x28"):
        load_dataset("mnist", data_dir=str(tmp_path))


# ---- cross-file and label checks ---------------------------------------------------------------
def test_label_count_differs_from_image_count(tmp_path, mnist):
    mnist[LABELS].write_bytes(gzip.compress(idx_bytes(np.zeros(15))))
    msg = load_error("mnist", tmp_path)
    assert str(mnist[IMAGES]) in msg and str(mnist[LABELS]) in msg
    with pytest.raises(DataError, match=r"holds 30 images but .* holds 15 labels"):
        load_dataset("mnist_rgb", data_dir=str(tmp_path))


@pytest.mark.parametrize("bad", [10, 255])
def test_label_out_of_class_range(tmp_path, mnist_raw, bad):
    y = np.zeros(10)
    y[7] = bad
    mnist_raw["t10k-labels-idx1-ubyte"].write_bytes(idx_bytes(y))
    with pytest.raises(DataError, match=rf"t10k-labels-idx1-ubyte has label {bad}, outside 0\.\.9"):
        load_dataset("mnist", data_dir=str(tmp_path))


def test_damaged_tmp_fashion_files_are_the_ones_read(tmp_path):
    paths = make_idx_layout(tmp_path / "FashionMNIST" / "raw")
    paths[IMAGES].write_bytes(b"")
    msg = load_error("fashion_mnist", tmp_path)
    assert str(paths[IMAGES]) in msg and "is empty" in msg and "--download" in msg


def test_damaged_debian_fashion_says_reinstall(tmp_path, monkeypatch):
    debian = tmp_path / "debian"
    paths = make_idx_layout(debian)
    p = paths[IMAGES]
    p.write_bytes(p.read_bytes()[:100])
    monkeypatch.setattr("spfl_vmap.data.loaders.DEBIAN_FASHION_MNIST", debian)
    with pytest.raises(DataError, match=r"truncated.*apt-get install --reinstall dataset-fashion-mnist"):
        load_dataset("fashion_mnist", data_dir=str(tmp_path / "empty"))


# ---- CIFAR python pickles ----------------------------------------------------------------------
def make_cifar(root, hundred=False, n=4):
    """A valid torchvision python layout; returns its folder."""
    d = root / ("cifar-100-python" if hundred else "cifar-10-batches-py")
    d.mkdir()
    rng = np.random.default_rng(0)
    names = ["train", "test"] if hundred else [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    key = "fine_labels" if hundred else "labels"
    for name in names:
        entry = {"data": rng.integers(0, 256, (n, 3072)).astype(np.uint8), key: list(range(n))}
        (d / name).write_bytes(pickle.dumps(entry))
    return d


def put(path, obj):
    path.write_bytes(pickle.dumps(obj))


def batch(n=4, data_shape=None, labels=None, key="labels"):
    data = np.zeros(data_shape or (n, 3072), dtype=np.uint8)
    return {"data": data, key: list(range(n)) if labels is None else labels}


def test_valid_cifar100_still_loads(tmp_path):
    make_cifar(tmp_path, hundred=True)
    ds = load_dataset("cifar100", data_dir=str(tmp_path))
    assert ds.x_train.shape == (4, 3, 32, 32) and ds.num_classes == 100


@pytest.mark.parametrize("content", [b"garbage, not a pickle" * 5, b"\x80\x04\x95\xff\xff", b"\x80\x02}q\x00(X"])
def test_cifar_garbage_bytes(tmp_path, content):
    d = make_cifar(tmp_path)
    (d / "data_batch_3").write_bytes(content)
    msg = load_error("cifar10", tmp_path)
    assert str(d / "data_batch_3") in msg and f"delete {d}" in msg and "--download" in msg
    with pytest.raises(DataError, match=r"data_batch_3 is not a readable CIFAR python pickle"):
        load_dataset("cifar10", data_dir=str(tmp_path))


def test_cifar_empty_file(tmp_path):
    d = make_cifar(tmp_path)
    (d / "test_batch").write_bytes(b"")
    with pytest.raises(DataError, match=r"test_batch is empty"):
        load_dataset("cifar10", data_dir=str(tmp_path))


def test_cifar_pickle_not_a_dict(tmp_path):
    d = make_cifar(tmp_path)
    put(d / "data_batch_1", [1, 2, 3])
    with pytest.raises(DataError, match=r"data_batch_1 holds a list, expected a dict with 'data' and 'labels'"):
        load_dataset("cifar10", data_dir=str(tmp_path))


@pytest.mark.parametrize("drop", ["data", "labels"])
def test_cifar_missing_key(tmp_path, drop):
    d = make_cifar(tmp_path)
    entry = batch()
    del entry[drop]
    put(d / "data_batch_2", entry)
    with pytest.raises(DataError, match=rf"data_batch_2 lacks '{drop}'"):
        load_dataset("cifar10", data_dir=str(tmp_path))


def test_cifar100_needs_fine_labels(tmp_path):
    d = make_cifar(tmp_path, hundred=True)
    put(d / "train", {"data": np.zeros((4, 3072), np.uint8), "coarse_labels": [0, 1, 2, 3]})
    with pytest.raises(DataError, match=r"train lacks 'fine_labels' \(it has 'coarse_labels', 'data'\)"):
        load_dataset("cifar100", data_dir=str(tmp_path))


@pytest.mark.parametrize("shape", [(4, 1024), (4, 3, 32, 32), (3072,)])
def test_cifar_data_of_wrong_shape(tmp_path, shape):
    d = make_cifar(tmp_path)
    put(d / "data_batch_4", batch(data_shape=shape))
    with pytest.raises(DataError, match=r"data_batch_4 has 'data' of shape .*, expected \(N, 3072\)"):
        load_dataset("cifar10", data_dir=str(tmp_path))


def test_cifar_label_count_differs(tmp_path):
    d = make_cifar(tmp_path)
    put(d / "data_batch_5", batch(labels=[0, 1, 2]))
    with pytest.raises(DataError, match=r"data_batch_5 holds 4 images but 3 labels"):
        load_dataset("cifar10", data_dir=str(tmp_path))


def test_cifar_labels_not_integers(tmp_path):
    d = make_cifar(tmp_path)
    put(d / "data_batch_1", batch(labels=["a", "b", "c", "d"]))
    with pytest.raises(DataError, match=r"'labels' of shape \(4,\) and dtype <U1, expected a list of integers"):
        load_dataset("cifar10", data_dir=str(tmp_path))


def test_cifar_pixels_that_are_not_bytes(tmp_path):
    d = make_cifar(tmp_path)
    entry = batch()
    entry["data"] = np.full((4, 3072), 0.5)
    put(d / "test_batch", entry)
    with pytest.raises(DataError, match=r"test_batch has 'data' of dtype float64 that is not bytes 0\.\.255"):
        load_dataset("cifar10", data_dir=str(tmp_path))


@pytest.mark.parametrize("hundred,bad", [(False, 10), (False, 255), (False, -1), (True, 100)])
def test_cifar_label_out_of_range(tmp_path, hundred, bad):
    d = make_cifar(tmp_path, hundred=hundred)
    key, name, k = ("fine_labels", "test", 100) if hundred else ("labels", "test_batch", 10)
    put(d / name, batch(labels=[0, bad, 1, 2], key=key))
    with pytest.raises(DataError, match=rf"{name} has label {bad}, outside 0\.\.{k - 1}"):
        load_dataset("cifar100" if hundred else "cifar10", data_dir=str(tmp_path))
