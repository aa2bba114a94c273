"""A person's corrections of the judge's verdicts: ``review/overrides.json`` in a run directory.

``lvlmva review RUN_DIR`` writes the file as the reviewer toggles verdicts; the ``overrides``
stage of the next ``lvlmva compose`` reads it and applies it to the judge's verdicts, so that
masks, alignment, evaluation and report are recomputed and everything before is reused. The
file is the person's work: lvlmva never deletes it, and a compose that finds it unreadable or
naming samples or colours the run does not have stops with exit 2 and leaves it as it is.

The format (one entry per sample and colour, the latest decision)::

    {"format": "lvlmva-overrides", "version": 1,
     "overrides": [{"sample": 4127, "colour": "red", "verdict": "no",
                    "when": "2026-12-02T04:10:00+00:00", "reviewer": "ana", "comment": ""}]}

``verdict`` is ``"yes"`` (the cluster is relevant) or ``"no"`` (spurious), as the judge's.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .atomic import write_atomic
from .records import Verdicts

__all__ = [
    "OVERRIDES_FILE",
    "overrides_file",
    "Override",
    "OverridesError",
    "read_overrides",
    "write_overrides",
    "apply_overrides",
    "cluster_hash",
    "now_iso",
]

#: where overrides live, relative to the run directory
OVERRIDES_FILE = Path("review") / "overrides.json"


def overrides_file(branch: str = "") -> Path:
    """Where a person's overrides of one branch's verdicts live, relative to the run directory:
    ``review/overrides.json`` for a run with one segmenter and one critic, else
    ``review/<branch>/overrides.json`` (``review/j5.gpt4o/overrides.json``)."""
    return OVERRIDES_FILE if not branch else Path("review") / branch / "overrides.json"

_FORMAT = "lvlmva-overrides"
_VERSION = 1
_KEYS = {"sample", "colour", "verdict", "when", "reviewer", "comment", "clusters"}


class OverridesError(ValueError):
    """The overrides file cannot be used; the message names the file and the problem."""


@dataclass(frozen=True)
class Override:
    """One person's verdict for one colour of one alignment sample."""

    sample: int
    colour: str
    verdict: str  # "yes" | "no"
    when: str
    reviewer: str = ""
    comment: str = ""
    #: a hash of the sample's cluster map the person looked at (:func:`cluster_hash`): a later
    #: segmentation with other clusters under the same colour names is refused, not applied
    clusters: str = ""

    @property
    def relevant(self) -> bool:
        return self.verdict == "yes"

    def to_state(self) -> dict[str, Any]:
        return {"sample": self.sample, "colour": self.colour, "verdict": self.verdict, "when": self.when,
                "reviewer": self.reviewer, "comment": self.comment, **({"clusters": self.clusters} if self.clusters else {})}  # fmt: skip


def cluster_hash(cluster_map: Any) -> str:
    """A short hash of one sample's cluster map (an int tensor ``[H, W]``)."""
    import hashlib

    import torch

    labels = torch.as_tensor(cluster_map).to(torch.int64).contiguous()
    return hashlib.sha256(str(tuple(labels.shape)).encode() + labels.numpy().tobytes()).hexdigest()[:16]


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _entry(path: Path, i: int, item: Any) -> Override:
    where = f"{path}: overrides[{i}]"
    if not isinstance(item, dict):
        raise OverridesError(f"{where} is {type(item).__name__}, not an object")
    unknown = sorted(set(item) - _KEYS)
    if unknown:
        raise OverridesError(f"{where} has unknown keys {unknown}; known: {sorted(_KEYS)}")
    for key in ("sample", "colour", "verdict", "when"):
        if key not in item:
            raise OverridesError(f"{where} lacks {key!r}")
    sample = item["sample"]
    if not isinstance(sample, int) or isinstance(sample, bool) or sample < 0:
        raise OverridesError(f"{where}: sample must be a training-split index (an integer >= 0), got {sample!r}")
    if item["verdict"] not in ("yes", "no"):
        raise OverridesError(f"{where}: verdict must be \"yes\" or \"no\", got {item['verdict']!r}")
    for key in ("colour", "when", "reviewer", "comment", "clusters"):
        if key in item and not isinstance(item[key], str):
            raise OverridesError(f"{where}: {key} must be a string, got {type(item[key]).__name__}")
    if not item["colour"]:
        raise OverridesError(f"{where}: colour is empty")
    return Override(sample, item["colour"], item["verdict"], item["when"], item.get("reviewer", ""), item.get("comment", ""), item.get("clusters", ""))


