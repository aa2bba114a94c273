"""The user-data providers on folders the tests make: every bad row found before any work and
named (exit 2 through DatasetError), groups and true masks from the user's files, MedMNIST npz."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from lvlmva.datasets.folders import IsicFolderProvider, KneeFolderProvider, MedmnistProvider
from lvlmva.protocols import DatasetError, RunContext


def ctx(tmp_path) -> RunContext:
    return RunContext(seed=0, device=torch.device("cpu"), run_dir=tmp_path, stage_dir=tmp_path, cache_dir=tmp_path)


def _png(path, size=(40, 30), mode="L", value=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(abs(hash(path.name)) % 2**32)
    shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], 3)
    arr = rng.integers(0, 256, shape, dtype=np.uint8) if value is None else np.full(shape, value, np.uint8)
    Image.fromarray(arr).save(path)


def make_knee(root, per_grade=2):
    rows = ["image,marker,box"]
    for split in ("train", "val", "test"):
        for grade in range(5):
            for i in range(per_grade):
                rel = f"{split}/{grade}/{split}{grade}_{i}.png"
                _png(root / rel)
                marked = (grade + i) % 2
                box = '"2,3,12,10"' if marked else ""
                rows.append(f"{rel},{marked},{box}")
    (root / "markers.csv").write_text("\n".join(rows) + "\n")
    return root / "markers.csv"


def small_compose(path, dataset: str):
    """Settings of a small compose over ``dataset`` (the lines of its [dataset] section): a
    one-epoch CNN and the standard evaluator."""
    path.write_text(f"""
