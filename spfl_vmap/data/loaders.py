"""Dataset loaders. Each returns a :class:`Dataset` of normalised float tensors.

Files come from standard places, never from a hub at run time unless ``--download`` is given:

* ``fashion_mnist`` / ``mnist``: IDX files (``*-ubyte`` or ``*-ubyte.gz``) in torchvision's layout
  ``<data_dir>/FashionMNIST/raw`` (``MNIST/raw``), directly in ``<data_dir>``, or (FashionMNIST)
  Debian's ``dataset-fashion-mnist`` package under ``/usr/share/datasets/fashion-mnist``.
* ``cifar10`` / ``cifar100``: torchvision's python pickles ``cifar-10-batches-py`` /
  ``cifar-100-python`` in ``<data_dir>``.
* ``digits``: scikit-learn's bundled 8x8 digits (always available).
* ``synthetic``: a deterministic Gaussian-mixture generator for tests and benchmarks.
"""

from __future__ import annotations

import gzip
import pickle
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import DataError
from ..registry import Registry
from ..rng import generator

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


@dataclass(frozen=True)
class DatasetMeta:
    """What the config validator needs to know without loading: input shape and class count."""

    input_shape: tuple[int, int, int]  # (C, H, W)
    num_classes: int


@dataclass
class Dataset:
    """A loaded dataset: ``x_*`` are ``[n, C, H, W]`` float32, normalised; ``y_*`` are int64."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    source: str

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])


Loader = Callable[..., Dataset]
DATASETS: Registry[Loader] = Registry("dataset")
META: dict[str, DatasetMeta] = {}


def register(name: str, meta: DatasetMeta) -> Callable[[Loader], Loader]:
    META[name] = meta
    return DATASETS.register(name)


def dataset_meta(name: str) -> DatasetMeta:
    DATASETS.get(name)  # raises the one-line error for unknown names
    return META[name]


def load_dataset(name: str, data_dir: str = "./data", download: bool = False, **kw) -> Dataset:
    """Load dataset ``name``; raises :class:`DataError` with the fix when files are missing."""
    return DATASETS.get(name)(data_dir=data_dir, download=download, **kw)


# ---- IDX (MNIST family) -------------------------------------------------------------------
IDX_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}


# What each IDX file must hold per item: labels are scalars (idx1), images 28x28 (idx3).
IDX_ITEM_SHAPES: dict[str, tuple[int, ...]] = {"train_x": (28, 28), "train_y": (), "test_x": (28, 28), "test_y": ()}
IDX_KINDS = {1: "labels", 3: "images"}
GZIP_MAGIC = b"\x1f\x8b"


def first_line(e: BaseException) -> str:
    """``e``'s message cut to one line, so a library's multi-line text cannot break ours."""
    lines = str(e).splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def read_bytes(path: Path) -> bytes:
    """Read ``path``, gunzipping it when named ``*.gz``; a damaged file is a one-line :class:`DataError`."""
    try:
        if path.suffix != ".gz":
            return path.read_bytes()
        with gzip.open(path, "rb") as fh:
            return fh.read()
    except EOFError:  # gzip's way of saying the stream stops early (an interrupted download)
        raise DataError(f"{path} is truncated: the gzip stream ends before its end marker") from None
    except gzip.BadGzipFile as e:  # before OSError: it is one
        raise DataError(f"{path} is not a valid gzip file ({first_line(e)})") from None
    except zlib.error as e:
        raise DataError(f"{path} is corrupt: its gzip data does not decompress ({first_line(e)})") from None
    except OSError as e:
        raise DataError(f"{path} cannot be read ({first_line(e)})") from None


def read_idx(path: Path, item_shape: tuple[int, ...] | None = None) -> np.ndarray:
    """Parse an IDX file (optionally gzipped) into a uint8 array.

    Args:
        path: the file; gunzipped when its name ends in ``.gz``.
        item_shape: when given, the shape each item must have (``()`` for a label file,
            ``(28, 28)`` for MNIST images), which also fixes the IDX rank (idx1, idx3).

    Raises:
        DataError: a one-line message naming the file and what is wrong with it.
    """
    data = read_bytes(path)
    if not data:
        raise DataError(f"{path} is empty")
    if len(data) < 4:
        raise DataError(f"{path} is truncated: {len(data)} bytes, shorter than the 4-byte IDX magic")
    magic = int.from_bytes(data[:4], "big")
    if data[:2] != b"\0\0":
        hint = "; it looks gzipped, so name it *.gz" if data[:2] == GZIP_MAGIC else ""
        raise DataError(f"{path} is not an IDX file (magic 0x{magic:08x}; IDX magics start 0x0000){hint}")
    if data[2] != 8:
        raise DataError(f"{path} has IDX dtype code 0x{data[2]:02x}, expected 0x08 (unsigned byte)")
    ndim = data[3]
    if item_shape is not None and ndim != len(item_shape) + 1:
        want = len(item_shape) + 1
        raise DataError(
            f"{path} is an idx{ndim} file (magic 0x{magic:08x}, {IDX_KINDS.get(ndim, f'{ndim}-D data')}) where an "
            f"idx{want} file (magic 0x{0x800 + want:08x}, {IDX_KINDS[want]}) was expected; the files may be swapped"
        )
    if len(data) < 4 + 4 * ndim:
        raise DataError(f"{path} is truncated inside its header ({len(data)} bytes for {ndim} dimensions)")
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    if item_shape is not None and tuple(dims[1:]) != item_shape:
        got, want_s = "x".join(map(str, dims[1:])), "x".join(map(str, item_shape))
        raise DataError(f"{path} holds items of shape {got}, expected {want_s}")
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    expected = int(np.prod(dims))
    if body.size < expected:
        raise DataError(f"{path} is truncated: expected {expected} values, found {body.size}")
    if body.size > expected:
        raise DataError(f"{path} has {body.size - expected} bytes beyond the {expected} values its header declares")
    return body.reshape(dims)


def check_label_range(y: np.ndarray, num_classes: int, where: str) -> None:
    """Raise :class:`DataError` if a label of ``y`` lies outside ``0..num_classes-1`` (min/max: cheap)."""
    if y.size == 0:
        return
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi >= num_classes:
        bad = lo if lo < 0 else hi
        raise DataError(f"{where} has label {bad}, outside 0..{num_classes - 1} for {num_classes} classes")


def find_idx_dir(dirs: list[Path]) -> Path | None:
    for d in dirs:
        if all((d / f).is_file() or (d / (f + ".gz")).is_file() for f in IDX_FILES.values()):
            return d
    return None


def idx_path(d: Path, stem: str) -> Path:
    return d / stem if (d / stem).is_file() else d / (stem + ".gz")


def read_idx_dir(d: Path, num_classes: int) -> dict[str, np.ndarray]:
    """Read and cross-check the four IDX files in ``d``: shapes, image/label counts, label range."""
    paths = {k: idx_path(d, v) for k, v in IDX_FILES.items()}
    arrs = {k: read_idx(p, IDX_ITEM_SHAPES[k]) for k, p in paths.items()}
    for split in ("train", "test"):
        x, y = arrs[f"{split}_x"], arrs[f"{split}_y"]
        # A short label file would otherwise silently pair the first len(y) images with labels.
        if len(x) != len(y):
            raise DataError(
                f"{paths[f'{split}_x']} holds {len(x)} images but {paths[f'{split}_y']} holds {len(y)} labels; "
                "the files do not belong together"
            )
        check_label_range(y, num_classes, str(paths[f"{split}_y"]))
    return arrs


def load_idx_dataset(
    name: str, tv_folder: str, data_dir: str, download: bool, extra_dirs: list[Path], fix: str,
    num_classes: int = 10, system_repair: str = "",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, str]:
    """Find and read an MNIST-family dataset; ``system_repair`` says how to repair damaged files
    found in one of ``extra_dirs`` (system packages, which deleting would not fix)."""
    root = Path(data_dir)
    dirs = [root / tv_folder / "raw", root] + extra_dirs
    d = find_idx_dir(dirs)
    if d is None and download:
        import torchvision

        cls = getattr(torchvision.datasets, tv_folder)
        try:
            cls(str(root), train=True, download=True)
            cls(str(root), train=False, download=True)
        except Exception as e:
            raise DataError(f"downloading {name} into {root} failed: {str(e).splitlines()[0]}") from None
        d = find_idx_dir(dirs)
    if d is None:
        where = ", ".join(str(x) for x in dirs)
        raise DataError(f"{name} not found: expected {', '.join(IDX_FILES.values())} (.gz allowed) in one of {where}; {fix}")
    try:
        arrs = read_idx_dir(d, num_classes)
    except DataError as e:
        repair = system_repair if d in extra_dirs and system_repair else (
            f"delete the damaged {name} files in {d} and pass --download to fetch fresh copies"
        )
        raise DataError(f"{name}: {e}; {repair}") from None
    xtr = torch.from_numpy(arrs["train_x"].copy()).float().div_(255.0)[:, None]
    xte = torch.from_numpy(arrs["test_x"].copy()).float().div_(255.0)[:, None]
    ytr = torch.from_numpy(arrs["train_y"].astype(np.int64))
    yte = torch.from_numpy(arrs["test_y"].astype(np.int64))
    return xtr, ytr, xte, yte, str(d)


def normalise(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    return (x - m) / s


MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
# Per-channel (mean, std) each image dataset is normalised with: ``x = (pixel - mean) / std`` for
# pixels in [0, 1]. Pixel-space code (ATS transforms, inversion metrics) undoes it with these.
# ``digits`` and ``synthetic`` are not in it: digits is normalised with statistics of its own
# split, synthetic has no pixel space.
PIXEL_NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "mnist": (MNIST_MEAN, MNIST_STD),
    "mnist_rgb": (MNIST_MEAN * 3, MNIST_STD * 3),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


@register("fashion_mnist", DatasetMeta((1, 28, 28), 10))
def load_fashion_mnist(data_dir: str = "./data", download: bool = False, **_) -> Dataset:
    """FashionMNIST (Xiao et al. 2017): 60k/10k 28x28 grayscale, 10 classes."""
    fix = "install Debian's copy with `apt-get install dataset-fashion-mnist` (scripts/demo does this), or pass --download"
    repair = "reinstall Debian's copy with `apt-get install --reinstall dataset-fashion-mnist`"
    xtr, ytr, xte, yte, src = load_idx_dataset(
        "fashion_mnist", "FashionMNIST", data_dir, download, [DEBIAN_FASHION_MNIST], fix, system_repair=repair
    )
    mean, std = PIXEL_NORMALIZATION["fashion_mnist"]
    return Dataset("fashion_mnist", normalise(xtr, mean, std), ytr, normalise(xte, mean, std), yte, 10, src)


def _mnist_raw(data_dir: str, download: bool):
    fix = "put torchvision's MNIST files in <data_dir>/MNIST/raw or pass --download"
    return load_idx_dataset("mnist", "MNIST", data_dir, download, [], fix)


@register("mnist", DatasetMeta((1, 28, 28), 10))
def load_mnist(data_dir: str = "./data", download: bool = False, **_) -> Dataset:
    """MNIST (LeCun et al. 1998): 60k/10k 28x28 grayscale digits."""
    xtr, ytr, xte, yte, src = _mnist_raw(data_dir, download)
    return Dataset("mnist", normalise(xtr, MNIST_MEAN, MNIST_STD), ytr, normalise(xte, MNIST_MEAN, MNIST_STD), yte, 10, src)


def to_rgb32(x: torch.Tensor) -> torch.Tensor:
    """``[n, 1, 28, 28]`` -> ``[n, 3, 32, 32]``: bilinear resize, grey copied to 3 channels."""
    out = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
    return out.expand(-1, 3, -1, -1).contiguous()


@register("mnist_rgb", DatasetMeta((3, 32, 32), 10))
def load_mnist_rgb(data_dir: str = "./data", download: bool = False, **_) -> Dataset:
    """MNIST as 3x32x32, as the original toolkit fed its ConvNet runs."""
    xtr, ytr, xte, yte, src = _mnist_raw(data_dir, download)
    m3, s3 = PIXEL_NORMALIZATION["mnist_rgb"]
    return Dataset("mnist_rgb", normalise(to_rgb32(xtr), m3, s3), ytr, normalise(to_rgb32(xte), m3, s3), yte, 10, src)


# ---- CIFAR -------------------------------------------------------------------------------
CIFAR_ROW = 3 * 32 * 32  # one image per row of a batch's ``data``: 1024 red, then green, then blue bytes


def read_cifar_batch(path: Path, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR python pickle into ``([n, 3, 32, 32]`` uint8, ``[n]`` int64).

    Args:
        path: a batch file such as ``data_batch_1`` or ``test``.
        label_key: ``"labels"`` (CIFAR-10) or ``"fine_labels"`` (CIFAR-100).
        num_classes: labels must lie in ``0..num_classes-1``.

    Raises:
        DataError: a one-line message naming the file and what is wrong with it.
    """
    if path.stat().st_size == 0:  # pickle would only say "Ran out of input"
        raise DataError(f"{path} is empty")
    try:
        with open(path, "rb") as fh:
            entry = pickle.load(fh, encoding="latin1")
    except Exception as e:  # a damaged pickle can fail in almost any way: EOFError, UnpicklingError, ValueError, ...
        raise DataError(f"{path} is not a readable CIFAR python pickle ({first_line(e)})") from None
    if not isinstance(entry, dict):
        raise DataError(f"{path} holds a {type(entry).__name__}, expected a dict with 'data' and {label_key!r}")
    missing = [k for k in ("data", label_key) if k not in entry]
    if missing:
        keys = ", ".join(sorted(repr(k) for k in entry)[:8])
        raise DataError(f"{path} lacks {' and '.join(map(repr, missing))} (it has {keys or 'no keys'})")
    try:
        x, y = np.asarray(entry["data"]), np.asarray(entry[label_key])
    except Exception as e:  # e.g. ragged nested lists
        raise DataError(f"{path} holds 'data' or {label_key!r} that is not an array ({first_line(e)})") from None
    if x.ndim != 2 or x.shape[1] != CIFAR_ROW:
        raise DataError(f"{path} has 'data' of shape {x.shape}, expected (N, {CIFAR_ROW}): one 3x32x32 image per row")
    if x.dtype != np.uint8:
        # Only integers that fit a byte are pixels; casting anything else would wrap or truncate silently.
        if x.dtype.kind not in "iu" or (x.size and (int(x.min()) < 0 or int(x.max()) > 255)):
            raise DataError(f"{path} has 'data' of dtype {x.dtype} that is not bytes 0..255")
        x = x.astype(np.uint8)
    if y.ndim != 1 or (y.size and y.dtype.kind not in "iu"):
        raise DataError(f"{path} has {label_key!r} of shape {y.shape} and dtype {y.dtype}, expected a list of integers")
    if len(y) != len(x):
        raise DataError(f"{path} holds {len(x)} images but {len(y)} {label_key}")
    check_label_range(y, num_classes, str(path))
    return x.reshape(-1, 3, 32, 32), y.astype(np.int64)


