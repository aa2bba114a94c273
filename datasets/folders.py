"""Data sets from the user's own folders: knee radiographs (Kellgren-Lawrence ImageFolder with a
marker CSV), skin lesions (the CDEP layout or a CSV) and MedMNIST npz files.

Every provider reads and checks every row before anything trains: a missing or unreadable image,
an unknown label or grade, a mask of the wrong size, a marker row for an image that is not
there. The run then stops (exit 2) with the first 20 problems and their count; nothing is
guessed or skipped silently. Images are stored as uint8 at ``size`` x ``size`` and normalised
per channel by the training split's mean and standard deviation (recorded in results.json).
"""

from __future__ import annotations

import csv
import posixpath
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from lvlmva.protocols import DatasetError, PluginOptions, RunContext
from lvlmva.records import Split, SpuriousDataset

from .class_specs import load_class_spec
from .synthetic import UINT8_SCALE, shortcut_group_names, train_normalization

__all__ = [
    "IMAGE_SUFFIXES",
    "Problems",
    "KneeFolderProvider",
    "IsicFolderProvider",
    "MedmnistProvider",
    "DERMAMNIST_BENIGN_MALIGNANT",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
SHOWN_PROBLEMS = 20

#: DermaMNIST's seven classes (akiec, bcc, bkl, df, mel, nv, vasc) as benign (0) / malignant (1):
#: actinic keratoses / intraepithelial carcinoma, basal cell carcinoma and melanoma are malignant
DERMAMNIST_BENIGN_MALIGNANT = {0: 1, 1: 1, 2: 0, 3: 0, 4: 1, 5: 0, 6: 0}


class Problems:
    """Collects what is wrong with a data set's rows; :meth:`raise_if_any` stops with the first
    20 and the count."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.items: list[str] = []

    def add(self, where: str | Path, problem: str) -> None:
        self.items.append(f"{where}: {problem}")

    def __len__(self) -> int:
        return len(self.items)

    def raise_if_any(self) -> None:
        if not self.items:
            return
        shown = self.items[:SHOWN_PROBLEMS]
        more = len(self.items) - len(shown)
        lines = [f"{self.what}: {len(self.items)} problem(s) with the data set" + (f" (the first {len(shown)} shown)" if more else "")]
        lines += [f"  - {item}" for item in shown]
        if more:
            lines.append(f"  ... and {more} more")
        raise DatasetError("\n".join(lines))


def _read_image(path: Path, channels: int, size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """uint8 ``[C, size, size]`` and the original ``(height, width)``; raises ``OSError`` or
    ``ValueError`` with the reason when the file cannot be decoded."""
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        original = (im.height, im.width)
        im = im.convert("L" if channels == 1 else "RGB")
        if im.size != (size, size):
            im = im.resize((size, size), Image.Resampling.BILINEAR)
        arr = np.asarray(im, dtype=np.uint8)
    arr = arr[None] if channels == 1 else arr.transpose(2, 0, 1)
    return np.ascontiguousarray(arr), original


def _read_mask(path: Path, original: tuple[int, int], size: int) -> np.ndarray:
    """bool ``[size, size]`` from a mask file of the image's original size (nonzero = spurious)."""
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        if (im.height, im.width) != original:
            raise ValueError(f"mask is {im.width} x {im.height}, the image is {original[1]} x {original[0]}")
        im = im.convert("L")
        if im.size != (size, size):
            im = im.resize((size, size), Image.Resampling.NEAREST)
        return np.asarray(im) > 0


def _box_mask(text: str, original: tuple[int, int], size: int) -> np.ndarray:
    """bool ``[size, size]`` for a box ``"x0,y0,x1,y1"`` in the original image's pixels."""
    try:
        x0, y0, x1, y1 = (float(v) for v in text.replace(";", ",").split(","))
    except ValueError:
        raise ValueError(f"box {text!r} is not 'x0,y0,x1,y1'") from None
    h, w = original
    if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
        raise ValueError(f"box {text!r} lies outside the {w} x {h} image or is empty")
    mask = np.zeros((size, size), dtype=bool)
    r0, r1 = int(np.floor(y0 / h * size)), int(np.ceil(y1 / h * size))
    c0, c1 = int(np.floor(x0 / w * size)), int(np.ceil(x1 / w * size))
    mask[r0:r1, c0:c1] = True
    return mask


def _flag(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "yes", "true", "y", "present"):
        return True
    if value in ("0", "no", "false", "n", "absent"):
        return False
    raise ValueError(f"{text!r} is not a yes/no value (1/0, yes/no, true/false)")


@dataclass
class _Row:
    split: str
    path: Path
    label: int
    shortcut: bool | None = None
    mask_file: Path | None = None
    box: str | None = None


def _load_rows(rows: Sequence[_Row], channels: int, size: int, problems: Problems, masks_wanted: bool) -> dict[str, dict]:
    """Read every row (collecting problems); per split: images, labels, shortcut flags, masks."""
    out: dict[str, dict] = {}
    for row in rows:
        try:
            image, original = _read_image(row.path, channels, size)
        except FileNotFoundError:
            problems.add(row.path, "no such file")
            continue
        except Exception as exc:  # PIL raises several types for a file it cannot decode
            problems.add(row.path, f"cannot be read as an image ({type(exc).__name__}: {exc})")
            continue
        mask = None
        if masks_wanted:
            try:
                if row.mask_file is not None:
                    mask = _read_mask(row.mask_file, original, size)
                elif row.box:
                    mask = _box_mask(row.box, original, size)
                else:
                    mask = np.zeros((size, size), dtype=bool)
            except FileNotFoundError:
                problems.add(row.path, f"mask file {row.mask_file} does not exist")
                continue
            except Exception as exc:
                problems.add(row.path, f"mask {row.mask_file or row.box}: {exc}")
                continue
        part = out.setdefault(row.split, {"images": [], "labels": [], "flags": [], "masks": []})
        part["images"].append(image)
        part["labels"].append(row.label)
        part["flags"].append(row.shortcut)
        part["masks"].append(mask)
    return out


def _assemble(
    parts: dict[str, dict],
    family: str,
    class_names: tuple[str, ...],
    descriptions: tuple[str, ...],
    shortcut: str | None,
    what: str,
) -> SpuriousDataset:
    for needed in ("train", "test"):
        if not parts.get(needed, {}).get("images"):
            raise DatasetError(f"{what}: the {needed} split has no images")
    stacked = {name: torch.from_numpy(np.stack(part["images"])) for name, part in parts.items() if part["images"]}
    norm = train_normalization(stacked["train"])
    with_groups = shortcut is not None and all(f is not None for p in parts.values() for f in p["flags"])
    with_masks = all(m is not None for p in parts.values() for m in p["masks"])

    def split(name: str) -> Split | None:
        part = parts.get(name)
        if not part or not part["images"]:
            return None
        labels = torch.tensor(part["labels"], dtype=torch.int64)
        groups = None
        if with_groups:
            groups = 2 * labels + torch.tensor([bool(f) for f in part["flags"]], dtype=torch.int64)
        masks = torch.from_numpy(np.stack(part["masks"])) if with_masks else None
        return Split(images=stacked[name], labels=labels, groups=groups, spurious_masks=masks, normalization=norm)

    group_names = shortcut_group_names(class_names, shortcut) if with_groups and shortcut else ()
    return SpuriousDataset(
        family=family,
        train=split("train"),  # type: ignore[arg-type]
        test=split("test"),  # type: ignore[arg-type]
        val=split("val"),
        class_names=class_names,
        class_descriptions=descriptions,
        group_names=group_names,
        input_scale=UINT8_SCALE,
    )


def _read_csv(path: Path, columns: set[str], what: str) -> list[tuple[int, dict[str, str]]]:
    """The rows of a user's CSV with the line each stands on, as an editor numbers it; a missing
    file, an unreadable one or missing columns stop the run with a message that names the file."""
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            # the reader's own line count: blank lines, which it skips, still count (a row with
            # a quoted line break is named by its last line)
            table = [(reader.line_num, entry) for entry in reader]
    except FileNotFoundError:
        raise DatasetError(f"{what} {path} does not exist") from None
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DatasetError(f"{what} {path} cannot be read: {exc}") from None
    if not table or not columns <= set(table[0][1]):
        raise DatasetError(f"{what} {path} needs the columns {', '.join(repr(c) for c in sorted(columns))}")
    return table


def _box_numbers(text: str) -> tuple[float, ...] | str:
    """A box's numbers (so that "2,3,12,10" and "2; 3; 12; 10" compare equal), or its text when
    it has none."""
    try:
        return tuple(float(v) for v in text.replace(";", ",").split(","))
    except ValueError:
        return text


def _file_key(text: str) -> str:
    """A relative file name written either way ("masks\\a.png", "./masks/a.png")."""
    return posixpath.normpath(text.replace("\\", "/")) if text else ""


def _marker_text(values: tuple[bool, str, str]) -> str:
    """A marker row's values as the user wrote them, for a message."""
    marker, mask, box = values
    text = f"marker {int(marker)}"
    if box:
        text += f", box {box!r}"
    if mask:
        text += f", mask {mask!r}"
    return text


def _images_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


# -- knee ------------------------------------------------------------------------------------------


class KneeFolderOptions(PluginOptions):
    """Options of ``knee-folder``."""

    root: Path = Field(
        description="Folder with train/, val/ (optional) and test/, each holding one folder per Kellgren-Lawrence grade 0..4 (the kneeKL224 layout).",
        json_schema_extra={"fingerprint": "listing"},
    )
    markers: Path | None = Field(
        None,
        description="CSV with a row per image: 'image' (path relative to root, e.g. train/3/9012.png), "
        "'marker' (1/0, yes/no), optional 'box' (x0,y0,x1,y1 in the image's pixels) or 'mask' (a mask "
        "file, relative to the CSV's folder, of the image's size). Gives groups (class x marker) and, "
        "where every marked image has a box or mask, true masks. None: no groups.",
        json_schema_extra={"fingerprint": "listing"},
    )
    oa_threshold: int = Field(2, ge=1, le=4, description="Osteoarthritis = KL grade >= this (2: the usual definition).")
    size: int = Field(224, ge=16, le=1024, description="Images are resized to size x size.")
    channels: Literal[1, 3] = Field(1, description="1: grey (radiographs); 3: the grey repeated as RGB (for ImageNet weights with the 3-channel stem).")


class KneeFolderProvider:
    """Knee radiographs in the Kellgren-Lawrence ImageFolder layout; OA = KL >= threshold;
    laterality markers from a CSV (groups: class x marker)."""

    Options = KneeFolderOptions
    has_groups: ClassVar[bool] = True
    has_true_masks: ClassVar[bool] = True

    def __init__(self, options: KneeFolderOptions) -> None:
        self.options = options

    def rows(self, problems: Problems) -> list[_Row]:
        o = self.options
        root = o.root
        if not root.is_dir():
            raise DatasetError(f"knee-folder: root {root} is not a folder")
        rows: dict[str, _Row] = {}
        for split in ("train", "val", "test"):
            folder = root / split
            if not folder.is_dir():
                if split != "val":
                    problems.add(folder, "missing (train/ and test/ are required)")
                continue
            # an image beside the grade folders has no grade: it would be left out unseen
            for path in _images_under(folder):
                problems.add(path, f"an image outside the grade folders (images go in {split}/0 .. {split}/4)")
            for grade_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
                if grade_dir.name not in {"0", "1", "2", "3", "4"}:
                    problems.add(grade_dir, "not a Kellgren-Lawrence grade folder (0..4)")
                    continue
                label = int(int(grade_dir.name) >= o.oa_threshold)
                for path in _images_under(grade_dir):
                    rows[path.relative_to(root).as_posix()] = _Row(split, path, label)
        if o.markers is not None:
            self._read_markers(rows, problems)
        return list(rows.values())

    def _read_markers(self, rows: dict[str, _Row], problems: Problems) -> None:
        path = self.options.markers
        assert path is not None
        table = _read_csv(path, {"image", "marker"}, "knee-folder: markers CSV")
        seen = set()
        # the line and the values of the row that gave each image its marker
        given: dict[str, tuple[int, tuple[bool, str, str]]] = {}
        for line, entry in table:
            where = f"{path.name} line {line}"
            key = _file_key((entry.get("image") or "").strip())
            if key not in rows:
                problems.add(where, f"image {key!r} is not among the images under {self.options.root}")
                continue
            seen.add(key)
            try:
                marker = _flag(entry.get("marker") or "")
            except ValueError as exc:
                problems.add(where, f"marker {exc}")
                continue
            mask = (entry.get("mask") or "").strip()
            box = (entry.get("box") or "").strip()
            values = (marker, mask, box)
            if key in given:
                first, before = given[key]
                same = (before[0], _file_key(before[1]), _box_numbers(before[2])) == (marker, _file_key(mask), _box_numbers(box))
                # A second row that repeats the first (a file concatenated from two lists) is
                # accepted: the image gets the same marker either way, and a row that was meant
                # for another image leaves that image without a row, which is reported below.
                # Rows that disagree are refused: which one is right is the user's to say.
                if not same:
                    problems.add(
                        f"{path.name} lines {first} and {line}",
                        f"image {key!r} is listed twice with different values ({_marker_text(before)} against {_marker_text(values)})",
                    )
                continue
            given[key] = (line, values)
            rows[key].shortcut = marker
            rows[key].mask_file = (path.parent / mask) if mask else None
            rows[key].box = box or None
        for key in sorted(set(rows) - seen):
            problems.add(rows[key].path, f"no row in {path.name} (every image needs its marker value)")

    def load(self, ctx: RunContext) -> SpuriousDataset:
        problems = Problems("knee-folder")
        rows = self.rows(problems)
        problems.raise_if_any()
        masks_wanted = self.options.markers is not None and all(
            (r.mask_file is not None or r.box is not None) for r in rows if r.shortcut
        )
        parts = _load_rows(rows, self.options.channels, self.options.size, problems, masks_wanted)
        problems.raise_if_any()
        names, descriptions = load_class_spec("knee")
        return _assemble(parts, "knee", names, descriptions, "marker" if self.options.markers else None, "knee-folder")


# -- skin ------------------------------------------------------------------------------------------


class IsicFolderOptions(PluginOptions):
    """Options of ``isic-folder``."""

    root: Path | None = Field(
        None,
        description="The CDEP layout: root/processed/{cancer,no_cancer}/ images and root/segmentation/ "
        "patch masks with the same file names (an image without a mask has no patch).",
        json_schema_extra={"fingerprint": "listing"},
    )
    csv: Path | None = Field(
        None,
        description="Instead of root: a CSV with 'image' (path relative to the CSV's folder), 'label' "
        "(benign/malignant or 0/1), optional 'split' (train/val/test), 'patch' (1/0) and 'mask' (a "
        "patch mask file of the image's size).",
        json_schema_extra={"fingerprint": "listing"},
    )
    val_share: float = Field(0.1, ge=0, lt=1, description="Share of every group for validation when the layout has no splits (seeded).")
    test_share: float = Field(0.2, gt=0, lt=1, description="Share of every group for test when the layout has no splits (seeded).")
    size: int = Field(224, ge=16, le=1024, description="Images are resized to size x size.")

    @model_validator(mode="after")
    def _one_layout(self) -> IsicFolderOptions:
        if (self.root is None) == (self.csv is None):
            raise ValueError("set exactly one of root (the CDEP layout) and csv")
        return self


class IsicFolderProvider:
    """Dermoscopy (benign / malignant) with coloured patches as the shortcut: the CDEP folder
    layout or a CSV; groups: class x patch; true masks from the patch masks."""

    Options = IsicFolderOptions
    has_groups: ClassVar[bool] = True
    has_true_masks: ClassVar[bool] = True

    def __init__(self, options: IsicFolderOptions) -> None:
        self.options = options

    def _cdep_rows(self, problems: Problems) -> list[_Row]:
        root = self.options.root
        assert root is not None
        rows = []
        seg = root / "segmentation"
        for folder, label in (("no_cancer", 0), ("cancer", 1)):
            where = root / "processed" / folder
            if not where.is_dir():
                problems.add(where, "missing (the CDEP layout has processed/cancer and processed/no_cancer)")
                continue
            for path in _images_under(where):
                mask = seg / path.name
                if not mask.exists():
                    alternatives = [seg / (path.stem + s) for s in IMAGE_SUFFIXES]
                    mask = next((m for m in alternatives if m.exists()), None)
                rows.append(_Row("", path, label, shortcut=None, mask_file=mask))
        return rows

    def _csv_rows(self, problems: Problems) -> list[_Row]:
        path = self.options.csv
        assert path is not None
        table = _read_csv(path, {"image", "label"}, "isic-folder: CSV")
        rows = []
        labels = {"benign": 0, "malignant": 1, "0": 0, "1": 1, "no_cancer": 0, "cancer": 1}
        listed: dict[str, tuple[int, dict[str, str]]] = {}  # image -> its first line and row
        for line, entry in table:
            where = f"{path.name} line {line}"
            image = (entry.get("image") or "").strip()
            if not image:
                problems.add(where, "no image")
                continue
            # Every row is one sample, so an image listed twice is refused even where the rows
            # agree: it would count twice and could land in train and test both.
            key = _file_key(image)
            if key in listed:
                first, before = listed[key]
                differ = [
                    f"{column} {(before.get(column) or '').strip()!r} against {(entry.get(column) or '').strip()!r}"
                    for column in ("label", "split", "patch", "mask")
                    if (before.get(column) or "").strip().lower() != (entry.get(column) or "").strip().lower()
                ]
                problems.add(
                    f"{path.name} lines {first} and {line}",
                    f"image {image!r} is listed twice" + (f" with different values ({', '.join(differ)})" if differ else " (one row per image)"),
                )
                continue
            listed[key] = (line, entry)
            label = labels.get((entry.get("label") or "").strip().lower())
            if label is None:
                problems.add(where, f"label {entry.get('label')!r} is not benign/malignant (or 0/1)")
                continue
            split = (entry.get("split") or "").strip().lower()
            if split not in ("", "train", "val", "test"):
                problems.add(where, f"split {split!r} is not train, val or test")
                continue
            try:
                patch = _flag(entry["patch"]) if (entry.get("patch") or "").strip() else None
            except ValueError as exc:
                problems.add(where, f"patch {exc}")
                continue
            mask = (entry.get("mask") or "").strip()
            if patch and not mask:  # an all-empty mask would pass for a true mask
                problems.add(where, "patch = 1 but no mask file: true masks need the patch's pixels")
                continue
            rows.append(_Row(split, path.parent / image, label, shortcut=patch, mask_file=(path.parent / mask) if mask else None))
        if rows and len({r.split == "" for r in rows}) > 1:
            problems.add(path, "either every row names its split or none does")
        return rows

    def load(self, ctx: RunContext) -> SpuriousDataset:
        problems = Problems("isic-folder")
        rows = self._cdep_rows(problems) if self.options.root is not None else self._csv_rows(problems)
        problems.raise_if_any()
        if not rows:
            raise DatasetError("isic-folder: no images found")
        parts = _load_rows(rows, 3, self.options.size, problems, masks_wanted=True)
        problems.raise_if_any()
        # a patch is present where the CSV says so, else where its mask has any pixel
        for part in parts.values():
            part["flags"] = [bool(m.any()) if f is None else f for f, m in zip(part["flags"], part["masks"], strict=True)]
        if "" in parts:
            parts = self._split(parts.pop(""), ctx)
        names, descriptions = load_class_spec("skin")
        return _assemble(parts, "skin", names, descriptions, "patch", "isic-folder")

    def _split(self, part: dict, ctx: RunContext) -> dict[str, dict]:
        """Seeded stratified split by group (class x patch): every group keeps its share."""
        labels = np.asarray(part["labels"])
        flags = np.asarray(part["flags"], dtype=bool)
        gen = ctx.generator("isic-folder-split")
        assign = np.empty(len(labels), dtype=object)
        for g in range(4):
            members = np.nonzero(2 * labels + flags == g)[0]
            order = members[torch.randperm(len(members), generator=gen).numpy()]
            n_test = round(self.options.test_share * len(order))
            n_val = round(self.options.val_share * len(order))
            assign[order[:n_test]] = "test"
            assign[order[n_test : n_test + n_val]] = "val"
            assign[order[n_test + n_val :]] = "train"
        out: dict[str, dict] = {}
        for i, split in enumerate(assign):
            dest = out.setdefault(split, {"images": [], "labels": [], "flags": [], "masks": []})
            for key in dest:
                dest[key].append(part[key][i])
        return out


# -- MedMNIST --------------------------------------------------------------------------------------


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    """Every array of an npz file, read at once (the file is closed again)."""
    with np.load(path, allow_pickle=False) as handle:
        return {key: handle[key] for key in handle.files}


def _shape_text(shape: tuple[int, ...]) -> str:
    return " x ".join(str(v) for v in shape) if shape else "a single value"


def _image_text(chw: tuple[int, ...]) -> str:
    """``(C, H, W)`` as a user reads it: "64 x 64, 1 channel (grey)"."""
    c, h, w = chw
    return f"{h} x {w}, " + ("1 channel (grey)" if c == 1 else f"{c} channels (RGB)")


class MedmnistOptions(PluginOptions):
    """Options of ``medmnist``."""

    npz: Path = Field(
        description="A MedMNIST file (<flag>[_64|_128|_224].npz, as medmnist downloads it) with train/val/test _images and _labels.",
        json_schema_extra={"fingerprint": "listing"},
    )
    family: str = Field("skin", description="Prompt-template family and class specification (datasets/specs/<family>.toml) of the classes after mapping.")
    class_map: Literal["none", "dermamnist-benign-malignant"] | dict[str, int] = Field(
        "dermamnist-benign-malignant",
        description='Original label -> class: "dermamnist-benign-malignant" (akiec, bcc, mel -> malignant; '
        'bkl, df, nv, vasc -> benign), a table {"0" = 1, ...} covering every label, or "none" (labels as they are).',
    )
    groups: Path | None = Field(
        None,
        description="An npz with train_groups, val_groups, test_groups (int per image) where the user has "
        "group labels; None: no groups (the baselines need them).",
        json_schema_extra={"fingerprint": "listing"},
    )
    group_names: list[str] = Field(default_factory=list, description="Names of the groups in `groups`, by index.")


class MedmnistProvider:
    """Any 2D MedMNIST data set from its local npz (nothing downloaded), with an optional class
    mapping (DermaMNIST to benign/malignant) and the user's group labels."""

    Options = MedmnistOptions
    has_groups: ClassVar[bool] = True
    has_true_masks: ClassVar[bool] = False

    def __init__(self, options: MedmnistOptions) -> None:
        self.options = options

    def _mapping(self) -> dict[int, int] | None:
        cm = self.options.class_map
        if cm == "none":
            return None
        if cm == "dermamnist-benign-malignant":
            return dict(DERMAMNIST_BENIGN_MALIGNANT)
        try:
            return {int(k): int(v) for k, v in cm.items()}  # type: ignore[union-attr]
        except ValueError:
            raise DatasetError(f"medmnist: class_map keys must be label numbers, got {list(cm)}") from None  # type: ignore[arg-type]

    def _group_names(self, splits: dict) -> tuple[str, ...]:
        if self.options.group_names:
            return tuple(self.options.group_names)
        top = max((int(g.max()) for _, _, g in splits.values() if g is not None and len(g)), default=0)
        return tuple(f"group {i}" for i in range(top + 1))

    def load(self, ctx: RunContext) -> SpuriousDataset:
        o = self.options
        problems = Problems(f"medmnist {o.npz}")
        try:
            arrays = _read_npz(o.npz)
        except FileNotFoundError:
            raise DatasetError(f"medmnist: {o.npz} does not exist") from None
        except Exception as exc:
            raise DatasetError(f"medmnist: {o.npz} cannot be read as an npz: {type(exc).__name__}: {exc}") from None
        names, descriptions = load_class_spec(o.family)
        mapping = self._mapping()
        groups_file: dict[str, np.ndarray] | None = None
        if o.groups is not None:
            try:
                groups_file = _read_npz(o.groups)
            except FileNotFoundError:
                raise DatasetError(f"medmnist: groups file {o.groups} does not exist") from None
            except Exception as exc:
                raise DatasetError(f"medmnist: groups file {o.groups} cannot be read as an npz: {type(exc).__name__}: {exc}") from None
        splits: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = {}
        for split in ("train", "val", "test"):
            keys = (f"{split}_images", f"{split}_labels")
            missing = [k for k in keys if k not in arrays]
            if missing:
                if split != "val":
                    problems.add(o.npz.name, f"no {' or '.join(missing)} array")
                continue
            images, labels = arrays[keys[0]], arrays[keys[1]]
            if images.dtype != np.uint8 or images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] != 3):
                problems.add(f"{o.npz.name}:{keys[0]}", f"expected uint8 N x H x W or N x H x W x 3, got {images.dtype} {images.shape}")
                continue
            if len(images) == 0:
                hint = " (leave out val_images and val_labels to run without validation)" if split == "val" else ""
                problems.add(f"{o.npz.name}:{keys[0]}", f"the {split} split has no images ({_shape_text(images.shape)}){hint}")
                continue
            if labels.shape not in ((len(images),), (len(images), 1)):
                problems.add(f"{o.npz.name}:{keys[1]}", f"expected {len(images)} x 1 labels ({keys[0]} is {_shape_text(images.shape)}), got {_shape_text(labels.shape)}")
                continue
            if not np.issubdtype(labels.dtype, np.integer):
                problems.add(f"{o.npz.name}:{keys[1]}", f"expected integer class labels, got {labels.dtype}")
                continue
            labels = labels.reshape(-1).astype(np.int64)
            if mapping is not None:
                unknown = sorted(set(np.unique(labels).tolist()) - set(mapping))
                for value in unknown[:SHOWN_PROBLEMS]:
                    rows = np.nonzero(labels == value)[0]
                    problems.add(f"{o.npz.name}:{keys[1]}", f"label {value} (rows {rows[:5].tolist()}...) is not in class_map")
                if unknown:
                    continue
                labels = np.vectorize(mapping.__getitem__, otypes=[np.int64])(labels) if len(labels) else labels
            bad = np.nonzero((labels < 0) | (labels >= len(names)))[0]
            for row in bad[:SHOWN_PROBLEMS]:
                problems.add(f"{o.npz.name}:{keys[1]} row {row}", f"class {labels[row]} is outside 0..{len(names) - 1} ({o.family}: {', '.join(names)})")
            if len(bad):
                continue
            groups = None
            if groups_file is not None:
                key = f"{split}_groups"
                if key not in groups_file or groups_file[key].shape != (len(images),):
                    problems.add(o.groups, f"needs {key} with {len(images)} entries")
                    continue
                groups = torch.from_numpy(groups_file[key].astype(np.int64))
                top = len(o.group_names) - 1 if o.group_names else None
                if len(groups) and (int(groups.min()) < 0 or (top is not None and int(groups.max()) > top)):
                    problems.add(o.groups, f"{key} has values outside 0..{top if top is not None else 'N'}")
                    continue
            tensor = torch.from_numpy(images[:, None] if images.ndim == 3 else images.transpose(0, 3, 1, 2).copy())
            splits[split] = (tensor.contiguous(), torch.from_numpy(labels), groups)
        # every split feeds the same model: a validation split of another size or channel count
        # would select epochs on inputs the model never trains on (or fail deep in training)
        if "train" in splits:
            want = tuple(splits["train"][0].shape[1:])
            for split, (images, _, _) in splits.items():
                if tuple(images.shape[1:]) != want:
                    problems.add(
                        f"{o.npz.name}:{split}_images",
                        f"the {split} split's images are {_image_text(tuple(images.shape[1:]))} ({_shape_text(arrays[f'{split}_images'].shape)}), "
                        f"the train split's are {_image_text(want)} ({_shape_text(arrays['train_images'].shape)}): every split needs train's size and channels",
                    )
        problems.raise_if_any()
        norm = train_normalization(splits["train"][0])

        def split_of(name: str) -> Split | None:
            if name not in splits:
                return None
            images, labels, groups = splits[name]
            return Split(images=images, labels=labels, groups=groups, normalization=norm)

        return SpuriousDataset(
            family=o.family,
            train=split_of("train"),  # type: ignore[arg-type]
            test=split_of("test"),  # type: ignore[arg-type]
            val=split_of("val"),
            class_names=names,
            class_descriptions=descriptions,
            group_names=self._group_names(splits) if groups_file is not None else (),
            input_scale=UINT8_SCALE,
        )