[run]
device = "cpu"
[dataset]
{dataset}
[model]
plugin = "cnn"
channels = [4]
[train]
epochs = 1
[evaluators.standard]
plugin = "standard"
alignment_score_samples = 0
[report]
enabled = false
""")
    return path


def knee_settings(tmp_path, root, markers):
    """A small compose over a knee folder."""
    return small_compose(
        tmp_path / "knee.toml",
        f'plugin = "knee-folder"\nroot = "{root.as_posix()}"\nmarkers = "{markers.as_posix()}"\nsize = 16',
    )


def knee(root, markers, **kw):
    return KneeFolderProvider(KneeFolderProvider.Options(root=root, markers=markers, size=16, **kw))


def test_knee_folder_grades_markers_and_boxes(tmp_path):
    markers = make_knee(tmp_path / "kneeKL")
    data = knee(tmp_path / "kneeKL", markers).load(ctx(tmp_path))
    assert data.family == "knee" and data.input_shape == (1, 16, 16)
    assert len(data.train) == 10 and len(data.val) == 10 and len(data.test) == 10
    # KL >= 2 is osteoarthritis: grades 0, 1 -> 0; 2, 3, 4 -> 1
    assert data.train.labels.tolist().count(1) == 6
    assert data.group_names == ("no osteoarthritis/no-marker", "no osteoarthritis/marker", "osteoarthritis/no-marker", "osteoarthritis/marker")
    marked = data.train.groups % 2 == 1
    assert torch.equal(data.train.spurious_masks.flatten(1).any(1), marked)
    # the box 2..12 x 3..10 of a 40 x 30 image at 16 x 16: rows 1..6, columns 0..5
    one = data.train.spurious_masks[marked][0]
    assert one[1:6, 0:5].all() and not one[8:, :].any()
    assert data.train.images.dtype == torch.uint8 and data.train.normalization is not None
    with_threshold = knee(tmp_path / "kneeKL", markers, oa_threshold=3).load(ctx(tmp_path))
    assert with_threshold.train.labels.tolist().count(1) == 4


def test_knee_folder_with_a_missing_file_names_it(tmp_path):
    root = tmp_path / "kneeKL"
    markers = make_knee(root)
    (root / "test/4/test4_1.png").unlink()
    with pytest.raises(DatasetError) as err:
        knee(root, markers).load(ctx(tmp_path))
    text = str(err.value)
    assert "test/4/test4_1.png" in text and "1 problem" in text


def test_knee_folder_lists_the_first_twenty_problems_and_the_count(tmp_path):
    root = tmp_path / "kneeKL"
    markers = make_knee(root, per_grade=3)
    lines = markers.read_text().splitlines()
    broken = [lines[0]] + [ln.replace(",1,", ",maybe,").replace(",0,", ",perhaps,") for ln in lines[1:]]
    markers.write_text("\n".join(broken) + "\n")
    (root / "train" / "7").mkdir()
    (root / "train" / "0" / "train0_0.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError) as err:
        knee(root, markers).load(ctx(tmp_path))
    text = str(err.value)
    assert "46 problem(s)" in text and "(the first 20 shown)" in text and "... and 26 more" in text
    assert text.count("\n  - ") == 20 and "train/7: not a Kellgren-Lawrence grade folder" in text


def test_knee_folder_rows_the_csv_lacks_or_invents(tmp_path):
    root = tmp_path / "kneeKL"
    markers = make_knee(root)
    markers.write_text(markers.read_text() + "train/0/ghost.png,1,\n")
    _png(root / "train/0/extra.png")
    with pytest.raises(DatasetError) as err:
        knee(root, markers).load(ctx(tmp_path))
    assert "'train/0/ghost.png' is not among the images" in str(err.value)
    assert "extra.png: no row in markers.csv" in str(err.value)


def test_knee_folder_a_corrupt_image_is_named_after_the_listing(tmp_path):
    root = tmp_path / "kneeKL"
    markers = make_knee(root)
    (root / "val/2/val2_0.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(DatasetError, match=r"val2_0.png: cannot be read as an image"):
        knee(root, markers).load(ctx(tmp_path))


def make_cdep(root):
    for folder, count in (("no_cancer", 6), ("cancer", 4)):
        for i in range(count):
            _png(root / "processed" / folder / f"{folder}_{i}.jpg", mode="RGB", size=(32, 32))
    for i in range(3):  # patches on three benign images
        mask = np.zeros((32, 32), np.uint8)
        mask[0:8, 0:8] = 255
        Image.fromarray(mask).save(root / "segmentation" / f"no_cancer_{i}.png") if (root / "segmentation").exists() else (
            (root / "segmentation").mkdir(), Image.fromarray(mask).save(root / "segmentation" / f"no_cancer_{i}.png"))


def test_isic_cdep_layout_patches_from_masks_and_stratified_splits(tmp_path):
    make_cdep(tmp_path / "isic")
    data = IsicFolderProvider(IsicFolderProvider.Options(root=tmp_path / "isic", size=16, val_share=0.0, test_share=0.34)).load(ctx(tmp_path))
    assert data.family == "skin" and data.input_shape == (3, 16, 16)
    total = len(data.train) + len(data.test)
    assert total == 10 and data.val is None
    groups = torch.cat([data.train.groups, data.test.groups])
    assert sorted(groups.tolist()).count(1) == 3 and (groups == 2).sum() == 4
    masks = torch.cat([data.train.spurious_masks, data.test.spurious_masks])
    assert torch.equal(masks.flatten(1).any(1), groups % 2 == 1)
    # every group keeps its share in test: round(0.34 * 3) patched benign, round(0.34 * 4) malignant
    assert (data.test.groups == 1).sum() == 1 and (data.test.groups == 2).sum() == 1


def test_isic_mask_of_the_wrong_size_is_refused(tmp_path):
    make_cdep(tmp_path / "isic")
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(tmp_path / "isic" / "segmentation" / "no_cancer_1.png")
    with pytest.raises(DatasetError, match=r"no_cancer_1.jpg: mask .*mask is 10 x 10, the image is 32 x 32"):
        IsicFolderProvider(IsicFolderProvider.Options(root=tmp_path / "isic", size=16)).load(ctx(tmp_path))


def test_isic_csv_with_an_unknown_label(tmp_path):
    make_cdep(tmp_path / "isic")
    rows = ["image,label,split"]
    for i in range(6):
        rows.append(f"processed/no_cancer/no_cancer_{i}.jpg,benign,{'test' if i < 2 else 'train'}")
    rows.append("processed/cancer/cancer_0.jpg,melanoma,train")
    (tmp_path / "isic" / "list.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(DatasetError, match=r"list.csv line 8: label 'melanoma'"):
        IsicFolderProvider(IsicFolderProvider.Options(csv=tmp_path / "isic" / "list.csv", size=16)).load(ctx(tmp_path))


def make_dermamnist(path, n=(20, 6, 10), size=28):
    rng = np.random.default_rng(0)
    arrays = {}
    for split, count in zip(("train", "val", "test"), n, strict=True):
        arrays[f"{split}_images"] = rng.integers(0, 256, (count, size, size, 3), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(count) % 7).reshape(-1, 1).astype(np.uint8)
    np.savez(path, **arrays)
    return path


def test_a_small_dermamnist_npz_maps_to_benign_and_malignant(tmp_path):
    npz = make_dermamnist(tmp_path / "dermamnist.npz")
    data = MedmnistProvider(MedmnistProvider.Options(npz=npz)).load(ctx(tmp_path))
    assert data.family == "skin" and data.input_shape == (3, 28, 28)
    # akiec 0, bcc 1, mel 4 -> malignant; the rest benign
    want = [1 if v in (0, 1, 4) else 0 for v in (np.arange(20) % 7)]
    assert data.train.labels.tolist() == want and data.train.groups is None
    assert len(data.val) == 6 and len(data.test) == 10 and data.train.images.dtype == torch.uint8


def test_medmnist_groups_and_bad_files(tmp_path):
    npz = make_dermamnist(tmp_path / "dermamnist.npz")
    groups = tmp_path / "groups.npz"
    np.savez(groups, train_groups=np.arange(20) % 4, val_groups=np.arange(6) % 4, test_groups=np.arange(10) % 4)
    data = MedmnistProvider(MedmnistProvider.Options(npz=npz, groups=groups)).load(ctx(tmp_path))
    assert data.train.groups.tolist() == (np.arange(20) % 4).tolist() and data.group_names == ("group 0", "group 1", "group 2", "group 3")
    with pytest.raises(DatasetError, match="does not exist"):
        MedmnistProvider(MedmnistProvider.Options(npz=tmp_path / "absent.npz")).load(ctx(tmp_path))
    with pytest.raises(DatasetError, match="label 6 .* is not in class_map"):
        MedmnistProvider(MedmnistProvider.Options(npz=npz, class_map={str(k): 0 for k in range(6)})).load(ctx(tmp_path))
    np.savez(tmp_path / "broken.npz", train_images=np.zeros((3, 8, 8), np.float32), train_labels=np.zeros((3, 1)))
    with pytest.raises(DatasetError) as err:
        MedmnistProvider(MedmnistProvider.Options(npz=tmp_path / "broken.npz", class_map="none", family="knee")).load(ctx(tmp_path))
    assert "expected uint8" in str(err.value) and "no test_images or test_labels" in str(err.value)


def test_compose_on_a_knee_folder_with_a_missing_file_exits_2_naming_it(tmp_path, capsys):
    from lvlmva.cli import EXIT_BAD_INPUT, main

    root = tmp_path / "kneeKL"
    markers = make_knee(root)
    (root / "train/3/train3_1.png").unlink()  # listed in markers.csv, gone from the folder
    settings = knee_settings(tmp_path, root, markers)
    run_dir = tmp_path / "run"
    assert main(["compose", str(settings), "--out", str(run_dir)]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "train/3/train3_1.png" in err and "is not among the images" in err and "Traceback" not in err
    assert not (run_dir / "train").exists()  # nothing trained


def test_an_edited_image_in_the_users_folder_recomputes_the_run(tmp_path, capsys):
    """The data set is not stored in the run directory, so its folder's listing (paths, sizes,
    modification times) is part of every stage's fingerprint: an unchanged folder is reused, an
    edited image retrains."""
    import os

    from lvlmva.cli import EXIT_OK, main

    root = tmp_path / "kneeKL"
    markers = make_knee(root)
    settings = knee_settings(tmp_path, root, markers)
    run = ["compose", str(settings), "--out", str(tmp_path / "run")]
    assert main(run) == EXIT_OK
    capsys.readouterr()
    assert main(run) == EXIT_OK
    progress = capsys.readouterr()
    assert "+ train" not in progress.out + progress.err  # nothing changed: reused
    assert "train" in progress.out + progress.err
    image = root / "train/2/train2_0.png"
    _png(image, value=7)
    os.utime(image, ns=(1, 1))  # a new modification time, whatever the clock says
    assert main(run) == EXIT_OK
    progress = capsys.readouterr()
    assert "+ train" in progress.out + progress.err


def test_isic_needs_exactly_one_layout():
    with pytest.raises(ValueError, match="exactly one of root"):
        IsicFolderProvider.Options()
    with pytest.raises(ValueError, match="exactly one of root"):
        IsicFolderProvider.Options(root="a", csv="b.csv")


def test_empty_marker_values_and_patches_without_masks_are_problems(tmp_path):
    root = tmp_path / "kneeKL"
    markers = make_knee(root)
    lines = markers.read_text().splitlines()
    lines[1] = lines[1].split(",")[0] + ",,"
    markers.write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError, match=r"line 2: marker '' is not a yes/no value"):
        knee(root, markers).load(ctx(tmp_path))
    make_cdep(tmp_path / "isic")
    (tmp_path / "isic" / "list.csv").write_text(
        "image,label,patch\nprocessed/no_cancer/no_cancer_0.jpg,benign,1\nprocessed/cancer/cancer_0.jpg,malignant,0\n"
    )
    with pytest.raises(DatasetError, match="line 2: patch = 1 but no mask file"):
        IsicFolderProvider(IsicFolderProvider.Options(csv=tmp_path / "isic" / "list.csv", size=16)).load(ctx(tmp_path))


def test_a_knee_folder_without_marker_boxes_and_a_true_mask_reference_exits_2(tmp_path, capsys):
    """The provider can give true masks, but this folder's CSV has no boxes: the loaded data
    has none, so the reference is refused before anything trains (not a TypeError later)."""
    from lvlmva.cli import EXIT_BAD_INPUT, main

    root = tmp_path / "kneeKL"
    make_knee(root)
    settings = tmp_path / "knee.toml"
    settings.write_text(f"""
