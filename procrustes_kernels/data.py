"""Small image-classification datasets as in-memory CPU tensors.

Every loader returns a :class:`Dataset` whose images are ``float32`` tensors of shape
``(N, C, H, W)``, standardised with statistics of the *training* split only (so no information
leaks from the test split), and whose labels are ``int64`` tensors of shape ``(N,)``.

* :func:`load_digits` -- scikit-learn's bundled 8x8 digits; needs no download, so it is the
  default for tests and demos.
* :func:`load_mnist` -- MNIST or Fashion-MNIST from the four IDX files (plain or gzipped).
* :func:`load_cifar10` -- the CIFAR-10 "python version" pickled batches.
* :func:`load_dataset` -- dispatch by name.

Nothing here downloads anything: MNIST and CIFAR-10 must already be on disk.
"""

from __future__ import annotations

import gzip
import os
import pickle
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "Dataset",
    "load_cifar10",
    "load_dataset",
    "load_digits",
    "load_mnist",
    "read_idx",
]


@dataclass(repr=False)
class Dataset:
    """A train/test split of an image-classification dataset, held on the CPU.

    Attributes:
        x_train: ``float32`` images, shape ``(N_train, C, H, W)``, standardised.
        y_train: ``int64`` labels in ``[0, num_classes)``, shape ``(N_train,)``.
        x_test: ``float32`` images, shape ``(N_test, C, H, W)``, standardised with the
            training split's statistics.
        y_test: ``int64`` labels, shape ``(N_test,)``.
        num_classes: number of classes.
        name: short dataset name, e.g. ``"digits"``.
    """

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int
    name: str

    def __post_init__(self) -> None:
        for split in ("train", "test"):
            x: Tensor = getattr(self, f"x_{split}")
            y: Tensor = getattr(self, f"y_{split}")
            if x.dim() != 4:
                raise ValueError(
                    f"Dataset.x_{split} must have shape (N, C, H, W), got {tuple(x.shape)}"
                )
            if y.dim() != 1 or y.shape[0] != x.shape[0]:
                raise ValueError(
                    f"Dataset.y_{split} must have shape ({x.shape[0]},) to match "
                    f"x_{split}, got {tuple(y.shape)}"
                )
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise ValueError(
                "Dataset.x_train and x_test must have the same (C, H, W), got "
                f"{tuple(self.x_train.shape[1:])} and {tuple(self.x_test.shape[1:])}"
            )
        if self.num_classes < 1:
            raise ValueError(f"Dataset.num_classes must be >= 1, got {self.num_classes}")

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """The shape ``(C, H, W)`` of one image."""
        c, h, w = self.x_train.shape[1:]
        return (int(c), int(h), int(w))

    def __repr__(self) -> str:
        # The dataclass default would print tensor contents; shapes are what one wants to see.
        return (
            f"Dataset(name={self.name!r}, num_classes={self.num_classes}, "
            f"input_shape={self.input_shape}, n_train={len(self.y_train)}, "
            f"n_test={len(self.y_test)})"
        )