def _load_cifar(name: str, folder: str, train_files: list[str], test_file: str, label_key: str,
                tv_cls: str, data_dir: str, download: bool, num_classes: int) -> tuple:
    root = Path(data_dir)
    d = root / folder
    needed = [d / f for f in train_files + [test_file]]
    if not all(p.is_file() for p in needed) and download:
        import torchvision

        try:
            getattr(torchvision.datasets, tv_cls)(str(root), train=True, download=True)
        except Exception as e:
            raise DataError(f"downloading {name} into {root} failed: {str(e).splitlines()[0]}") from None
    missing = [str(p) for p in needed if not p.is_file()]
    if missing:
        raise DataError(
            f"{name} not found: expected torchvision's python layout {d}/ (missing {missing[0]}"
            f"{' and more' if len(missing) > 1 else ''}); pass --download, or unpack the python-version archive into {root}"
        )

    def read(files: list[Path]) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = [], []
        for p in files:
            try:
                x, y = read_cifar_batch(p, label_key, num_classes)
            except DataError as e:
                raise DataError(f"{name}: {e}; delete {d} and pass --download to fetch a fresh copy") from None
            xs.append(x)
            ys.append(y)
        return torch.from_numpy(np.concatenate(xs)).float().div_(255.0), torch.from_numpy(np.concatenate(ys))

    xtr, ytr = read([d / f for f in train_files])
    xte, yte = read([d / test_file])
    return xtr, ytr, xte, yte, str(d)


