"""Waterbirds and CelebA as released: the two image benchmarks of subpopulation shift that group
DRO (Sagawa et al. 2020), DFR (Kirichenko et al. 2023) and SubpopBench (Yang et al. 2023) report.

- ``waterbirds``: the released folder (``waterbird_complete95_forest2water2``): ``metadata.csv``
  with one row per image (``img_filename`` relative to the folder, ``y`` = 1 for a waterbird,
  ``place`` = 1 for a water background, ``split`` 0/1/2 = train/val/test). The background is the
  spurious attribute; group ``2 * y + place``.
- ``celeba``: ``img_align_celeba/<file>.jpg``, ``list_attr_celeba.txt`` (the image count, the
  attribute names, then ``file v1 .. vN`` with -1/1) and ``list_eval_partition.txt`` (``file
  split``, 0/1/2). A target and a spurious attribute are chosen by name (Blond_Hair and Male, the
  references' pair); group ``2 * target + spurious``.

Every row of the tables is checked, and every listed image looked up, before any image is
decoded; then the images a run uses (all, or a seeded subsample per split stratified by group)
are decoded and a file that cannot be read is reported with the others. Problems stop the run
(exit 2) with the first 20 and their count. Nothing marks the spurious pixels in these data sets
(a background, a person's sex), so there are no true masks: the oracle critic and the true-mask
reference cannot run, the LVLM critics can. Images are stored as uint8 at ``size`` x ``size``
(the references use 224; the default 64 keeps a CPU run short) and normalised per channel by the
training split's mean and standard deviation.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, ClassVar

import numpy as np
import torch
from pydantic import Field, model_validator

from lvlmva.protocols import DatasetError, PluginOptions, RunContext
from lvlmva.records import SpuriousDataset

from .class_specs import load_class_spec
from .folders import Problems, _assemble, _read_csv

__all__ = ["WaterbirdsProvider", "CelebaProvider", "stratified_subsample"]

#: the split codes of both releases
SPLITS = {"0": "train", "1": "val", "2": "test"}


@dataclass
class _Entry:
    """One image a table lists: where it was listed (for messages), its split, file and values."""

    where: str
    split: str
    path: Path
    label: int
    spurious: int


def stratified_subsample(groups: np.ndarray, size: int, generator: torch.Generator) -> np.ndarray:
    """Sorted indices of ``size`` of the samples whose group labels are ``groups``: every group
    keeps its share (``size * n_g / n`` rounded by largest remainder, ties to the lower group),
    its members chosen by a permutation drawn from ``generator``."""
    if size > len(groups):
        raise ValueError(f"{size} asked, {len(groups)} there")
    names, counts = np.unique(groups, return_counts=True)
    exact = size * counts / counts.sum()
    quota = np.floor(exact).astype(np.int64)
    left = size - int(quota.sum())
    # largest remainders first; a stable sort keeps the lower group first among equals
    order = np.argsort(-(exact - quota), kind="stable")
    quota[order[:left]] += 1
    chosen = []
    for name, k in zip(names, quota, strict=True):
        members = np.nonzero(groups == name)[0]
        chosen.append(members[torch.randperm(len(members), generator=generator).numpy()[:k]])
    return np.sort(np.concatenate(chosen))


def _read_rgb(path: Path, size: int, center_crop: bool) -> np.ndarray:
    """uint8 ``[3, size, size]``; with ``center_crop`` the central square of the image (its
    shorter side) is resized, else the whole image (squeezed to a square). Raises what PIL raises
    for a file it cannot decode."""
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        im = im.convert("RGB")
        if center_crop and im.width != im.height:
            side = min(im.width, im.height)
            left, top = (im.width - side) // 2, (im.height - side) // 2
            im = im.crop((left, top, left + side, top + side))
        if im.size != (size, size):
            im = im.resize((size, size), Image.Resampling.BILINEAR)
        arr = np.asarray(im, dtype=np.uint8)
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def _choose(entries: list[_Entry], limits: dict[str, int | None], ctx: RunContext, what: str) -> list[_Entry]:
    """The entries a run uses: per split all, or ``limits[split]`` of them stratified by group."""
    chosen: list[_Entry] = []
    for split in ("train", "val", "test"):
        members = [e for e in entries if e.split == split]
        limit = limits[split]
        if limit is None or not members:
            chosen += members
            continue
        if limit > len(members):
            raise DatasetError(f"{what}: {split}_size = {limit}, but the {split} split has {len(members)} images")
        groups = np.array([2 * e.label + e.spurious for e in members])
        index = stratified_subsample(groups, limit, ctx.generator(f"{what}-{split}-subsample"))
        chosen += [members[i] for i in index]
    return chosen


def _decode(entries: list[_Entry], size: int, center_crop: bool, problems: Problems) -> dict[str, dict]:
    """Every entry's image (collecting the files that cannot be read), grouped by split in the
    form the folder providers assemble."""
    parts: dict[str, dict] = {}
    for entry in entries:
        try:
            image = _read_rgb(entry.path, size, center_crop)
        except FileNotFoundError:
            problems.add(entry.where, f"image {entry.path} does not exist")
            continue
        except Exception as exc:  # PIL raises several types for a file it cannot decode
            problems.add(entry.where, f"image {entry.path} cannot be read as an image ({type(exc).__name__}: {exc})")
            continue
        part = parts.setdefault(entry.split, {"images": [], "labels": [], "flags": [], "masks": []})
        part["images"].append(image)
        part["labels"].append(entry.label)
        part["flags"].append(bool(entry.spurious))
        part["masks"].append(None)  # no true masks in these releases
    return parts


# the options both releases share, declared after each one's root
ImageSize = Annotated[int, Field(ge=16, le=1024, description="Images are resized to size x size (the references use 224; 64 keeps a CPU run short).")]
TrainSize = Annotated[int | None, Field(ge=1, description="Use this many training images, a seeded subsample stratified by group (every group keeps its share); None: all.")]
ValSize = Annotated[int | None, Field(ge=1, description="Use this many validation images (seeded, stratified by group); None: all.")]
TestSize = Annotated[int | None, Field(ge=1, description="Use this many test images (seeded, stratified by group); None: all.")]


class _SubsampleOptions(PluginOptions):
    """Options that declare ``train_size``, ``val_size`` and ``test_size`` (after their root,
    so that the settings reference lists root first)."""

    def limits(self) -> dict[str, int | None]:
        return {split: getattr(self, f"{split}_size") for split in ("train", "val", "test")}


def _flag01(text: str | None) -> int | None:
    value = (text or "").strip()
    return int(value) if value in ("0", "1") else None


# -- Waterbirds ------------------------------------------------------------------------------------


class WaterbirdsOptions(_SubsampleOptions):
    """Options of ``waterbirds``."""

    root: Path = Field(
        description="The released Waterbirds folder (waterbird_complete95_forest2water2): metadata.csv "
        "(img_filename, y, split, place) and the images under it (001.Black_footed_Albatross/...).",
        json_schema_extra={"fingerprint": "listing"},
    )
    size: ImageSize = 64
    train_size: TrainSize = None
    val_size: ValSize = None
    test_size: TestSize = None
    center_crop: bool = Field(False, description="Crop each photograph to its central square before resizing; false: resize the whole photograph (squeezed to a square).")


class WaterbirdsProvider:
    """Waterbirds as released: landbird / waterbird, the land / water background spurious.

    Reads metadata.csv (img_filename, y, place, split); groups class x background; no true
    masks (the oracle critic cannot run, the LVLM critics can)."""

    Options = WaterbirdsOptions
    has_groups: ClassVar[bool] = True
    has_true_masks: ClassVar[bool] = False

    def __init__(self, options: WaterbirdsOptions) -> None:
        self.options = options

    def entries(self, problems: Problems) -> list[_Entry]:
        """Every row of metadata.csv, checked (the image's existence too)."""
        root = self.options.root
        if not root.is_dir():
            raise DatasetError(f"waterbirds: root {root} is not a folder")
        metadata = root / "metadata.csv"
        table = _read_csv(metadata, {"img_filename", "y", "split", "place"}, "waterbirds: metadata")
        entries: list[_Entry] = []
        first_line: dict[str, int] = {}
        for line, row in table:
            where = f"metadata.csv line {line}"
            name = (row.get("img_filename") or "").strip()
            if not name:
                problems.add(where, "no img_filename")
                continue
            where += f" ({name})"
            if name in first_line:
                problems.add(where, f"image listed again (first on line {first_line[name]}): one row per image")
                continue
            first_line[name] = line
            label, place = _flag01(row.get("y")), _flag01(row.get("place"))
            split = SPLITS.get((row.get("split") or "").strip())
            bad = []
            if label is None:
                bad.append(f"y {row.get('y')!r} is not 0 (landbird) or 1 (waterbird)")
            if place is None:
                bad.append(f"place {row.get('place')!r} is not 0 (land) or 1 (water)")
            if split is None:
                bad.append(f"split {row.get('split')!r} is not 0, 1 or 2 (train, val, test)")
            path = root / name
            if not path.is_file():
                bad.append(f"image {path} does not exist")
            if bad:
                problems.add(where, "; ".join(bad))
                continue
            entries.append(_Entry(where, split, path, label, place))  # type: ignore[arg-type]
        return entries

    def load(self, ctx: RunContext) -> SpuriousDataset:
        o = self.options
        problems = Problems("waterbirds")
        entries = self.entries(problems)
        problems.raise_if_any()
        chosen = _choose(entries, o.limits(), ctx, "waterbirds")
        parts = _decode(chosen, o.size, o.center_crop, problems)
        problems.raise_if_any()
        names, descriptions = load_class_spec("waterbirds")
        data = _assemble(parts, "waterbirds", names, descriptions, "water", "waterbirds")
        return dataclasses.replace(data, group_names=tuple(f"{c}/{p}" for c in names for p in ("land", "water")))


# -- CelebA ----------------------------------------------------------------------------------------


def _readable(attribute: str) -> str:
    return attribute.replace("_", " ").lower()


class CelebaOptions(_SubsampleOptions):
    """Options of ``celeba``."""

    root: Path = Field(
        description="The CelebA folder: img_align_celeba/ (the aligned and cropped JPEGs), "
        "list_attr_celeba.txt and list_eval_partition.txt, as released.",
        json_schema_extra={"fingerprint": "listing"},
    )
    size: ImageSize = 64
    train_size: TrainSize = None
    val_size: ValSize = None
    test_size: TestSize = None
    target: str = Field("Blond_Hair", min_length=1, description="The attribute to classify, by its name in list_attr_celeba.txt (1: class 1).")
    spurious: str = Field("Male", min_length=1, description="The spurious attribute, by its name in list_attr_celeba.txt; groups are target x spurious.")
    class_descriptions: list[str] | None = Field(
        None,
        min_length=2,
        max_length=2,
        description="What the two classes (without, with the target attribute) look like, for the critic's prompt; "
        "None: the shipped descriptions for Blond_Hair (datasets/specs/celeba.toml), a plain sentence for any other target.",
    )
    center_crop: bool = Field(True, description="Crop the 178 x 218 photographs to their central 178 x 178 square before resizing, as the references do; false: resize the whole photograph (squeezed).")

    @model_validator(mode="after")
    def _two_attributes(self) -> CelebaOptions:
        if self.target == self.spurious:
            raise ValueError(f"target and spurious are both {self.target!r}: the spurious attribute must be another one")
        return self


def _read_lines(path: Path, what: str) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DatasetError(f"celeba: {what} {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"celeba: {what} {path} cannot be read: {exc}") from None


class CelebaProvider:
    """CelebA as released: a target attribute against a spurious one (Blond_Hair x Male).

    Reads img_align_celeba/, list_attr_celeba.txt and list_eval_partition.txt; groups target x
    spurious; no true masks (the oracle critic cannot run, the LVLM critics can)."""

    Options = CelebaOptions
    has_groups: ClassVar[bool] = True
    has_true_masks: ClassVar[bool] = False

    def __init__(self, options: CelebaOptions) -> None:
        self.options = options

    def _attributes(self, problems: Problems) -> dict[str, tuple[str, int, int]]:
        """file -> (where, target, spurious) from list_attr_celeba.txt, every row checked."""
        o = self.options
        path = o.root / "list_attr_celeba.txt"
        lines = _read_lines(path, "attribute file")
        if len(lines) < 2:
            raise DatasetError(f"celeba: {path} needs the image count on line 1 and the attribute names on line 2")
        try:
            count = int(lines[0].strip())
        except ValueError:
            raise DatasetError(f"celeba: {path.name} line 1: {lines[0].strip()!r} is not the number of images") from None
        names = lines[1].split()
        for option, name in (("target", o.target), ("spurious", o.spurious)):
            if name not in names:
                raise DatasetError(
                    f"celeba: the {option} attribute {name!r} is not in {path.name}; its attributes: {', '.join(names) or '(none)'}"
                )
        columns = (names.index(o.target) + 1, names.index(o.spurious) + 1)
        rows: dict[str, tuple[str, int, int]] = {}
        listed = 0
        for number, line in enumerate(lines[2:], start=3):
            fields = line.split()
            if not fields:
                continue
            listed += 1
            where = f"{path.name} line {number} ({fields[0]})"
            if len(fields) != len(names) + 1:
                problems.add(where, f"{len(fields) - 1} values, line 2 names {len(names)} attributes")
                continue
            if fields[0] in rows:
                problems.add(where, f"image listed again (first at {rows[fields[0]][0]}): one row per image")
                continue
            values = []
            for option, column in zip(("target", "spurious"), columns, strict=True):
                text = fields[column]
                if text not in ("-1", "1"):
                    problems.add(where, f"{names[column - 1]} ({option}) is {text!r}, not -1 or 1")
                values.append(int(text == "1"))
            if all(fields[c] in ("-1", "1") for c in columns):
                rows[fields[0]] = (where, values[0], values[1])
        if listed != count:
            problems.add(f"{path.name} line 1", f"says {count} images, the file lists {listed}")
        return rows

    def _partition(self, problems: Problems) -> dict[str, tuple[str, str]]:
        """file -> (where, split) from list_eval_partition.txt, every row checked."""
        path = self.options.root / "list_eval_partition.txt"
        out: dict[str, tuple[str, str]] = {}
        for number, line in enumerate(_read_lines(path, "partition file"), start=1):
            fields = line.split()
            if not fields:
                continue
            where = f"{path.name} line {number} ({fields[0]})"
            if len(fields) != 2:
                problems.add(where, f"expected 'file split', got {len(fields)} fields")
                continue
            if fields[0] in out:
                problems.add(where, f"image listed again (first at {out[fields[0]][0]}): one row per image")
                continue
            split = SPLITS.get(fields[1])
            if split is None:
                problems.add(where, f"split {fields[1]!r} is not 0, 1 or 2 (train, val, test)")
                continue
            out[fields[0]] = (where, split)
        return out

    def entries(self, problems: Problems) -> list[_Entry]:
        """Every image both lists name, checked against the other list and the image folder."""
        root = self.options.root
        if not root.is_dir():
            raise DatasetError(f"celeba: root {root} is not a folder")
        folder = root / "img_align_celeba"
        if not folder.is_dir():
            raise DatasetError(f"celeba: {folder} is not a folder (the aligned and cropped images go there)")
        attributes = self._attributes(problems)
        partition = self._partition(problems)
        # one listing of the folder instead of a stat per image (CelebA has 202,599)
        with os.scandir(folder) as found:
            present = {item.name for item in found if item.is_file()}
        entries = []
        for name, (where, label, spurious) in attributes.items():
            if name not in partition:
                problems.add(where, "not in list_eval_partition.txt (every image needs its split)")
                continue
            if name not in present:
                problems.add(where, f"image {folder / name} does not exist")
                continue
            entries.append(_Entry(where, partition[name][1], folder / name, label, spurious))
        for name, (where, _) in partition.items():
            if name not in attributes:
                problems.add(where, "not in list_attr_celeba.txt (every image needs its attributes)")
        return entries

    def classes(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """Class names and descriptions: the shipped ones for Blond_Hair, else from the target's name."""
        o = self.options
        if o.target == "Blond_Hair":
            names, descriptions = load_class_spec("celeba")
        else:
            attribute = _readable(o.target)
            names = (f"not {attribute}", attribute)
            descriptions = (
                f"A face photograph in which the person does not show the attribute '{attribute}'.",
                f"A face photograph in which the person shows the attribute '{attribute}'.",
            )
        if o.class_descriptions is not None:
            descriptions = tuple(o.class_descriptions)
        return names, descriptions

    def load(self, ctx: RunContext) -> SpuriousDataset:
        o = self.options
        problems = Problems("celeba")
        entries = self.entries(problems)
        problems.raise_if_any()
        chosen = _choose(entries, o.limits(), ctx, "celeba")
        parts = _decode(chosen, o.size, o.center_crop, problems)
        problems.raise_if_any()
        names, descriptions = self.classes()
        spurious = _readable(o.spurious)
        data = _assemble(parts, "celeba", names, descriptions, spurious, "celeba")
        return dataclasses.replace(data, group_names=tuple(f"{c}/{s}" for c in names for s in (f"not {spurious}", spurious)))