def _standardise(x_train: Tensor, x_test: Tensor, dims: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """Standardise both splits with the mean/std of ``x_train`` reduced over ``dims``."""
    std, mean = torch.std_mean(x_train, dim=dims, keepdim=True, correction=0)
    # A constant training set (only plausible in tiny synthetic data) would otherwise give NaNs.
    std = torch.where(std > 0, std, torch.ones_like(std))
    return (x_train - mean) / std, (x_test - mean) / std


# ---------------------------------------------------------------------------------------------
# scikit-learn digits
# ---------------------------------------------------------------------------------------------


def load_digits(test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """Load scikit-learn's 8x8 handwritten digits (1797 images, 10 classes) without download.

    The split is stratified and deterministic: for each class, its indices are shuffled with
    ``numpy.random.RandomState(seed)`` and the first ``round(test_fraction * n_class)`` go to the
    test split. Both splits keep the dataset's original order. Pixels (``0..16``) are divided by
    16, then standardised with a single mean and std computed over the whole training split.

    Args:
        test_fraction: fraction of each class held out for testing, strictly between 0 and 1.
        seed: seed of the shuffle; equal seeds give identical splits.

    Returns:
        A :class:`Dataset` with ``x`` of shape ``(N, 1, 8, 8)`` and ``name="digits"``.

    Raises:
        ImportError: if scikit-learn is not installed.
        ValueError: if ``test_fraction`` is out of range or leaves a split empty.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(
            f"load_digits(): test_fraction must be strictly between 0 and 1, got {test_fraction!r}"
        )
    try:
        from sklearn.datasets import load_digits as _sk_load_digits
    except ImportError as exc:
        raise ImportError("load_digits() needs scikit-learn: pip install scikit-learn") from exc

    bunch = _sk_load_digits()
    images = np.asarray(bunch.images, dtype=np.float32) / 16.0
    labels = np.asarray(bunch.target, dtype=np.int64)

    rng = np.random.RandomState(seed)
    test_parts = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        test_parts.append(idx[: round(test_fraction * len(idx))])
    is_test = np.zeros(len(labels), dtype=bool)
    is_test[np.concatenate(test_parts)] = True
    if is_test.all() or not is_test.any():
        raise ValueError(
            f"load_digits(): test_fraction={test_fraction!r} leaves the "
            f"{'train' if is_test.all() else 'test'} split empty"
        )

    x = torch.from_numpy(images).unsqueeze(1)
    y = torch.from_numpy(labels)
    train_mask = torch.from_numpy(~is_test)
    x_train, x_test = _standardise(x[train_mask], x[~train_mask], dims=(0, 1, 2, 3))
    return Dataset(
        x_train=x_train,
        y_train=y[train_mask],
        x_test=x_test,
        y_test=y[~train_mask],
        num_classes=10,
        name="digits",
    )


# ---------------------------------------------------------------------------------------------
# IDX / MNIST
# ---------------------------------------------------------------------------------------------

_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

_GZIP_MAGIC = b"\x1f\x8b"


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (the format MNIST is distributed in), plain or gzip-compressed.

    The layout is a 4-byte magic ``00 00 <dtype code> <ndim>``, then ``ndim`` big-endian
    ``int32`` dimensions, then the data in big-endian C order. Supported dtype codes: ``0x08``
    uint8, ``0x09`` int8, ``0x0B`` int16, ``0x0C`` int32, ``0x0D`` float32, ``0x0E`` float64.
    Gzip is recognised by its content, not by the ``.gz`` suffix.

    Args:
        path: the file to read.

    Returns:
        A writable array in native byte order with the file's shape and dtype.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: naming the file, if the magic, dtype code or dimensions are invalid, or the
            file length does not match the dimensions.
    """
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == _GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise ValueError(f"IDX file {str(path)!r}: corrupt gzip stream ({exc})") from exc

    if len(raw) < 4:
        raise ValueError(
            f"IDX file {str(path)!r}: {len(raw)} bytes is too short for the 4-byte magic"
        )
    zero0, zero1, code, ndim = raw[0], raw[1], raw[2], raw[3]
    if zero0 != 0 or zero1 != 0:
        raise ValueError(
            f"IDX file {str(path)!r}: bad magic {raw[:4].hex(' ')}, expected 00 00 <dtype> <ndim>"
        )
    if code not in _IDX_DTYPES:
        valid = ", ".join(f"0x{c:02X}" for c in _IDX_DTYPES)
        raise ValueError(
            f"IDX file {str(path)!r}: unknown dtype code 0x{code:02X}, expected one of {valid}"
        )
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise ValueError(
            f"IDX file {str(path)!r}: truncated header, {ndim} dimensions need {header_len} "
            f"bytes but the file has {len(raw)}"
        )
    dims = struct.unpack(f">{ndim}i", raw[4:header_len])
    if any(d < 0 for d in dims):
        raise ValueError(f"IDX file {str(path)!r}: negative dimension in {dims}")

    dtype = _IDX_DTYPES[code]
    expected = header_len + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(
            f"IDX file {str(path)!r}: length {len(raw)} bytes does not match dimensions {dims} "
            f"of {dtype.name} (expected {expected} bytes)"
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header_len).reshape(dims)
    # astype always copies: the result is writable (frombuffer over bytes is not) and native
    # endian, which torch.from_numpy requires.
    return data.astype(dtype.newbyteorder("="))


_MNIST_FILES = {
    "x_train": ("train", "images", 3),
    "y_train": ("train", "labels", 1),
    "x_test": ("t10k", "images", 3),
    "y_test": ("t10k", "labels", 1),
}


def _find_mnist_file(
    root: Path, prefix: str, kind: str, ndim: int
) -> tuple[Path | None, list[str]]:
    """Return the first existing candidate for one MNIST file, and all names tried."""
    names = []
    for stem in (f"{prefix}-{kind}-idx{ndim}-ubyte", f"{prefix}-{kind}.idx{ndim}-ubyte"):
        names += [stem, stem + ".gz"]
    for name in names:
        if (root / name).is_file():
            return root / name, names
    return None, names


def load_mnist(root: str | os.PathLike) -> Dataset:
    """Load MNIST (or Fashion-MNIST, which uses the same file names) from IDX files in ``root``.

    Looks in ``root`` itself for ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
    ``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte``, each optionally gzipped
    (``.gz``) and also under the dotted spelling (``train-images.idx3-ubyte`` etc.). Pixels are
    divided by 255, then standardised with a single mean and std of the training split.

    Args:
        root: directory holding the four files.

    Returns:
        A :class:`Dataset` with ``x`` of shape ``(N, 1, H, W)`` (28x28 for MNIST),
        ``num_classes=10`` and ``name="mnist"``.

    Raises:
        FileNotFoundError: if any of the four files is missing (lists every name tried).
        ValueError: if a file is malformed or the files do not fit together.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"load_mnist(): root {str(root)!r} is not a directory")

    paths: dict[str, Path] = {}
    missing = []
    for key, (prefix, kind, ndim) in _MNIST_FILES.items():
        found, tried = _find_mnist_file(root, prefix, kind, ndim)
        if found is None:
            missing.append(" or ".join(tried))
        else:
            paths[key] = found
    if missing:
        raise FileNotFoundError(
            f"load_mnist(): missing files in {str(root)!r}; looked for: " + "; ".join(missing)
        )

    arrays = {key: read_idx(p) for key, p in paths.items()}
    for split in ("train", "test"):
        images, labels = arrays[f"x_{split}"], arrays[f"y_{split}"]
        x_path, y_path = paths[f"x_{split}"], paths[f"y_{split}"]
        if images.ndim != 3 or images.dtype != np.uint8:
            raise ValueError(
                f"load_mnist(): {str(x_path)!r} must hold uint8 images of shape (N, H, W), "
                f"got {images.dtype} {images.shape}"
            )
        if labels.ndim != 1 or labels.dtype.kind not in "iu":
            raise ValueError(
                f"load_mnist(): {str(y_path)!r} must hold integer labels of shape (N,), "
                f"got {labels.dtype} {labels.shape}"
            )
        if len(labels) != len(images):
            raise ValueError(
                f"load_mnist(): {str(x_path)!r} has {len(images)} images but "
                f"{str(y_path)!r} has {len(labels)} labels"
            )
        if labels.size and (labels.min() < 0 or labels.max() >= 10):
            raise ValueError(
                f"load_mnist(): labels in {str(y_path)!r} must be in 0..9, "
                f"got {labels.min()}..{labels.max()}"
            )

    def images(key: str) -> Tensor:
        return torch.from_numpy(arrays[key]).unsqueeze(1).float().div_(255.0)

    def labels(key: str) -> Tensor:
        return torch.from_numpy(arrays[key].astype(np.int64))

    x_train, x_test = images("x_train"), images("x_test")
    if x_train.shape[1:] != x_test.shape[1:]:
        raise ValueError(
            f"load_mnist(): train images are {tuple(x_train.shape[2:])} but test images are "
            f"{tuple(x_test.shape[2:])}"
        )
    x_train, x_test = _standardise(x_train, x_test, dims=(0, 1, 2, 3))
    return Dataset(
        x_train=x_train,
        y_train=labels("y_train"),
        x_test=x_test,
        y_test=labels("y_test"),
        num_classes=10,
        name="mnist",
    )


# ---------------------------------------------------------------------------------------------
# CIFAR-10
# ---------------------------------------------------------------------------------------------

_CIFAR_SUBDIR = "cifar-10-batches-py"
_CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_TEST = "test_batch"


class _CifarUnpickler(pickle.Unpickler):
    """An unpickler that can rebuild numpy arrays but cannot call anything else.

    CIFAR-10 ships as pickles, and an unrestricted ``pickle.load`` of a downloaded file can run
    arbitrary code; the batches only ever need these few globals.
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        # Python 3 writes bytes through _codecs.encode in pickle protocols < 3.
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed")
        return super().find_class(module, name)


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR-10 batch into ``(uint8 (N, 3, 32, 32), int64 (N,))``."""
    try:
        with path.open("rb") as f:
            batch = _CifarUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as exc:
        raise ValueError(f"CIFAR-10 batch {str(path)!r}: cannot unpickle ({exc})") from exc
    if not isinstance(batch, dict):
        raise ValueError(
            f"CIFAR-10 batch {str(path)!r}: expected a pickled dict, got {type(batch).__name__}"
        )
    # Re-pickled copies made under Python 3 may have str keys instead of the original bytes.
    data = batch.get(b"data", batch.get("data"))
    labels = batch.get(b"labels", batch.get("labels"))
    if data is None or labels is None:
        raise ValueError(
            f"CIFAR-10 batch {str(path)!r}: expected keys b'data' and b'labels', "
            f"got {sorted(map(repr, batch))}"
        )
    data = np.asarray(data)
    labels = np.asarray(labels)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(
            f"CIFAR-10 batch {str(path)!r}: b'data' must be uint8 of shape (N, 3072), "
            f"got {data.dtype} {data.shape}"
        )
    if labels.ndim != 1 or len(labels) != len(data) or labels.dtype.kind not in "iu":
        raise ValueError(
            f"CIFAR-10 batch {str(path)!r}: b'labels' must be {len(data)} integers, "
            f"got {labels.dtype} {labels.shape}"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= 10):
        raise ValueError(
            f"CIFAR-10 batch {str(path)!r}: labels must be in 0..9, "
            f"got {labels.min()}..{labels.max()}"
        )
    # Rows are the red plane, then green, then blue, each 32x32 in row-major order.
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def load_cifar10(root: str | os.PathLike) -> Dataset:
    """Load CIFAR-10 from the "python version" pickled batches.

    ``root`` (or ``root/cifar-10-batches-py``) must hold ``test_batch`` and at least one of
    ``data_batch_1`` .. ``data_batch_5``; if some training batches are missing, the ones found
    are used and a :class:`UserWarning` names them. Pixels are divided by 255, then standardised
    per channel with the training split's mean and std.

    The pickles are read with a restricted unpickler that only rebuilds numpy arrays, so a
    tampered file cannot execute code.

    Args:
        root: the extracted ``cifar-10-batches-py`` directory or its parent.

    Returns:
        A :class:`Dataset` with ``x`` of shape ``(N, 3, 32, 32)`` (channels R, G, B),
        ``num_classes=10`` and ``name="cifar10"``.

    Raises:
        FileNotFoundError: if ``test_batch`` or every training batch is missing.
        ValueError: if a batch is malformed.
    """
    root = Path(root)
    candidates = [root, root / _CIFAR_SUBDIR]
    looks_like_cifar = [
        d for d in candidates if any((d / n).is_file() for n in (*_CIFAR_TRAIN, _CIFAR_TEST))
    ]
    if not looks_like_cifar:
        raise FileNotFoundError(
            f"load_cifar10(): no CIFAR-10 batches ({_CIFAR_TEST}, data_batch_1..5) in "
            f"{str(root)!r} or {str(root / _CIFAR_SUBDIR)!r}"
        )
    folder = looks_like_cifar[0]

    train_found = [n for n in _CIFAR_TRAIN if (folder / n).is_file()]
    if not train_found:
        raise FileNotFoundError(
            f"load_cifar10(): no training batch in {str(folder)!r}; looked for "
            f"{', '.join(_CIFAR_TRAIN)}"
        )
    if not (folder / _CIFAR_TEST).is_file():
        raise FileNotFoundError(
            f"load_cifar10(): {_CIFAR_TEST!r} is missing from {str(folder)!r} "
            f"(found {', '.join(train_found)})"
        )
    if len(train_found) < len(_CIFAR_TRAIN):
        warnings.warn(
            f"load_cifar10(): using only {len(train_found)} of {len(_CIFAR_TRAIN)} training "
            f"batches found in {str(folder)!r}: {', '.join(train_found)}",
            UserWarning,
            stacklevel=2,
        )

    train = [_read_cifar_batch(folder / n) for n in train_found]
    x_test_u8, y_test = _read_cifar_batch(folder / _CIFAR_TEST)
    x_train = torch.from_numpy(np.concatenate([x for x, _ in train])).float().div_(255.0)
    y_train = torch.from_numpy(np.concatenate([y for _, y in train]))
    x_test = torch.from_numpy(x_test_u8).float().div_(255.0)
    x_train, x_test = _standardise(x_train, x_test, dims=(0, 2, 3))
    return Dataset(
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=torch.from_numpy(y_test),
        num_classes=10,
        name="cifar10",
    )


# ---------------------------------------------------------------------------------------------
# dispatch
# ---------------------------------------------------------------------------------------------

_ROOTLESS = ("digits",)
_NEEDS_ROOT = ("mnist", "cifar10")


def load_dataset(name: str = "digits", root: str | os.PathLike | None = None, **kw: Any) -> Dataset:
    """Load a dataset by name.

    Args:
        name: ``"digits"``, ``"mnist"`` or ``"cifar10"`` (case-insensitive). Fashion-MNIST loads
            through ``"mnist"``.
        root: directory of the files; required for ``"mnist"`` and ``"cifar10"``, ignored for
            ``"digits"``.
        **kw: passed to the loader, e.g. ``test_fraction`` and ``seed`` for ``"digits"``.

    Returns:
        The loaded :class:`Dataset`.

    Raises:
        ValueError: for an unknown ``name`` or a missing ``root``.
    """
    key = name.lower() if isinstance(name, str) else name
    if key == "digits":
        return load_digits(**kw)
    if key in _NEEDS_ROOT:
        if root is None:
            raise ValueError(
                f"load_dataset(): name={name!r} needs root=<directory holding its files>; "
                "nothing is downloaded"
            )
        loader = load_mnist if key == "mnist" else load_cifar10
        return loader(root, **kw)
    valid = ", ".join(repr(n) for n in (*_ROOTLESS, *_NEEDS_ROOT))
    raise ValueError(f"load_dataset(): unknown name {name!r}; expected one of {valid}")
