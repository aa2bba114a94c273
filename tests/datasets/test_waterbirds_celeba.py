"""The ``waterbirds`` and ``celeba`` providers on tiny folders the tests make in the released
layouts (a few JPEGs, nothing downloaded): splits, labels and groups as the tables say, seeded
subsamples stratified by group, every bad row named before any work (exit 2 through
DatasetError), no true masks (the oracle critic refused with the reason), and a whole run with
the OpenAI-compatible test server as critic and judge."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

from lvlmva.datasets.class_specs import load_class_spec
from lvlmva.datasets.subpopulation import CelebaProvider, WaterbirdsProvider, stratified_subsample
from lvlmva.plugins.lvlm.prompts import (
    PLACEHOLDERS,
    load_template,
    render_critic_prompt,
    render_judge_prompt,
)
from lvlmva.plugins.lvlm.verdict_schema import parse_judge_answer
from lvlmva.protocols import DatasetError
from lvlmva.records import Critique, CritiqueRequest, RenderedSample

#: Waterbirds' class folders as released (CUB's numbering)
LAND, WATER = "118.House_Sparrow", "045.Northern_Fulmar"


def _jpeg(path, rgb, size=(40, 30), seed=0):
    """A photograph of one colour with a little seeded texture (no two images alike)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    noise = np.random.default_rng(seed).integers(-20, 21, (size[1], size[0], 3))
    Image.fromarray(np.clip(np.array(rgb) + noise, 0, 255).astype(np.uint8)).save(path, quality=95)


def make_waterbirds(root, per_group=(3, 2, 2)):
    """A Waterbirds folder: per split (train, val, test) ``per_group[s]`` images of each of the
    four groups; the colour codes y (blue) and place (red). Returns the metadata rows."""
    rows = []
    for split, count in enumerate(per_group):
        for y in (0, 1):
            for place in (0, 1):
                for k in range(count):
                    folder = WATER if y else LAND
                    name = f"{folder}/{folder.split('.')[1]}_{split}{place}{k}.jpg"
                    _jpeg(root / name, (40 + 180 * place, 100, 40 + 180 * y), seed=len(rows))
                    rows.append({"img_id": str(len(rows) + 1), "img_filename": name, "y": str(y), "split": str(split), "place": str(place)})
    write_metadata(root, rows)
    return rows


def write_metadata(root, rows, columns=("img_id", "img_filename", "y", "split", "place", "place_filename")):
    lines = [",".join(columns)]
    for row in rows:
        lines.append(",".join(row.get(c, "/l/lake/natural_lake/00000001.jpg") for c in columns))
    (root / "metadata.csv").write_text("\n".join(lines) + "\n")


def waterbirds(root, **kw):
    return WaterbirdsProvider(WaterbirdsProvider.Options(root=root, size=kw.pop("size", 16), **kw))


#: a few of CelebA's 40 attribute names, in the released order
ATTRIBUTES = ["5_o_Clock_Shadow", "Arched_Eyebrows", "Blond_Hair", "Male", "Smiling", "Young"]


def make_celeba(root, per_group=(3, 2, 2)):
    """A CelebA folder: 178 x 218 is too big for a test, so 20 x 30 photographs whose top and
    bottom 5 rows are grey (the centre crop removes them); the centre codes blond (blue) and
    male (red). Returns ``{file: (split, blond, male)}``."""
    folder = root / "img_align_celeba"
    folder.mkdir(parents=True)
    table = {}
    for split, count in enumerate(per_group):
        for blond in (0, 1):
            for male in (0, 1):
                for _ in range(count):
                    name = f"{len(table) + 1:06d}.jpg"
                    arr = np.full((30, 20, 3), 128, np.uint8)
                    arr[5:25] = (40 + 180 * male, 100, 40 + 180 * blond)
                    Image.fromarray(arr).save(folder / name, quality=95)
                    table[name] = (split, blond, male)
    write_celeba_lists(root, table)
    return table


def write_celeba_lists(root, table, attributes=ATTRIBUTES):
    lines = [str(len(table)), " ".join(attributes) + " "]
    for name, (_, blond, male) in table.items():
        values = {"Blond_Hair": blond, "Male": male, "Smiling": 1 - male}
        lines.append(name + " " + " ".join(f"{1 if values.get(a, 0) else -1:2d}" for a in attributes))
    (root / "list_attr_celeba.txt").write_text("\n".join(lines) + "\n")
    (root / "list_eval_partition.txt").write_text("".join(f"{name} {split}\n" for name, (split, _, _) in table.items()))