[run]
device = "cpu"
[dataset]
plugin = "knee-folder"
root = "{root.as_posix()}"
size = 16
[model]
plugin = "cnn"
channels = [4]
[train]
epochs = 1
[selection]
strategy = "random"
n = 4
[attributor]
plugin = "deeplift-shap"
background_size = 2
[segmenter]
plugin = "ppeps-wgm"
num_clusters = 3
[critic]
plugin = "oracle"
[judge]
plugin = "rules"
[aligner]
plugin = "rrr"
[evaluators.standard]
plugin = "standard"
alignment_score_samples = 0
""")
    assert main(["compose", str(settings), "--out", str(tmp_path / "run")]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "the critic (it reads the true masks) needs true spurious masks" in err
    assert "set masks.true_mask_reference = false" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "train").exists()


def test_knee_markers_listing_an_image_twice_with_different_values_is_refused_naming_both_lines(tmp_path):
    root = tmp_path / "kneeKL"
    markers = make_knee(root)
    lines = markers.read_text().splitlines()
    # line 2 is train/0/train0_0.png, marker 0; line 3 is train/0/train0_1.png, marker 1 with a box
    assert lines[1] == "train/0/train0_0.png,0," and lines[2] == 'train/0/train0_1.png,1,"2,3,12,10"'
    lines += [
        "train/0/train0_0.png,1,",  # line 32: the marker disagrees with line 2
        './train/0/train0_1.png,1,"0,0,5,5"',  # line 33: the box disagrees with line 3
    ]
    markers.write_text("\n".join(lines) + "\n")
    (root / "test/4/test4_1.png").unlink()  # an unrelated problem, reported with the others
    with pytest.raises(DatasetError) as err:
        knee(root, markers).load(ctx(tmp_path))
    text = str(err.value)
    assert "3 problem(s)" in text
    assert "markers.csv lines 2 and 32: image 'train/0/train0_0.png' is listed twice with different values (marker 0 against marker 1)" in text
    assert "markers.csv lines 3 and 33: image 'train/0/train0_1.png' is listed twice with different values (marker 1, box '2,3,12,10' against marker 1, box '0,0,5,5')" in text
    assert "test4_1.png" in text


def test_knee_markers_repeating_a_row_exactly_is_accepted(tmp_path):
    """A repeated row changes nothing (the image's marker is the same either way); the same
    box written with other separators is the same box."""
    root = tmp_path / "kneeKL"
    markers = make_knee(root)
    once = knee(root, markers).load(ctx(tmp_path))
    lines = markers.read_text().splitlines()
    lines += [lines[1], lines[2].replace('"2,3,12,10"', '"2; 3; 12; 10"'), lines[2].replace(",1,", ",yes,")]
    markers.write_text("\n".join(lines) + "\n")
    twice = knee(root, markers).load(ctx(tmp_path))
    assert len(twice.train) == len(once.train) == 10
    assert torch.equal(twice.train.groups, once.train.groups)
    assert torch.equal(twice.train.spurious_masks, once.train.spurious_masks)


def test_knee_markers_line_numbers_count_blank_lines(tmp_path):
    root = tmp_path / "kneeKL"
    markers = make_knee(root)
    lines = markers.read_text().splitlines()
    lines[2] = lines[2].replace(",1,", ",maybe,")
    markers.write_text("\n".join(lines[:2] + ["", ""] + lines[2:]) + "\n")  # two blank lines before it
    with pytest.raises(DatasetError, match=r"markers.csv line 5: marker 'maybe' is not a yes/no value"):
        knee(root, markers).load(ctx(tmp_path))


def test_knee_an_image_outside_the_grade_folders_is_a_problem_with_the_others(tmp_path):
    root = tmp_path / "kneeKL"
    markers = make_knee(root)
    _png(root / "train/loose.png")  # under train/, in no grade folder: no grade, no CSV row
    _png(root / "val/3/stray.png")  # in a grade folder, no CSV row
    (root / "notes.txt").write_text("not an image")  # the root may hold other files (the CSV, masks)
    with pytest.raises(DatasetError) as err:
        knee(root, markers).load(ctx(tmp_path))
    text = str(err.value)
    assert "2 problem(s)" in text
    assert "train/loose.png: an image outside the grade folders (images go in train/0 .. train/4)" in text
    assert "val/3/stray.png: no row in markers.csv" in text


def isic_csv(tmp_path, extra_rows):
    make_cdep(tmp_path / "isic")
    rows = ["image,label,split"]
    for i in range(6):
        rows.append(f"processed/no_cancer/no_cancer_{i}.jpg,benign,{'test' if i < 2 else 'train'}")
    for i in range(4):
        rows.append(f"processed/cancer/cancer_{i}.jpg,malignant,{'test' if i < 1 else 'train'}")
    (tmp_path / "isic" / "list.csv").write_text("\n".join(rows + extra_rows) + "\n")
    return IsicFolderProvider(IsicFolderProvider.Options(csv=tmp_path / "isic" / "list.csv", size=16))


def test_isic_csv_listing_an_image_twice_is_refused_naming_both_lines(tmp_path):
    assert len(isic_csv(tmp_path, []).load(ctx(tmp_path)).train) == 7
    provider = isic_csv(
        tmp_path,
        [
            "processed/cancer/cancer_1.jpg,benign,train",  # line 12: line 9 says malignant
            "./processed/no_cancer/no_cancer_3.jpg,benign,train",  # line 13: line 5 again, written otherwise
            "processed/no_cancer/no_cancer_0.jpg,benign,train",  # line 14: line 2 puts it in test
            ",benign,train",  # line 15
        ],
    )
    with pytest.raises(DatasetError) as err:
        provider.load(ctx(tmp_path))
    text = str(err.value)
    assert "4 problem(s)" in text and "list.csv line 15: no image" in text
    assert "list.csv lines 9 and 12: image 'processed/cancer/cancer_1.jpg' is listed twice with different values (label 'malignant' against 'benign')" in text
    # rows that agree are refused too: every row is a sample, it would count twice
    assert "list.csv lines 5 and 13: image './processed/no_cancer/no_cancer_3.jpg' is listed twice (one row per image)" in text
    assert "list.csv lines 2 and 14: image 'processed/no_cancer/no_cancer_0.jpg' is listed twice with different values (split 'test' against 'train')" in text


def npz_of(path, shapes, labels=None):
    """An npz with ``{split: images shape}`` of random uint8 pixels and labels ``i % 7``."""
    rng = np.random.default_rng(0)
    arrays = {}
    for split, shape in shapes.items():
        arrays[f"{split}_images"] = rng.integers(0, 256, shape, dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(shape[0]) % 7).reshape(-1, 1).astype(np.uint8)
    arrays.update(labels or {})
    np.savez(path, **arrays)
    return path


def medmnist_error(npz, tmp_path) -> str:
    with pytest.raises(DatasetError) as err:
        MedmnistProvider(MedmnistProvider.Options(npz=npz)).load(ctx(tmp_path))
    return str(err.value)


def test_medmnist_a_split_of_another_size_or_channel_count_is_refused(tmp_path):
    rgb28 = (28, 28, 3)
    text = medmnist_error(npz_of(tmp_path / "sizes.npz", {"train": (10, *rgb28), "val": (4, 64, 64, 3), "test": (5, 28, 28)}), tmp_path)
    assert "2 problem(s)" in text
    assert (
        "sizes.npz:val_images: the val split's images are 64 x 64, 3 channels (RGB) (4 x 64 x 64 x 3), "
        "the train split's are 28 x 28, 3 channels (RGB) (10 x 28 x 28 x 3): every split needs train's size and channels"
    ) in text
    assert "sizes.npz:test_images: the test split's images are 28 x 28, 1 channel (grey) (5 x 28 x 28), the train split's are 28 x 28, 3 channels (RGB)" in text
    # a grey train split beside an RGB validation split: named the same way
    text = medmnist_error(npz_of(tmp_path / "grey.npz", {"train": (10, 28, 28), "val": (4, *rgb28), "test": (5, 28, 28)}), tmp_path)
    assert "1 problem(s)" in text and "grey.npz:val_images: the val split's images are 28 x 28, 3 channels (RGB)" in text
    assert "the train split's are 28 x 28, 1 channel (grey) (10 x 28 x 28)" in text


def test_medmnist_empty_splits_are_refused(tmp_path):
    text = medmnist_error(npz_of(tmp_path / "empty.npz", {"train": (0, 28, 28, 3), "val": (0, 28, 28, 3), "test": (5, 28, 28, 3)}), tmp_path)
    assert "2 problem(s)" in text
    assert "empty.npz:train_images: the train split has no images (0 x 28 x 28 x 3)" in text
    assert "empty.npz:val_images: the val split has no images (0 x 28 x 28 x 3) (leave out val_images and val_labels to run without validation)" in text
    # without val arrays there is no validation split, and that is allowed
    data = MedmnistProvider(MedmnistProvider.Options(npz=npz_of(tmp_path / "noval.npz", {"train": (6, 8, 8), "test": (3, 8, 8)}))).load(ctx(tmp_path))
    assert data.val is None and len(data.train) == 6


def test_medmnist_labels_that_do_not_fit_the_images_are_refused(tmp_path):
    shapes = {"train": (10, 28, 28, 3), "val": (4, 28, 28, 3), "test": (5, 28, 28, 3)}
    text = medmnist_error(
        npz_of(tmp_path / "labels.npz", shapes, {
            "train_labels": np.zeros((9, 1), np.uint8),  # one label short
            "val_labels": np.zeros((4, 2), np.uint8),  # two labels per image
            "test_labels": np.array([0, 1, 0, 1, 0.5]),  # not class numbers
        }),
        tmp_path,
    )
    assert "3 problem(s)" in text
    assert "labels.npz:train_labels: expected 10 x 1 labels (train_images is 10 x 28 x 28 x 3), got 9 x 1" in text
    assert "labels.npz:val_labels: expected 4 x 1 labels (val_images is 4 x 28 x 28 x 3), got 4 x 2" in text
    assert "labels.npz:test_labels: expected integer class labels, got float64" in text
    # labels as a flat array of N are read as they are
    data = MedmnistProvider(MedmnistProvider.Options(npz=npz_of(tmp_path / "flat.npz", shapes, {"val_labels": np.arange(4) % 7}))).load(ctx(tmp_path))
    assert data.val.labels.tolist() == [1, 1, 0, 0]


def test_compose_on_a_medmnist_file_with_a_validation_split_of_another_size_exits_2(tmp_path, capsys):
    from lvlmva.cli import EXIT_BAD_INPUT, main

    npz = npz_of(tmp_path / "dermamnist.npz", {"train": (10, 28, 28, 3), "val": (4, 64, 64, 3), "test": (5, 28, 28, 3)})
    settings = small_compose(tmp_path / "derma.toml", f'plugin = "medmnist"\nnpz = "{npz.as_posix()}"')
    assert main(["compose", str(settings), "--out", str(tmp_path / "run")]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "dermamnist.npz:val_images: the val split's images are 64 x 64" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "train").exists()


def test_validate_and_until_data_load_and_check_the_users_folder(tmp_path, capsys):
    from lvlmva.cli import EXIT_BAD_INPUT, EXIT_OK, main

    root = tmp_path / "kneeKL"
    markers = make_knee(root)
    settings = knee_settings(tmp_path, root, markers)
    assert main(["validate", str(settings)]) == EXIT_OK
    assert "data: train 10, val 10, test 10 images of 1 x 16 x 16, 2 classes; checked" in capsys.readouterr().out
    # a stray image the CSV does not list, and a CSV row for an image that is gone
    _png(root / "train/1/stray.png")
    (root / "test/4/test4_1.png").unlink()
    assert main(["validate", str(settings)]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "train/1/stray.png" in err and "test/4/test4_1.png" in err and "Traceback" not in err
    run_dir = tmp_path / "run"
    assert main(["compose", str(settings), "--out", str(run_dir), "--until", "data"]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "train/1/stray.png" in err and "test/4/test4_1.png" in err
    assert not (run_dir / "train").exists()
    # --no-data: the settings alone
    assert main(["validate", str(settings), "--no-data"]) == EXIT_OK
    assert capsys.readouterr().out.startswith(f"{settings}: ok\n")
    # a folder that loads: --until data loads it and stops
    (root / "train/1/stray.png").unlink()
    _png(root / "test/4/test4_1.png")
    assert main(["compose", str(settings), "--out", str(run_dir), "--until", "data"]) == EXIT_OK
    captured = capsys.readouterr()
    assert "+ data" in captured.err and "stopped after data" in captured.out
    assert not (run_dir / "train").exists()
