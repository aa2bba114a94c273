"""How stage artifacts are stored and read back: one place for every format.

A codec writes a stage's value into the stage's folder and reads it back. Tensors and models go
through ``torch.save`` and come back with ``torch.load(weights_only=True)``; records that are
text (critiques, verdicts) and results are JSON, readable without Python; rendered images stay
the PNG files the render stage wrote. The orchestrator reads every artifact back before it
commits the stage, so what cannot be read is never stored as finished.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch
from torch import nn

from ..atomic import write_atomic, write_error
from ..records import AlignmentSet, Critique, RenderedSample, Segmentation, Verdicts

__all__ = [
    "Codec",
    "DecodeContext",
    "ArtifactError",
    "TENSORS",
    "JSON",
    "MODEL",
    "ModelArtifact",
    "register_codec",
    "ALIGNMENT_SET",
    "SEGMENTATION",
    "CRITIQUES",
    "VERDICTS",
    "RENDERED",
    "codec_named",
    "find_codec",
    "same_codec",
    "BUILTIN_CODECS",
    "json_default",
]


class ArtifactError(Exception):
    """A stored artifact that cannot be read; the message names the file."""


def json_default(value: Any) -> Any:
    """JSON for the values plugins return besides plain ones: tensors, numpy scalars, paths."""
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and hasattr(value, "dtype"):  # numpy scalars
        return value.item()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


@dataclass(frozen=True)
class DecodeContext:
    """What reading an artifact may need: a builder of the run's model architecture."""

    build_model: Callable[[tuple[int, int, int], int], nn.Module] | None = None


class Codec(Protocol):
    name: str

    def encode(self, value: Any, folder: Path) -> None: ...

    def decode(self, folder: Path, ctx: DecodeContext) -> Any: ...