@register("cifar10", DatasetMeta((3, 32, 32), 10))
def load_cifar10(data_dir: str = "./data", download: bool = False, **_) -> Dataset:
    """CIFAR-10 (Krizhevsky 2009): 50k/10k 32x32 RGB, 10 classes."""
    xtr, ytr, xte, yte, src = _load_cifar(
        "cifar10", "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "test_batch", "labels",
        "CIFAR10", data_dir, download, 10,
    )
    mean, std = PIXEL_NORMALIZATION["cifar10"]
    return Dataset("cifar10", normalise(xtr, mean, std), ytr, normalise(xte, mean, std), yte, 10, src)


@register("cifar100", DatasetMeta((3, 32, 32), 100))
def load_cifar100(data_dir: str = "./data", download: bool = False, **_) -> Dataset:
    """CIFAR-100 (Krizhevsky 2009): 50k/10k 32x32 RGB, 100 fine classes."""
    xtr, ytr, xte, yte, src = _load_cifar(
        "cifar100", "cifar-100-python", ["train"], "test", "fine_labels", "CIFAR100", data_dir, download, 100,
    )
    mean, std = PIXEL_NORMALIZATION["cifar100"]
    return Dataset("cifar100", normalise(xtr, mean, std), ytr, normalise(xte, mean, std), yte, 100, src)