def celeba(root, **kw):
    return CelebaProvider(CelebaProvider.Options(root=root, size=kw.pop("size", 16), **kw))


# -- waterbirds ------------------------------------------------------------------------------------


def test_waterbirds_splits_labels_groups_and_no_masks(tmp_path, ctx):
    make_waterbirds(tmp_path / "wb")
    data = waterbirds(tmp_path / "wb").load(ctx)
    assert data.family == "waterbirds" and data.input_shape == (3, 16, 16)
    assert (len(data.train), len(data.val), len(data.test)) == (12, 8, 8)
    assert data.class_names == ("landbird", "waterbird") == load_class_spec("waterbirds")[0]
    assert data.group_names == ("landbird/land", "landbird/water", "waterbird/land", "waterbird/water")
    for split in (data.train, data.val, data.test):
        assert split.images.dtype == torch.uint8 and split.spurious_masks is None
        # the colours the folder was made with: blue codes the bird, red the background
        blue = split.images[:, 2].float().mean(dim=(1, 2)) > 128
        red = split.images[:, 0].float().mean(dim=(1, 2)) > 128
        assert split.labels.tolist() == blue.long().tolist()
        assert split.groups.tolist() == (2 * blue.long() + red.long()).tolist()
    assert torch.bincount(data.train.groups, minlength=4).tolist() == [3, 3, 3, 3]
    assert data.train.normalization is not None


def test_waterbirds_subsamples_are_seeded_and_keep_every_groups_share(tmp_path, ctx):
    make_waterbirds(tmp_path / "wb", per_group=(5, 2, 3))
    data = waterbirds(tmp_path / "wb", train_size=8, test_size=4).load(ctx)
    assert (len(data.train), len(data.val), len(data.test)) == (8, 8, 4)
    assert torch.bincount(data.train.groups, minlength=4).tolist() == [2, 2, 2, 2]
    assert torch.bincount(data.test.groups, minlength=4).tolist() == [1, 1, 1, 1]
    again = waterbirds(tmp_path / "wb", train_size=8, test_size=4).load(ctx)
    assert torch.equal(again.train.images, data.train.images)
    with pytest.raises(DatasetError, match="val_size = 9, but the val split has 8 images"):
        waterbirds(tmp_path / "wb", val_size=9).load(ctx)


def test_stratified_subsample_against_a_plain_count(rng):
    """Every group gets its share rounded by largest remainder; the sum is the size asked."""
    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        groups = rng.integers(0, 4, rng.integers(1, 60))
        size = int(rng.integers(1, len(groups) + 1))
        index = stratified_subsample(groups, size, generator)
        assert len(index) == size == len(set(index.tolist())) and np.all(np.diff(index) > 0)
        names, counts = np.unique(groups, return_counts=True)
        got = np.array([np.sum(groups[index] == g) for g in names])
        exact = size * counts / len(groups)
        assert np.all(np.abs(got - exact) < 1)


def test_waterbirds_bad_rows_are_named_with_their_line(tmp_path, ctx):
    root = tmp_path / "wb"
    rows = make_waterbirds(root)
    (root / rows[0]["img_filename"]).unlink()  # line 2
    (root / rows[1]["img_filename"]).write_bytes(b"not a jpeg")  # line 3, read when decoded
    rows[2]["split"] = "3"  # line 4
    rows[3]["y"] = "2"  # line 5
    rows[4]["place"] = "water"  # line 6
    rows.append(dict(rows[5]))  # line 30: line 7 again
    write_metadata(root, rows)
    with pytest.raises(DatasetError) as err:
        waterbirds(root).load(ctx)
    text = str(err.value)
    assert text.startswith("waterbirds: 5 problem(s) with the data set")
    assert f"metadata.csv line 2 ({rows[0]['img_filename']}): image {root / rows[0]['img_filename']} does not exist" in text
    assert "line 4" in text and "split '3' is not 0, 1 or 2 (train, val, test)" in text
    assert "line 5" in text and "y '2' is not 0 (landbird) or 1 (waterbird)" in text
    assert "line 6" in text and "place 'water' is not 0 (land) or 1 (water)" in text
    assert "line 30" in text and "listed again (first on line 7)" in text
    # the table's problems come first; once they are fixed, the undecodable file is named
    rows[2]["split"], rows[3]["y"], rows[4]["place"] = "0", "0", "0"
    _jpeg(root / rows[0]["img_filename"], (0, 0, 0))
    write_metadata(root, rows[:-1])
    with pytest.raises(DatasetError, match=r"line 3 \(.*\): image .* cannot be read as an image"):
        waterbirds(root).load(ctx)


