"""Tests for procrustes_kernels.data, using only synthetic files and scikit-learn's digits."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from procrustes_kernels.data import (
    Dataset,
    load_cifar10,
    load_dataset,
    load_digits,
    load_mnist,
    read_idx,
)

# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

_IDX_CODES = {
    np.dtype(np.uint8): 0x08,
    np.dtype(np.int8): 0x09,
    np.dtype(np.int16): 0x0B,
    np.dtype(np.int32): 0x0C,
    np.dtype(np.float32): 0x0D,
    np.dtype(np.float64): 0x0E,
}


def idx_bytes(arr: np.ndarray) -> bytes:
    """Encode ``arr`` in IDX format, written independently of the reader under test."""
    header = bytes([0, 0, _IDX_CODES[arr.dtype], arr.ndim])
    header += struct.pack(f">{arr.ndim}i", *arr.shape)
    return header + arr.astype(arr.dtype.newbyteorder(">")).tobytes()


def write_idx(path: Path, arr: np.ndarray, compress: bool = False) -> Path:
    data = idx_bytes(arr)
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


def make_mnist_dir(
    root: Path, n_train: int = 7, n_test: int = 3, compress: bool = False, dotted: bool = False
) -> dict[str, np.ndarray]:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(123)
    arrays = {
        "train-images": rng.randint(0, 256, size=(n_train, 28, 28)).astype(np.uint8),
        "train-labels": rng.randint(0, 10, size=n_train).astype(np.uint8),
        "t10k-images": rng.randint(0, 256, size=(n_test, 28, 28)).astype(np.uint8),
        "t10k-labels": rng.randint(0, 10, size=n_test).astype(np.uint8),
    }
    sep = "." if dotted else "-"
    for stem, arr in arrays.items():
        name = f"{stem}{sep}idx{arr.ndim}-ubyte" + (".gz" if compress else "")
        write_idx(root / name, arr, compress=compress)
    return arrays


def write_cifar_batch(path: Path, images: np.ndarray, labels: list[int]) -> None:
    """Write a batch the way CIFAR-10 stores it: (N, 3072) rows of R plane, G plane, B plane."""
    batch = {
        b"batch_label": b"synthetic",
        b"labels": list(labels),
        b"data": images.reshape(len(images), 3 * 32 * 32).astype(np.uint8),
        b"filenames": [f"img{i}.png".encode() for i in range(len(images))],
    }
    path.write_bytes(pickle.dumps(batch, protocol=2))


# ---------------------------------------------------------------------------------------------
# digits
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_digits()


def test_digits_shapes_and_counts(digits: Dataset) -> None:
    from sklearn.datasets import load_digits as sk_load_digits

    counts = np.bincount(sk_load_digits().target)
    expected_test = sum(round(0.2 * int(n)) for n in counts)
    # Per-class rounding gives 359, not the 360 of round(0.2 * 1797).
    assert expected_test == 359
    assert digits.x_test.shape == (359, 1, 8, 8)
    assert digits.x_train.shape == (1797 - 359, 1, 8, 8)
    assert len(digits.y_train) + len(digits.y_test) == 1797
    assert digits.input_shape == (1, 8, 8)
    assert digits.num_classes == 10
    assert digits.name == "digits"
    test_counts = torch.bincount(digits.y_test, minlength=10).numpy()
    np.testing.assert_array_equal(test_counts, [round(0.2 * int(n)) for n in counts])


def test_digits_dtypes_and_labels(digits: Dataset) -> None:
    assert digits.x_train.dtype == torch.float32 and digits.x_test.dtype == torch.float32
    assert digits.y_train.dtype == torch.int64 and digits.y_test.dtype == torch.int64
    assert digits.x_train.device.type == "cpu"
    for y in (digits.y_train, digits.y_test):
        assert set(y.tolist()) == set(range(10))


def test_digits_train_split_standardised(digits: Dataset) -> None:
    assert abs(digits.x_train.mean().item()) < 1e-5
    assert abs(digits.x_train.std(correction=0).item() - 1.0) < 1e-5
    # The test split uses train statistics, so it is only close to standard.
    assert abs(digits.x_test.mean().item()) < 0.1


def test_digits_values_are_scaled_pixels(digits: Dataset) -> None:
    # Pixels 0 and 16 both occur in the training split, which pins down the affine map; undoing
    # it must put every pixel back on the integer grid 0..16.
    x = digits.x_train.flatten().double()
    pixels = (x - x.min()) / (x.max() - x.min()) * 16.0
    assert torch.allclose(pixels, pixels.round(), atol=1e-3)


def test_digits_deterministic_and_seed_dependent() -> None:
    a, b = load_digits(seed=0), load_digits(seed=0)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    c = load_digits(seed=1)
    assert c.x_test.shape == a.x_test.shape
    assert not torch.equal(a.x_test, c.x_test)


def test_digits_other_fraction() -> None:
    d = load_digits(test_fraction=0.5, seed=3)
    assert len(d.y_train) + len(d.y_test) == 1797
    assert abs(len(d.y_test) - 1797 / 2) <= 10


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_digits_bad_fraction(fraction: float) -> None:
    with pytest.raises(ValueError, match="test_fraction"):
        load_digits(test_fraction=fraction)


# ---------------------------------------------------------------------------------------------
# IDX
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_uint8_roundtrip(tmp_path: Path, compress: bool) -> None:
    rng = np.random.RandomState(0)
    images = rng.randint(0, 256, size=(5, 28, 28)).astype(np.uint8)
    labels = np.array([3, 1, 4, 1, 5], dtype=np.uint8)
    suffix = ".gz" if compress else ""
    got_images = read_idx(write_idx(tmp_path / f"img{suffix}", images, compress))
    got_labels = read_idx(write_idx(tmp_path / f"lab{suffix}", labels, compress))
    assert got_images.dtype == np.uint8 and got_images.shape == (5, 28, 28)
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, labels)
    assert got_images.flags.writeable


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.int32, np.float32, np.float64])
def test_read_idx_other_dtypes(tmp_path: Path, dtype: type) -> None:
    arr = (np.arange(24).reshape(2, 3, 4) - 7).astype(dtype)
    if np.dtype(dtype).kind == "f":
        arr = arr * np.asarray(1.25, dtype=dtype)
    got = read_idx(write_idx(tmp_path / "a.idx", arr))
    assert got.dtype == np.dtype(dtype) and got.dtype.isnative
    np.testing.assert_array_equal(got, arr)


def test_read_idx_gzip_detected_by_content(tmp_path: Path) -> None:
    arr = np.linspace(-1, 1, 10, dtype=np.float32)
    got = read_idx(write_idx(tmp_path / "no-suffix", arr, compress=True))
    np.testing.assert_array_equal(got, arr)


def test_read_idx_truncated(tmp_path: Path) -> None:
    data = idx_bytes(np.zeros((5, 28, 28), dtype=np.uint8))
    path = tmp_path / "short-idx3-ubyte"
    path.write_bytes(data[:-1])
    with pytest.raises(ValueError, match="short-idx3-ubyte") as info:
        read_idx(path)
    assert "length" in str(info.value)


def test_read_idx_trailing_bytes(tmp_path: Path) -> None:
    path = tmp_path / "long"
    path.write_bytes(idx_bytes(np.zeros(4, dtype=np.uint8)) + b"\0")
    with pytest.raises(ValueError, match="long"):
        read_idx(path)


def test_read_idx_truncated_header(tmp_path: Path) -> None:
    path = tmp_path / "hdr"
    path.write_bytes(bytes([0, 0, 0x08, 3]) + struct.pack(">i", 5))
    with pytest.raises(ValueError, match="hdr.*header"):
        read_idx(path)


def test_read_idx_bad_magic(tmp_path: Path) -> None:
    data = bytearray(idx_bytes(np.zeros(4, dtype=np.uint8)))
    data[0] = 0x12
    path = tmp_path / "badmagic"
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="badmagic.*magic"):
        read_idx(path)


def test_read_idx_bad_dtype_code(tmp_path: Path) -> None:
    data = bytearray(idx_bytes(np.zeros(4, dtype=np.uint8)))
    data[2] = 0x0A
    path = tmp_path / "badcode"
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="badcode.*0x0A"):
        read_idx(path)


def test_read_idx_corrupt_gzip(tmp_path: Path) -> None:
    path = tmp_path / "broken.gz"
    path.write_bytes(gzip.compress(idx_bytes(np.zeros(100, dtype=np.uint8)))[:-10])
    with pytest.raises(ValueError, match="broken.gz"):
        read_idx(path)


# ---------------------------------------------------------------------------------------------
# MNIST
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("compress", "dotted"), [(False, False), (True, False), (True, True)])
def test_load_mnist(tmp_path: Path, compress: bool, dotted: bool) -> None:
    arrays = make_mnist_dir(tmp_path, compress=compress, dotted=dotted)
    ds = load_mnist(tmp_path)
    assert ds.x_train.shape == (7, 1, 28, 28) and ds.x_test.shape == (3, 1, 28, 28)
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    assert ds.input_shape == (1, 28, 28) and ds.num_classes == 10 and ds.name == "mnist"
    np.testing.assert_array_equal(ds.y_train.numpy(), arrays["train-labels"])
    np.testing.assert_array_equal(ds.y_test.numpy(), arrays["t10k-labels"])

    train = arrays["train-images"].astype(np.float64) / 255.0
    mean, std = train.mean(), train.std()
    for split, key in (("train", "train-images"), ("test", "t10k-images")):
        x = getattr(ds, f"x_{split}")
        raw = arrays[key]
        i, r, c = len(raw) - 1, 5, 17
        assert x[i, 0, r, c].item() == pytest.approx((raw[i, r, c] / 255.0 - mean) / std, abs=1e-5)
        restored = x.double().numpy()[:, 0] * std + mean
        np.testing.assert_allclose(restored * 255.0, raw, atol=1e-3)
    assert abs(ds.x_train.mean().item()) < 1e-5
    assert abs(ds.x_train.std(correction=0).item() - 1.0) < 1e-5


def test_load_mnist_missing_file(tmp_path: Path) -> None:
    make_mnist_dir(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError) as info:
        load_mnist(tmp_path)
    message = str(info.value)
    assert "t10k-labels-idx1-ubyte" in message and "t10k-labels.idx1-ubyte.gz" in message
    assert "train-images" not in message


def test_load_mnist_empty_or_absent_dir(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        load_mnist(tmp_path)
    with pytest.raises(FileNotFoundError, match="nope"):
        load_mnist(tmp_path / "nope")


def test_load_mnist_label_count_mismatch(tmp_path: Path) -> None:
    make_mnist_dir(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(6, dtype=np.uint8))
    with pytest.raises(ValueError, match="7 images.*6 labels"):
        load_mnist(tmp_path)


# ---------------------------------------------------------------------------------------------
# CIFAR-10
# ---------------------------------------------------------------------------------------------


def make_cifar_dir(folder: Path, batches: tuple[str, ...] = ("data_batch_1",)) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(7)
    out = {}
    for name, n in [(b, 4) for b in batches] + [("test_batch", 2)]:
        images = rng.randint(0, 200, size=(n, 3, 32, 32)).astype(np.uint8)
        labels = rng.randint(0, 10, size=n).tolist()
        out[name] = (images, labels)
    # A marker only in the red plane: it must come back at channel 0, row 3, column 29.
    out[batches[0]][0][2, 0, 3, 29] = 255
    out["test_batch"][0][1, 0, 3, 29] = 255
    for name, (images, labels) in out.items():
        write_cifar_batch(folder / name, images, labels)
    return out


@pytest.mark.parametrize("nested", [False, True])
def test_load_cifar10(tmp_path: Path, nested: bool) -> None:
    folder = tmp_path / "cifar-10-batches-py" if nested else tmp_path
    make_cifar_dir(folder)
    with pytest.warns(UserWarning, match="only 1 of 5 .*data_batch_1"):
        ds = load_cifar10(tmp_path)
    assert ds.x_train.shape == (4, 3, 32, 32) and ds.x_test.shape == (2, 3, 32, 32)
    assert ds.x_train.dtype == torch.float32 and ds.y_test.dtype == torch.int64
    assert ds.input_shape == (3, 32, 32) and ds.num_classes == 10 and ds.name == "cifar10"


def test_load_cifar10_layout_and_normalisation(tmp_path: Path) -> None:
    batches = make_cifar_dir(tmp_path, ("data_batch_1", "data_batch_3"))
    with pytest.warns(UserWarning, match="data_batch_1, data_batch_3"):
        ds = load_cifar10(tmp_path)
    train_u8 = np.concatenate([batches["data_batch_1"][0], batches["data_batch_3"][0]])
    train_labels = batches["data_batch_1"][1] + batches["data_batch_3"][1]
    assert ds.x_train.shape == (8, 3, 32, 32)
    assert ds.y_train.tolist() == train_labels
    assert ds.y_test.tolist() == batches["test_batch"][1]

    train = train_u8.astype(np.float64) / 255.0
    mean = train.mean(axis=(0, 2, 3), keepdims=True)
    std = train.std(axis=(0, 2, 3), keepdims=True)
    assert not np.allclose(mean[0, 0], mean[0, 1])  # per-channel stats really differ
    for x, expected in ((ds.x_train, train_u8), (ds.x_test, batches["test_batch"][0])):
        restored = np.rint((x.double().numpy() * std + mean) * 255.0)
        np.testing.assert_array_equal(restored, expected)
    restored_train = (ds.x_train.double().numpy() * std + mean) * 255.0
    assert restored_train[2, 0, 3, 29] == pytest.approx(255.0, abs=1e-3)
    assert restored_train[2, 1, 3, 29] < 200 and restored_train[2, 0, 29, 3] < 200
    restored_test = (ds.x_test.double().numpy() * std + mean) * 255.0
    assert restored_test[1, 0, 3, 29] == pytest.approx(255.0, abs=1e-3)

    per_channel_mean = ds.x_train.mean(dim=(0, 2, 3))
    per_channel_std = ds.x_train.std(dim=(0, 2, 3), correction=0)
    assert torch.allclose(per_channel_mean, torch.zeros(3), atol=1e-5)
    assert torch.allclose(per_channel_std, torch.ones(3), atol=1e-5)


def test_load_cifar10_all_batches_no_warning(tmp_path: Path) -> None:
    import warnings

    make_cifar_dir(tmp_path, tuple(f"data_batch_{i}" for i in range(1, 6)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = load_cifar10(tmp_path)
    assert ds.x_train.shape == (20, 3, 32, 32)


def test_load_cifar10_missing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
        load_cifar10(tmp_path)
    make_cifar_dir(tmp_path)
    (tmp_path / "test_batch").unlink()
    with pytest.raises(FileNotFoundError, match="test_batch.*data_batch_1"):
        load_cifar10(tmp_path)
    make_cifar_dir(tmp_path)
    (tmp_path / "data_batch_1").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_1, data_batch_2"):
        load_cifar10(tmp_path)


def test_load_cifar10_rejects_foreign_pickle(tmp_path: Path) -> None:
    make_cifar_dir(tmp_path, tuple(f"data_batch_{i}" for i in range(1, 6)))
    (tmp_path / "test_batch").write_bytes(pickle.dumps({b"data": Path("x"), b"labels": []}))
    with pytest.raises(ValueError, match="test_batch.*not allowed"):
        load_cifar10(tmp_path)


def test_load_cifar10_old_numpy_pickle(tmp_path: Path) -> None:
    # The real files were written under numpy 1.x, which named numpy.core, not numpy._core.
    make_cifar_dir(tmp_path, tuple(f"data_batch_{i}" for i in range(1, 6)))
    path = tmp_path / "test_batch"
    blob = path.read_bytes().replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert b"numpy.core.multiarray" in blob
    path.write_bytes(blob)
    assert load_cifar10(tmp_path).x_test.shape == (2, 3, 32, 32)


def test_load_cifar10_bad_shape(tmp_path: Path) -> None:
    make_cifar_dir(tmp_path, tuple(f"data_batch_{i}" for i in range(1, 6)))
    batch = {b"data": np.zeros((2, 100), dtype=np.uint8), b"labels": [0, 1]}
    (tmp_path / "test_batch").write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(ValueError, match="test_batch.*3072"):
        load_cifar10(tmp_path)


# ---------------------------------------------------------------------------------------------
# load_dataset
# ---------------------------------------------------------------------------------------------


def test_load_dataset_dispatch(tmp_path: Path) -> None:
    d = load_dataset("digits", seed=5)
    assert d.name == "digits"
    assert torch.equal(d.y_test, load_digits(seed=5).y_test)
    assert load_dataset().name == "digits"

    make_mnist_dir(tmp_path / "mnist")
    assert load_dataset("MNIST", root=tmp_path / "mnist").x_train.shape == (7, 1, 28, 28)

    make_cifar_dir(tmp_path / "cifar", tuple(f"data_batch_{i}" for i in range(1, 6)))
    assert load_dataset("cifar10", root=str(tmp_path / "cifar")).x_train.shape == (20, 3, 32, 32)


def test_load_dataset_errors() -> None:
    with pytest.raises(ValueError, match="imagenet.*'digits', 'mnist', 'cifar10'"):
        load_dataset("imagenet")
    for name in ("mnist", "cifar10"):
        with pytest.raises(ValueError, match="root"):
            load_dataset(name)


def test_dataset_validates_shapes() -> None:
    x, y = torch.zeros(3, 1, 2, 2), torch.zeros(3, dtype=torch.int64)
    with pytest.raises(ValueError, match="y_test"):
        Dataset(x, y, x, y[:2], num_classes=2, name="t")
    with pytest.raises(ValueError, match="x_train"):
        Dataset(x[:, 0], y, x, y, num_classes=2, name="t")
    assert "n_train=3" in repr(Dataset(x, y, x, y, num_classes=2, name="t"))