# ---- always available ---------------------------------------------------------------------
@register("digits", DatasetMeta((1, 8, 8), 10))
def load_digits(**_) -> Dataset:
    """scikit-learn's bundled UCI 8x8 digits (1,797 images); a fixed 80/20 stratified split."""
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0)[:, None]  # (n, 1, 8, 8)
    y = torch.from_numpy(d.target.astype(np.int64))
    perm = torch.randperm(len(y), generator=generator(0, "digits-split"))
    n_test = len(y) // 5
    te, tr = perm[:n_test], perm[n_test:]
    mean, std = float(x[tr].mean()), float(x[tr].std())
    x = (x - mean) / std
    return Dataset("digits", x[tr], y[tr], x[te], y[te], 10, "sklearn.datasets.load_digits")


@register("synthetic", DatasetMeta((1, 28, 28), 10))
def load_synthetic(
    synthetic_train: int = 2000, synthetic_test: int = 500, input_shape: tuple[int, int, int] = (1, 28, 28),
    seed: int | str = 0, **_,
) -> Dataset:
    """Deterministic 10-class Gaussian mixture, shaped like MNIST (1x28x28) unless ``input_shape`` says otherwise.

    Class means are random smooth images (drawn at a quarter of the resolution and upsampled);
    samples add unit-variance noise. Independent of the run seed, so every run sees the same
    data; benchmarks pass their own ``seed`` and shape (e.g. 3x32x32 for the CIFAR workload).
    """
    g = generator(seed, "synthetic-data")
    num_classes = 10
    c, h, w = input_shape
    means = torch.randn(num_classes, c, -(-h // 4), -(-w // 4), generator=g)
    means = F.interpolate(means, size=(h, w), mode="bilinear", align_corners=False) * 0.7

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(0, num_classes, (n,), generator=g)
        x = means[y] + torch.randn(n, c, h, w, generator=g)
        return x, y

    xtr, ytr = draw(synthetic_train)
    xte, yte = draw(synthetic_test)
    return Dataset("synthetic", xtr, ytr, xte, yte, num_classes, "generated")