def test_waterbirds_missing_columns_files_and_the_count_of_more_problems(tmp_path, ctx):
    root = tmp_path / "wb"
    rows = make_waterbirds(root)
    with pytest.raises(DatasetError, match="is not a folder"):
        waterbirds(tmp_path / "nowhere").load(ctx)
    write_metadata(root, rows, columns=("img_id", "img_filename", "y", "split"))
    with pytest.raises(DatasetError, match="needs the columns 'img_filename', 'place', 'split', 'y'"):
        waterbirds(root).load(ctx)
    (root / "metadata.csv").unlink()
    with pytest.raises(DatasetError, match="metadata.csv does not exist"):
        waterbirds(root).load(ctx)
    for row in rows[:25]:
        row["y"] = "yes"
    write_metadata(root, rows)
    with pytest.raises(DatasetError) as err:
        waterbirds(root).load(ctx)
    assert "25 problem(s) with the data set (the first 20 shown)" in str(err.value)
    assert str(err.value).endswith("... and 5 more")


# -- celeba ----------------------------------------------------------------------------------------


def test_celeba_blond_hair_against_male(tmp_path, ctx):
    table = make_celeba(tmp_path / "celeba")
    data = celeba(tmp_path / "celeba").load(ctx)
    assert data.family == "celeba" and data.input_shape == (3, 16, 16)
    assert (len(data.train), len(data.val), len(data.test)) == (12, 8, 8)
    assert data.class_names == ("not blond hair", "blond hair") and data.class_descriptions == load_class_spec("celeba")[1]
    assert data.group_names == ("not blond hair/not male", "not blond hair/male", "blond hair/not male", "blond hair/male")
    expected = {s: [(b, m) for split, b, m in table.values() if split == i] for i, s in enumerate(("train", "val", "test"))}
    for name in ("train", "val", "test"):
        split = getattr(data, name)
        assert split.spurious_masks is None
        assert split.labels.tolist() == [b for b, _ in expected[name]]
        assert split.groups.tolist() == [2 * b + m for b, m in expected[name]]
    # the centre crop leaves out the grey bands above and below the face
    # (green: 100 in the band, 128 above and below it; JPEG blurs the edges a little)
    assert data.train.images[:, 1, 0].float().mean() < 110
    squeezed = celeba(tmp_path / "celeba", center_crop=False).load(ctx)
    assert squeezed.train.images[:, 1, 0].float().mean() > 120


def test_celeba_other_attributes_and_descriptions(tmp_path, ctx):
    make_celeba(tmp_path / "celeba")
    data = celeba(tmp_path / "celeba", target="Smiling", spurious="Blond_Hair", class_descriptions=["No smile.", "A smile."]).load(ctx)
    assert data.class_names == ("not smiling", "smiling") and data.class_descriptions == ("No smile.", "A smile.")
    assert data.group_names[1] == "not smiling/blond hair"
    red = data.train.images[:, 0, 8, 8] > 128  # male: not smiling in this folder
    assert data.train.labels.tolist() == (~red).long().tolist()
    with pytest.raises(DatasetError, match=r"the target attribute 'Blond' is not in list_attr_celeba.txt; its attributes: 5_o_Clock_Shadow, .*Young"):
        celeba(tmp_path / "celeba", target="Blond").load(ctx)
    with pytest.raises(DatasetError, match="the spurious attribute 'male' is not in"):
        celeba(tmp_path / "celeba", spurious="male").load(ctx)
    with pytest.raises(ValueError, match="target and spurious are both 'Male'"):
        CelebaProvider.Options(root=tmp_path, target="Male", spurious="Male")