def _torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` with a failure that names the file (and a full disk: torch reports one
    as ``[enforce fail at inline_container.cc]``)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(obj, path)
    except (OSError, RuntimeError) as exc:
        raise write_error(path, exc) from exc


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except FileNotFoundError:
        raise ArtifactError(f"{path} is missing") from None
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
        raise ArtifactError(f"cannot read {path}: {type(exc).__name__}: {exc}") from exc


def _json_load(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ArtifactError(f"{path} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"cannot read {path}: {exc}") from exc


def _json_dumps(value: Any) -> str:
    return json.dumps(value, indent=2, default=json_default) + "\n"


class _Tensors:
    """A dict of tensors and plain values (attributions, masks): ``artifact.pt``."""

    name: ClassVar[str] = "tensors"
    file: ClassVar[str] = "artifact.pt"

    def encode(self, value: Any, folder: Path) -> None:
        _torch_save(value, folder / self.file)

    def decode(self, folder: Path, ctx: DecodeContext) -> Any:
        return _torch_load(folder / self.file)


class _Json:
    """Plain data (evaluations, results): ``artifact.json``, numpy scalars and paths written as
    the JSON they become (so a reused value equals a computed one)."""

    name: ClassVar[str] = "json"
    file: ClassVar[str] = "artifact.json"

    def encode(self, value: Any, folder: Path) -> None:
        write_atomic(folder / self.file, _json_dumps(value))

    def decode(self, folder: Path, ctx: DecodeContext) -> Any:
        return _json_load(folder / self.file)


class _Record:
    """One record with ``to_state``/``from_state`` (an alignment set, a segmentation)."""

    file: ClassVar[str] = "artifact.pt"

    def __init__(self, cls: type, name: str) -> None:
        self.cls = cls
        self.name = name

    def encode(self, value: Any, folder: Path) -> None:
        if not isinstance(value, self.cls):
            raise TypeError(f"expected {self.cls.__name__}, got {type(value).__name__}")
        _torch_save(value.to_state(), folder / self.file)

    def decode(self, folder: Path, ctx: DecodeContext) -> Any:
        path = folder / self.file
        state = _torch_load(path)
        try:
            return self.cls.from_state(state)
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(f"cannot read {path} as {self.cls.__name__}: {exc}") from exc


class _RecordList:
    """A list of text records (critiques, verdicts): ``artifact.json``, one object each."""

    file: ClassVar[str] = "artifact.json"

    def __init__(self, cls: type, name: str) -> None:
        self.cls = cls
        self.name = name

    def encode(self, value: Any, folder: Path) -> None:
        bad = [type(v).__name__ for v in value if not isinstance(v, self.cls)]
        if bad:
            raise TypeError(f"expected a list of {self.cls.__name__}, got {bad[0]}")
        write_atomic(folder / self.file, _json_dumps([v.to_state() for v in value]))

    def decode(self, folder: Path, ctx: DecodeContext) -> Any:
        path = folder / self.file
        try:
            return [self.cls.from_state(s) for s in _json_load(path)]
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(f"cannot read {path} as {self.cls.__name__} records: {exc}") from exc


class _Rendered:
    """Rendered samples: the PNG files the render stage wrote into its folder, indexed by
    ``artifact.json`` (ids, colours, file names); the image bytes are read back from the PNGs."""

    name: ClassVar[str] = "rendered"
    file: ClassVar[str] = "artifact.json"

    def encode(self, value: list[RenderedSample], folder: Path) -> None:
        index = []
        for r in value:
            names = [Path(f).name for f in r.files]
            if len(names) != 3 or not all((folder / n).is_file() for n in names):
                raise ValueError(f"rendered sample {r.sample_id}: its three PNG files are not in {folder}")
            for n, data in zip(names, r.images, strict=True):
                if (folder / n).read_bytes() != data:
                    raise ValueError(f"rendered sample {r.sample_id}: {n} differs from the image in memory")
            index.append({"sample_id": r.sample_id, "colors": list(r.colors), "files": list(r.files)})
        write_atomic(folder / self.file, _json_dumps(index))

    def decode(self, folder: Path, ctx: DecodeContext) -> list[RenderedSample]:
        out = []
        for entry in _json_load(folder / self.file):
            names = [Path(f).name for f in entry["files"]]
            images = []
            for n in names:
                try:
                    images.append((folder / n).read_bytes())
                except OSError as exc:
                    raise ArtifactError(f"cannot read {folder / n}: {exc.strerror or exc}") from None
            out.append(
                RenderedSample(
                    sample_id=entry["sample_id"],
                    original=images[0],
                    clusters=images[1],
                    overlay=images[2],
                    colors=tuple(entry["colors"]),
                    files=tuple(entry["files"]),
                )
            )
        return out


@dataclass(frozen=True)
class ModelArtifact:
    """What a model stage returns: the model, what it was built for, and the details of how it
    was chosen (a hyperparameter grid's validation scores; stored as ``details.json``)."""

    model: nn.Module
    input_shape: tuple[int, int, int]
    num_classes: int
    details: dict[str, Any] = field(default_factory=dict)


class _Model:
    """A model: its ``state_dict`` with the input shape and class count it was built for, so
    that it can be rebuilt without loading the data set. Encodes a :class:`ModelArtifact`,
    decodes to the ``nn.Module`` (in eval mode)."""

    name: ClassVar[str] = "model"
    file: ClassVar[str] = "artifact.pt"

    def encode(self, value: ModelArtifact, folder: Path) -> None:
        if not isinstance(value, ModelArtifact) or not isinstance(value.model, nn.Module):
            raise TypeError(f"expected a model, got {type(getattr(value, 'model', value)).__name__}")
        state = {k: v.detach().cpu() for k, v in value.model.state_dict().items()}
        blob = {"state_dict": state, "input_shape": list(value.input_shape), "num_classes": int(value.num_classes)}
        _torch_save(blob, folder / self.file)
        if value.details:
            write_atomic(folder / "details.json", _json_dumps(value.details))

    def details(self, folder: Path) -> dict[str, Any]:
        """How the stored model was chosen (``{}`` when it says nothing)."""
        path = folder / "details.json"
        return _json_load(path) if path.exists() else {}

    def decode(self, folder: Path, ctx: DecodeContext) -> nn.Module:
        path = folder / self.file
        state = _torch_load(path)
        if ctx.build_model is None:
            raise ArtifactError(f"{path} is a model: reading it needs the run's model factory")
        try:
            model = ctx.build_model(tuple(state["input_shape"]), int(state["num_classes"]))
            model.load_state_dict(state["state_dict"])
        except (KeyError, RuntimeError, TypeError) as exc:
            raise ArtifactError(f"cannot load {path} into the [model] architecture: {exc}") from exc
        return model.eval()


TENSORS = _Tensors()
JSON = _Json()
MODEL = _Model()
RENDERED = _Rendered()
ALIGNMENT_SET = _Record(AlignmentSet, "alignment-set")
SEGMENTATION = _Record(Segmentation, "segmentation")
CRITIQUES = _RecordList(Critique, "critiques")
VERDICTS = _RecordList(Verdicts, "verdicts")

#: lvlmva's own codecs, by name: a plugin's codec may not take one of these names
BUILTIN_CODECS: dict[str, Codec] = {
    c.name: c for c in (TENSORS, JSON, MODEL, RENDERED, ALIGNMENT_SET, SEGMENTATION, CRITIQUES, VERDICTS)
}

_BY_NAME: dict[str, Codec] = dict(BUILTIN_CODECS)


def same_codec(a: Any, b: Any) -> bool:
    """Whether two codec objects store alike: the same object, or two instances of one class
    with equal attributes (a plugin module imported twice, a record codec made twice)."""
    if a is b:
        return True
    if type(a) is not type(b):
        return False
    try:
        return bool(vars(a) == vars(b))
    except (TypeError, RuntimeError, ValueError):  # attributes without equality (tensors)
        return False


def find_codec(name: str) -> Codec | None:
    """A built-in codec, or one registered in this process with :func:`register_codec`."""
    return _BY_NAME.get(name)


def codec_named(name: str) -> Codec:
    """The codec a stage record names, among :func:`find_codec`'s. A plugin stage's codec is
    found through the plugin registry (``open_run(...).load`` does that)."""
    codec = find_codec(name)
    if codec is None:
        raise ArtifactError(f"unknown artifact format {name!r}; known: {', '.join(_BY_NAME)}")
    return codec


def register_codec(codec: Codec) -> None:
    """Make a plugin stage's own codec readable by name in this process."""
    if codec.name in _BY_NAME and not same_codec(_BY_NAME[codec.name], codec):
        raise ValueError(f"a different codec is already named {codec.name!r}")
    _BY_NAME.setdefault(codec.name, codec)