def read_overrides(path: Path) -> list[Override]:
    """The overrides in ``path`` (none when it does not exist); :class:`OverridesError` names
    what is wrong with a file that cannot be used."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError) as exc:
        raise OverridesError(f"cannot read {path}: {exc}") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise OverridesError(f"{path} is not JSON: {exc}") from None
    if not isinstance(doc, dict) or doc.get("format") != _FORMAT:
        raise OverridesError(f"{path} is not an lvlmva overrides file (want an object with \"format\": \"{_FORMAT}\")")
    if doc.get("version") != _VERSION:
        raise OverridesError(f"{path}: version {doc.get('version')!r} is not supported (this lvlmva reads version {_VERSION})")
    items = doc.get("overrides")
    if not isinstance(items, list):
        raise OverridesError(f"{path}: \"overrides\" must be a list")
    out = [_entry(path, i, item) for i, item in enumerate(items)]
    seen: dict[tuple[int, str], int] = {}
    for i, o in enumerate(out):
        key = (o.sample, o.colour)
        if key in seen:
            raise OverridesError(f"{path}: overrides[{seen[key]}] and overrides[{i}] both decide sample {o.sample}, colour {o.colour}")
        seen[key] = i
    return out


def write_overrides(path: Path, overrides: Iterable[Override]) -> None:
    """Write the overrides atomically (a reader sees the old file or the new, never a part),
    sorted by sample and colour."""
    items = sorted(overrides, key=lambda o: (o.sample, o.colour))
    doc = {"format": _FORMAT, "version": _VERSION, "overrides": [o.to_state() for o in items]}
    write_atomic(Path(path), json.dumps(doc, indent=2) + "\n")


def apply_overrides(
    verdicts: Sequence[Verdicts], overrides: Sequence[Override], path: Path | str = OVERRIDES_FILE, clusters: dict[int, str] | None = None
) -> list[Verdicts]:
    """The judge's verdicts with a person's overrides applied, in the same order.

    A reviewed sample's verdicts say per colour who decided (``sources``) and keep the judge's
    own (``judge_relevant``). A sample the judge failed on becomes usable when a person decided
    every one of its colours; with some decided, it stays a failure that says so. An override
    of a sample or colour the run does not have, or (with ``clusters``, sample -> the
    :func:`cluster_hash` of its cluster map now) one made on other clusters, raises
    :class:`OverridesError` listing them: the selection or segmentation changed since the review."""
    by_sample: dict[int, dict[str, Override]] = {}
    for o in overrides:
        by_sample.setdefault(o.sample, {})[o.colour] = o
    known = {v.sample_id: v for v in verdicts}
    stale = []
    for sample, chosen in sorted(by_sample.items()):
        v = known.get(sample)
        if v is None:
            stale.append(f"sample {sample} ({', '.join(sorted(chosen))}): not an alignment sample of this run")
            continue
        missing = sorted(c for c in chosen if c not in v.colors)
        if missing:
            stale.append(f"sample {sample}: colour(s) {', '.join(missing)} not among its clusters ({', '.join(v.colors)})")
        elif clusters is not None and sample in clusters:
            moved = sorted(c for c, o in chosen.items() if o.clusters and o.clusters != clusters[sample])
            if moved:
                stale.append(f"sample {sample}: its clusters changed since the review, so {', '.join(moved)} names another region now")
    if stale:
        shown = "; ".join(stale[:10]) + (f"; and {len(stale) - 10} more" if len(stale) > 10 else "")
        raise OverridesError(
            f"{path} names what this run does not have (the selection or segmentation changed since the "
            f"review?): {shown}. Remove those entries (or move the file away) and compose again"
        )
    out = []
    for v in verdicts:
        chosen = by_sample.get(v.sample_id)
        if not chosen:
            out.append(v)
            continue
        sources = tuple("person" if c in chosen else "judge" for c in v.colors)
        if v.relevant is not None:
            relevant = tuple(chosen[c].relevant if c in chosen else r for c, r in zip(v.colors, v.relevant, strict=True))
            out.append(replace(v, relevant=relevant, sources=sources, judge_relevant=v.relevant))
        elif len(chosen) == len(v.colors):
            out.append(replace(v, relevant=tuple(chosen[c].relevant for c in v.colors), failure=None, retryable=False,
                               sources=sources, judge_relevant=None))  # fmt: skip
        else:
            out.append(replace(v, failure=f"{v.failure}; a person decided {len(chosen)} of its {len(v.colors)} colours"))
    return out