def test_celeba_bad_rows_in_either_list_are_named(tmp_path, ctx):
    root = tmp_path / "celeba"
    table = make_celeba(root)
    names = list(table)
    lines = (root / "list_attr_celeba.txt").read_text().splitlines()
    fields = lines[2].split()
    fields[1 + ATTRIBUTES.index("Blond_Hair")] = "0"  # 0/1 where the release writes -1/1
    lines[2] = " ".join(fields)
    lines[3] = " ".join(lines[3].split()[:-1])  # one value short
    lines.append(lines[4])  # 000003.jpg again
    (root / "list_attr_celeba.txt").write_text("\n".join(lines) + "\n")
    partition = (root / "list_eval_partition.txt").read_text().splitlines()
    partition[3] = f"{names[3]} 5"
    partition[4] = f"{names[4]}"
    partition[5] = "999999.jpg 0"  # replaces names[5]: in the attributes, not in the partition
    (root / "list_eval_partition.txt").write_text("\n".join(partition) + "\n")
    (root / "img_align_celeba" / names[6]).unlink()
    with pytest.raises(DatasetError) as err:
        celeba(root).load(ctx)
    text = str(err.value)
    assert "list_attr_celeba.txt line 3 (000001.jpg): Blond_Hair (target) is '0', not -1 or 1" in text
    assert "list_attr_celeba.txt line 4 (000002.jpg): 5 values, line 2 names 6 attributes" in text
    assert f"list_attr_celeba.txt line {len(lines)} (000003.jpg): image listed again (first at list_attr_celeba.txt line 5 (000003.jpg))" in text
    assert f"list_attr_celeba.txt line 1: says {len(table)} images, the file lists {len(table) + 1}" in text
    assert "list_eval_partition.txt line 4 (000004.jpg): split '5' is not 0, 1 or 2" in text
    assert "list_eval_partition.txt line 5 (000005.jpg): expected 'file split', got 1 fields" in text
    assert "(000006.jpg): not in list_eval_partition.txt" in text
    assert "list_eval_partition.txt line 6 (999999.jpg): not in list_attr_celeba.txt" in text
    assert f"(000007.jpg): image {root / 'img_align_celeba' / '000007.jpg'} does not exist" in text


def test_celeba_missing_files_and_corrupt_images(tmp_path, ctx):
    root = tmp_path / "celeba"
    make_celeba(root)
    (root / "img_align_celeba" / "000002.jpg").write_bytes(b"\xff\xd8 cut off")
    with pytest.raises(DatasetError, match=r"line 4 \(000002.jpg\): image .*000002.jpg cannot be read as an image"):
        celeba(root).load(ctx)
    (root / "list_eval_partition.txt").unlink()
    with pytest.raises(DatasetError, match="partition file .*list_eval_partition.txt does not exist"):
        celeba(root).load(ctx)
    (root / "list_attr_celeba.txt").write_text("many\nBlond_Hair Male\n")
    with pytest.raises(DatasetError, match="line 1: 'many' is not the number of images"):
        celeba(root).load(ctx)
    (root / "img_align_celeba").rename(root / "images")
    with pytest.raises(DatasetError, match="img_align_celeba is not a folder"):
        celeba(root).load(ctx)


def test_celeba_subsample_per_split(tmp_path, ctx):
    make_celeba(tmp_path / "celeba", per_group=(4, 1, 2))
    data = celeba(tmp_path / "celeba", train_size=4, test_size=8).load(ctx)
    assert (len(data.train), len(data.val), len(data.test)) == (4, 4, 8)
    assert sorted(data.train.groups.tolist()) == [0, 1, 2, 3]


# -- prompts ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["waterbirds", "celeba"])
def test_the_critic_and_judge_templates_of_both_families(family):
    names, descriptions = load_class_spec(family)
    request = CritiqueRequest(5, names[1], descriptions[1], family, RenderedSample(5, b"o", b"c", b"v", ("red", "blue", "green")), torch.zeros(2, 2, dtype=torch.long))
    for effect in ("positive", "negative", "absolute"):
        text = render_critic_prompt(load_template(family, "critic"), dataclasses.replace(request, effect=effect))
        assert not any(p in text for p in PLACEHOLDERS)
        assert names[1] in text and descriptions[1] in text and "red, blue, green" in text
        assert '"Verdict: yes"' in text and '"Verdict: no"' in text
    judge = load_template(family, "judge")
    instructions, user = render_judge_prompt(judge, Critique(5, ("red", "blue"), "Red: sky. Verdict: no", family=family))
    assert "red, blue" in instructions and "Red: sky. Verdict: no" in user
    examples = [line for line in judge.text.splitlines() if line.startswith('{"output"')]
    assert examples
    for line in examples:
        colors = [item["color"] for item in json.loads(line)["output"]]
        assert len(parse_judge_answer(line, colors).relevant) == len(colors)


# -- through the command line ------------------------------------------------------------------------


def settings_file(path, root, critic: str, url: str = "", plugin: str = "waterbirds"):
    """A tiny compose over a Waterbirds (or CelebA) folder: an MLP, one epoch, 4 alignment
    samples, RRR for two steps; ``critic`` is "openai" (the test server at ``url``) or "oracle"."""
    lvlm = f'model = "test-{{role}}"\nbase_url = "{url}"\napi_key_env = ""\nmax_attempts = 2\nbackoff_initial_s = 0.0\ntimeout_s = 5.0'
    critic_section = (
        f'[critic]\nplugin = "openai"\n{lvlm.format(role="critic")}\n[judge]\nplugin = "openai"\n{lvlm.format(role="judge")}'
        if critic == "openai"
        else '[critic]\nplugin = "oracle"\n[judge]\nplugin = "rules"'
    )
    path.write_text(f"""
[run]
seed = 0
device = "cpu"
cache_dir = "{(path.parent / "cache").as_posix()}"
[dataset]
plugin = "{plugin}"
root = "{root.as_posix()}"
size = 16
[model]
plugin = "mlp"
hidden = [8]
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
{critic_section}
[aligner]
plugin = "rrr"
epochs = 1
max_steps_per_epoch = 2
[evaluators.standard]
plugin = "standard"
alignment_score_samples = 0
[report]
enabled = false
""")
    return path


@pytest.mark.parametrize("plugin", ["waterbirds", "celeba"])
def test_validate_on_a_folder_with_a_missing_image_exits_2_naming_it(tmp_path, capsys, plugin):
    from lvlmva.cli import EXIT_BAD_INPUT, EXIT_OK, main

    root = tmp_path / plugin
    if plugin == "waterbirds":
        name = make_waterbirds(root)[7]["img_filename"]
        missing, where = root / name, f"metadata.csv line 9 ({name})"  # the header is line 1
    else:
        name = list(make_celeba(root))[7]
        missing, where = root / "img_align_celeba" / name, f"list_attr_celeba.txt line 10 ({name})"  # count, names
    settings = settings_file(tmp_path / "s.toml", root, "openai", "http://127.0.0.1:9/v1", plugin=plugin)
    assert main(["validate", str(settings)]) == EXIT_OK
    assert "data: train 12, val 8, test 8 images of 3 x 16 x 16, 2 classes; checked" in capsys.readouterr().out
    missing.unlink()
    assert main(["validate", str(settings)]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert f"[data] {plugin}: 1 problem(s) with the data set\n  - {where}: image {missing} does not exist" in err
    assert "Traceback" not in err


def test_the_oracle_critic_is_refused_on_waterbirds_naming_the_data_set(tmp_path, capsys):
    from lvlmva.cli import EXIT_BAD_INPUT, main

    make_waterbirds(tmp_path / "wb")
    settings = settings_file(tmp_path / "oracle.toml", tmp_path / "wb", "oracle")
    assert main(["compose", str(settings), "--out", str(tmp_path / "run")]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "[critic] needs true spurious masks, which the data set plugin 'waterbirds' does not provide" in err
    assert 'use an LVLM critic (plugin = "openai" or "transformers")' in err and "Traceback" not in err
    assert not (tmp_path / "run" / "train").exists()


def test_a_waterbirds_folder_runs_end_to_end_with_the_test_server_as_critic(tmp_path, capsys, torch_global_state):
    from lvlmva.cli import EXIT_OK, main
    from lvlmva.testing.openai_server import ScriptedOpenAIServer

    make_waterbirds(tmp_path / "wb")
    run_dir = tmp_path / "run"
    with ScriptedOpenAIServer() as server:
        settings = settings_file(tmp_path / "wb.toml", tmp_path / "wb", "openai", server.base_url)
        assert main(["compose", str(settings), "--out", str(run_dir)]) == EXIT_OK, capsys.readouterr().err
        # 4 critic requests (images), one judge request per distinct critique
        critic_requests = [r for r in server.requests if "image_url" in json.dumps(r.body)]
        assert len(critic_requests) == 4
        prompt = json.dumps(critic_requests[0].body)
        assert "photograph of a bird" in prompt and "background" in prompt
    results = json.loads((run_dir / "results.json").read_text())
    assert results["alignment"]["failed"] == 0
    assert results["models"]["aligned"]["label"] == "aligned (openai critic test-critic)"
    assert "true_mask" not in results["models"]  # no true masks: the reference is skipped
    err = capsys.readouterr().err
    assert "the data set has no true spurious masks" in err
