"""Small frozen records that pass between roles.

Every record holds tensors (CPU unless noted) and plain Python values, and converts to and from
a ``state`` dict of tensors and primitives so that a stage can save it with ``torch.save`` and
load it back with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch

__all__ = [
    "Normalization",
    "Inputs",
    "Split",
    "SplitWithheld",
    "SpuriousDataset",
    "AlignmentSet",
    "EFFECTS",
    "Segmentation",
    "RenderedSample",
    "CritiqueRequest",
    "Critique",
    "Verdicts",
    "Usage",
    "TrainedModel",
]


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


@dataclass(frozen=True)
class Normalization:
    """How stored pixels become model inputs, per channel: ``x = (stored * scale - mean[c]) /
    std[c]``. For uint8 storage ``scale`` is usually ``1/255`` and ``mean``/``std`` the data set's
    (or ImageNet's) channel statistics. Recorded in results.json."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    scale: float = 1.0

    def __post_init__(self) -> None:
        _check(len(self.mean) == len(self.std) and len(self.mean) > 0, "Normalization needs one mean and std per channel")
        _check(all(s > 0 for s in self.std), f"Normalization.std must be positive, got {self.std}")
        _check(self.scale > 0, f"Normalization.scale must be positive, got {self.scale}")

    def apply(self, stored: torch.Tensor) -> torch.Tensor:
        """Float32 inputs ``[B, C, H, W]`` from stored pixels ``[B, C, H, W]`` (any device)."""
        _check(
            stored.dim() == 4 and stored.shape[1] == len(self.mean),
            f"Normalization for {len(self.mean)} channels applied to {tuple(stored.shape)}",
        )
        x = stored.to(torch.float32)
        shape = (1, len(self.mean), 1, 1)
        mean = torch.tensor(self.mean, dtype=torch.float32, device=x.device).view(shape)
        std = torch.tensor(self.std, dtype=torch.float32, device=x.device).view(shape)
        if self.scale != 1.0:
            x = x * self.scale
        return (x - mean) / std

    def to_dict(self) -> dict[str, Any]:
        return {"mean": list(self.mean), "std": list(self.std), "scale": self.scale}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Normalization:
        return cls(mean=tuple(float(v) for v in data["mean"]), std=tuple(float(v) for v in data["std"]), scale=float(data["scale"]))


class Inputs:
    """Model inputs of a split with compact storage, normalised batch by batch.

    Behaves like the float32 tensor ``[N, C, H, W]`` it stands for where the toolkit reads
    inputs (``shape``, ``len``, ``dim()``, indexing, ``index_select``, ``to(device)``), but only
    the rows asked for are ever converted: indexing returns a float32 tensor of those rows.
    ``to(device)`` moves the *stored* pixels (uint8 stays uint8) and returns another view, so a
    resident training loop holds a quarter of the float32 size on the device.
    """

    dtype = torch.float32

    def __init__(self, stored: torch.Tensor, normalization: Normalization) -> None:
        self.stored = stored
        self.normalization = normalization

    @property
    def shape(self) -> torch.Size:
        return self.stored.shape

    @property
    def device(self) -> torch.device:
        return self.stored.device

    @property
    def nbytes(self) -> int:
        """Bytes held (the stored pixels), not the float32 size."""
        return int(self.stored.nbytes)

    def dim(self) -> int:
        return self.stored.dim()

    def __len__(self) -> int:
        return int(self.stored.shape[0])

    def __getitem__(self, index: Any) -> torch.Tensor:
        rows = self.stored[index]
        if rows.dim() == 3:  # one integer index
            return self.normalization.apply(rows.unsqueeze(0))[0]
        return self.normalization.apply(rows)

    def index_select(self, dim: int, index: torch.Tensor) -> torch.Tensor:
        _check(dim == 0, "Inputs.index_select selects samples (dim 0) only")
        return self.normalization.apply(self.stored.index_select(0, index))

    def to(self, device: torch.device | str, *args: Any, **kwargs: Any) -> Inputs:
        return Inputs(self.stored.to(device), self.normalization)

    def materialize(self) -> torch.Tensor:
        """All inputs as one float32 tensor (4x the uint8 size: for small splits only)."""
        return self.normalization.apply(self.stored)


@dataclass(frozen=True)
class Split:
    """One split of a data set, resident in memory.

    - ``images``: the stored pixels ``[N, C, H, W]``: float32 on the model's input scale, or
      uint8 (a quarter of the memory; 10,000 RGB images of 224 x 224 take 1.5 GB) with a
      ``normalization`` that turns them into inputs batch by batch. A tensor made from a
      read-only ``numpy.memmap`` works too.
    - ``labels``: int64 ``[N]`` class indices.
    - ``groups``: int64 ``[N]`` group indices (see ``SpuriousDataset.group_names``) or ``None``.
    - ``spurious_masks``: bool ``[N, H, W]``, True on pixels of a known spurious feature, or
      ``None`` where the truth is unknown.
    - ``normalization``: applied to ``images`` to give model inputs; ``None`` means the stored
      float32 values are the inputs. Required for uint8 storage.

    Code that feeds a model reads :attr:`inputs`, never ``images``: for float32 storage without
    normalization it is ``images`` itself (no copy); otherwise an :class:`Inputs` view.
    """

    images: torch.Tensor
    labels: torch.Tensor
    groups: torch.Tensor | None = None
    spurious_masks: torch.Tensor | None = None
    normalization: Normalization | None = None

    def __post_init__(self) -> None:
        n = self.images.shape[0]
        _check(self.images.dim() == 4, f"Split.images must be [N,C,H,W], got {tuple(self.images.shape)}")
        _check(
            self.images.dtype in (torch.float32, torch.uint8),
            f"Split.images must be float32 or uint8, got {self.images.dtype}",
        )
        _check(
            self.images.dtype == torch.float32 or self.normalization is not None,
            "Split.images of dtype uint8 need a normalization (how pixels become inputs)",
        )
        if self.normalization is not None:
            _check(
                len(self.normalization.mean) == self.images.shape[1],
                f"Split.normalization has {len(self.normalization.mean)} channels, images have "
                f"{self.images.shape[1]}",
            )
        _check(tuple(self.labels.shape) == (n,), f"Split.labels must be [{n}], got {tuple(self.labels.shape)}")
        _check(self.labels.dtype == torch.int64, f"Split.labels must be int64, got {self.labels.dtype}")
        if self.groups is not None:
            _check(tuple(self.groups.shape) == (n,), f"Split.groups must be [{n}], got {tuple(self.groups.shape)}")
        if self.spurious_masks is not None:
            want = (n, *self.images.shape[2:])
            _check(
                tuple(self.spurious_masks.shape) == want and self.spurious_masks.dtype == torch.bool,
                f"Split.spurious_masks must be bool {list(want)}, got "
                f"{self.spurious_masks.dtype} {list(self.spurious_masks.shape)}",
            )

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def inputs(self) -> torch.Tensor | Inputs:
        """The model inputs ``[N, C, H, W]``: indexing gives float32 tensors."""
        if self.normalization is None:
            return self.images
        return Inputs(self.images, self.normalization)

    def display(self, index: Any) -> torch.Tensor:
        """The pixels to show a person or an LVLM: the stored uint8 pixels where the storage is
        uint8 (true colours; per-channel normalisation would shift the hues), else the inputs."""
        if self.images.dtype == torch.uint8:
            return self.images[index]
        return self.inputs[index]

    def subset(self, index: torch.Tensor) -> Split:
        """The samples at ``index`` (int64 indices or a bool mask)."""
        return Split(
            images=self.images[index],
            labels=self.labels[index],
            groups=None if self.groups is None else self.groups[index],
            spurious_masks=None if self.spurious_masks is None else self.spurious_masks[index],
            normalization=self.normalization,
        )

    def to_state(self) -> dict[str, Any]:
        state = {f.name: getattr(self, f.name) for f in fields(self)}
        state["normalization"] = None if self.normalization is None else self.normalization.to_dict()
        return state

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> Split:
        state = dict(state)
        norm = state.pop("normalization", None)
        return cls(**state, normalization=None if norm is None else Normalization.from_dict(norm))


class SplitWithheld(RuntimeError):
    """A role read a split it is not given: training roles (aligners, mitigators) get the
    training and validation splits, an evaluator the splits it declares. The test split never
    reaches a training role."""


class _Withheld:
    """What stands for a split a role may not read: any use of it raises :class:`SplitWithheld`
    naming the split and the role."""

    def __init__(self, split: str, reader: str) -> None:
        self._message = f"the {split} split is not given to {reader}"

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)  # copy, pickle and introspection look for these
        raise SplitWithheld(self._message)

    def __len__(self) -> int:
        raise SplitWithheld(self._message)

    def __bool__(self) -> bool:
        raise SplitWithheld(self._message)

    def __getitem__(self, item: Any) -> Any:
        raise SplitWithheld(self._message)

    def __iter__(self) -> Any:
        raise SplitWithheld(self._message)

    def __repr__(self) -> str:
        return f"<{self._message}>"


@dataclass(frozen=True)
class SpuriousDataset:
    """What a DatasetProvider returns: splits plus the expert's knowledge about the classes.

    - ``family``: the prompt-template family (``"decoy-mnist"``, ``"knee"``, ``"skin"``, ...).
    - ``class_names[k]`` and ``class_descriptions[k]`` describe class ``k`` in words.
    - ``group_names[g]`` names group ``g`` (class x spurious attribute), e.g. ``"7/decoy-match"``.
    - ``val`` may be ``None`` when the settings ask for no validation split.
    - ``input_scale``: a note on what the pixel values mean (for reports), e.g. ``"0-255"``.
    """

    family: str
    train: Split
    test: Split
    class_names: tuple[str, ...]
    class_descriptions: tuple[str, ...]
    val: Split | None = None
    group_names: tuple[str, ...] = ()
    input_scale: str = "0-1"

    def __post_init__(self) -> None:
        _check(
            len(self.class_names) == len(self.class_descriptions),
            "SpuriousDataset needs one description per class name",
        )

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def for_reader(self, splits: Sequence[str], reader: str) -> SpuriousDataset:
        """This data set as ``reader`` (``"aligner 'rrr'"``) may see it: the splits named in
        ``splits`` (``"train"``, ``"val"``, ``"test"``) as they are, the others withheld (reading
        one raises :class:`SplitWithheld`). A validation split that is ``None`` stays ``None``."""
        unknown = set(splits) - {"train", "val", "test"}
        if unknown:
            raise ValueError(f"SpuriousDataset.for_reader: unknown split(s) {sorted(unknown)}")
        changes: dict[str, Any] = {}
        for name in ("train", "val", "test"):
            if name not in splits and getattr(self, name) is not None:
                changes[name] = _Withheld(name, reader)
        return replace(self, **changes) if changes else self

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of the images (every split has the same; read from one this view has)."""
        split = next(s for s in (self.train, self.val, self.test) if s is not None and not isinstance(s, _Withheld))
        c, h, w = split.images.shape[1:]
        return (int(c), int(h), int(w))

    def to_state(self) -> dict[str, Any]:
        return {
            "family": self.family,
            "train": self.train.to_state(),
            "test": self.test.to_state(),
            "val": None if self.val is None else self.val.to_state(),
            "class_names": list(self.class_names),
            "class_descriptions": list(self.class_descriptions),
            "group_names": list(self.group_names),
            "input_scale": self.input_scale,
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> SpuriousDataset:
        return cls(
            family=state["family"],
            train=Split.from_state(state["train"]),
            test=Split.from_state(state["test"]),
            val=None if state["val"] is None else Split.from_state(state["val"]),
            class_names=tuple(state["class_names"]),
            class_descriptions=tuple(state["class_descriptions"]),
            group_names=tuple(state["group_names"]),
            input_scale=state["input_scale"],
        )


@dataclass(frozen=True)
class AlignmentSet:
    """The training samples chosen for alignment.

    - ``indices``: int64 ``[N]`` indices into ``SpuriousDataset.train``.
    - ``scores``: float32 ``[N]``, the selection score (predictive entropy, nats).
    - ``strategy``: how they were chosen (``"lowest-entropy"``, ...).
    - ``relevant``: bool ``[N, H, W]`` or ``None``: what an aligner is given besides its masks
      of the spurious regions, the regions judged relevant (the clusters judged "yes"; with the
      true masks, everything off them), for aligners that reward attribution there (HINT).
    """

    indices: torch.Tensor
    scores: torch.Tensor
    strategy: str
    relevant: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.indices.shape[0])

    def to_state(self) -> dict[str, Any]:
        state = {"indices": self.indices, "scores": self.scores, "strategy": self.strategy}
        return state if self.relevant is None else {**state, "relevant": self.relevant}

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> AlignmentSet:
        return cls(**state)


#: Which effect of an attribution map a segmentation covers: ``"positive"`` (evidence for the
#: class, the paper's PPEPS-WGM), ``"negative"`` (evidence against it) or ``"absolute"`` (both).
EFFECTS: tuple[str, ...] = ("positive", "negative", "absolute")


def _check_effect(record: str, effect: str) -> None:
    _check(effect in EFFECTS, f"{record}.effect must be one of {', '.join(EFFECTS)}, got {effect!r}")


@dataclass(frozen=True)
class Segmentation:
    """What a Segmenter returns for a batch of attribution maps.

    - ``labels``: int64 ``[B, H, W]``, cluster index in ``0..J-1`` for every pixel.
    - ``shares``: float32 ``[B, J]``, mixture weight of each cluster = its share of the
      segmented effect (rows sum to 1).
    - ``num_clusters``: J.
    - ``degenerate``: bool ``[B]``, True where the map had no attribution of that effect; such a
      sample has every pixel in cluster 0 and shares ``[1, 0, ...]``.
    - ``log_likelihood``: float64 ``[B]``, the weighted log-likelihood reached (per unit weight).
    - ``effect``: the effect the clusters cover, one of :data:`EFFECTS`.
    """

    labels: torch.Tensor
    shares: torch.Tensor
    num_clusters: int
    degenerate: torch.Tensor
    log_likelihood: torch.Tensor
    effect: str = "positive"

    def __post_init__(self) -> None:
        _check_effect("Segmentation", self.effect)
        b = self.labels.shape[0]
        _check(self.labels.dim() == 3, f"Segmentation.labels must be [B,H,W], got {tuple(self.labels.shape)}")
        _check(
            tuple(self.shares.shape) == (b, self.num_clusters),
            f"Segmentation.shares must be [{b},{self.num_clusters}], got {tuple(self.shares.shape)}",
        )

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def to_state(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> Segmentation:
        return cls(**state)


@dataclass(frozen=True)
class RenderedSample:
    """The three PNG images shown to a Critic for one alignment sample.

    ``original``, ``clusters`` and ``overlay`` are PNG file bytes; ``colors`` are the palette
    names of clusters ``0..J-1`` in order; ``files`` are the paths written in the run directory.
    """

    sample_id: int
    original: bytes
    clusters: bytes
    overlay: bytes
    colors: tuple[str, ...]
    files: tuple[str, ...] = ()

    @property
    def images(self) -> tuple[bytes, bytes, bytes]:
        return (self.original, self.clusters, self.overlay)


@dataclass(frozen=True)
class CritiqueRequest:
    """Everything a Critic may use about one alignment sample.

    - ``sample_id``: index into the training split.
    - ``label`` / ``class_description``: the true class in words.
    - ``family``: the data set's template family.
    - ``rendered``: the three images and the ordered colour names.
    - ``cluster_map``: int64 ``[H, W]`` cluster labels (for critics that work on geometry).
    - ``true_mask``: bool ``[H, W]`` or ``None``; only critics with ``needs_true_masks`` may read it.
    - ``effect``: the effect of the attribution the clusters cover (:data:`EFFECTS`); prompts
      say it (a negative-effect cluster is evidence against the class).
    - ``draw``: which of the ``critic.samples`` answers is asked for (0 for the first or only
      one); critics that sample key their cache and seed on it, so each answer is its own.
    """

    sample_id: int
    label: str
    class_description: str
    family: str
    rendered: RenderedSample
    cluster_map: torch.Tensor
    true_mask: torch.Tensor | None = None
    effect: str = "positive"
    draw: int = 0

    def __post_init__(self) -> None:
        _check_effect("CritiqueRequest", self.effect)
        _check(self.draw >= 0, f"CritiqueRequest: draw must be >= 0, got {self.draw}")

    @property
    def colors(self) -> tuple[str, ...]:
        return self.rendered.colors


@dataclass(frozen=True)
class Usage:
    """Tokens spent and money paid for LVLM calls (zero for local critics)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    requests: int = 0
    cache_hits: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.prompt_tokens + other.prompt_tokens,
            self.completion_tokens + other.completion_tokens,
            self.cost_usd + other.cost_usd,
            self.requests + other.requests,
            self.cache_hits + other.cache_hits,
        )

    def to_state(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class Critique:
    """A Critic's free-text discussion of one sample's clusters.

    ``text`` is ``None`` exactly when ``failure`` says why no critique could be had. Critics copy
    ``family`` and ``label`` from the request so that a Judge can pick its template.

    ``retryable`` marks a failure to *obtain* an answer (connection refused, a timeout, an HTTP
    error after the retries, a local generation error): it says nothing about the sample, so the
    pipeline leaves the stage unfinished and a re-run asks again. A failure with ``retryable``
    False is about an answer that was had but cannot be used (empty, cut off); it is recorded
    and the sample is left out of alignment. Write ``failure`` without sample-specific details
    for transport failures ("connection refused at http://127.0.0.1:9/v1"): the pipeline counts
    equal reasons in its error message.
    """

    sample_id: int
    colors: tuple[str, ...]
    text: str | None
    failure: str | None = None
    model: str = ""
    usage: Usage = field(default_factory=Usage)
    family: str = ""
    label: str = ""
    retryable: bool = False
    draw: int = 0

    def __post_init__(self) -> None:
        _check((self.text is None) != (self.failure is None), "Critique needs exactly one of text, failure")
        _check(not (self.retryable and self.failure is None), "Critique: only a failure can be retryable")

    def to_state(self) -> dict[str, Any]:
        return {
            "sample_id": self.sample_id,
            "colors": list(self.colors),
            "text": self.text,
            "failure": self.failure,
            "model": self.model,
            "usage": self.usage.to_state(),
            "family": self.family,
            "label": self.label,
            "retryable": self.retryable,
            # only when sampled: a run with one answer per sample stores what it always stored
            **({"draw": self.draw} if self.draw else {}),
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> Critique:
        return cls(
            sample_id=state["sample_id"],
            colors=tuple(state["colors"]),
            text=state["text"],
            failure=state["failure"],
            model=state["model"],
            usage=Usage(**state["usage"]),
            family=state.get("family", ""),
            label=state.get("label", ""),
            retryable=state.get("retryable", False),
            draw=state.get("draw", 0),
        )


@dataclass(frozen=True)
class Verdicts:
    """A Judge's verdicts for one sample: ``relevant[j]`` True = "yes" (relevant), False = "no"
    (spurious) for cluster ``colors[j]``. ``relevant`` is ``None`` exactly when ``failure`` says
    why no valid verdicts could be had; such a sample is left out of alignment.

    ``retryable`` has the meaning it has on :class:`Critique` (no answer could be obtained: the
    stage is left unfinished and a re-run asks again). ``ignored_colors`` are colours the judge
    gave a verdict for that are not among the sample's clusters: recorded, not used.

    With ``critic.samples = k > 1`` the judge read each of the critic's k answers: ``votes[d]``
    are the verdicts of answer ``d`` (``None`` for an answer that gave none), ``relevant`` the
    majority per colour, and ``uncertainty`` the share of all votes that disagree with it (0:
    every answer agreed; near 0.5: a coin toss). With one answer, ``votes`` is empty and the
    uncertainty 0.

    After review, ``sources[j]`` says who decided colour ``j``: ``"judge"`` or ``"person"``;
    ``judge_relevant`` keeps the judge's own verdicts (``None`` where the judge gave none) when a
    person decided any colour (``None`` when the judge gave none for the sample). Both are empty
    for verdicts no one reviewed.
    """

    sample_id: int
    colors: tuple[str, ...]
    relevant: tuple[bool, ...] | None
    failure: str | None = None
    attempts: int = 1
    usage: Usage = field(default_factory=Usage)
    retryable: bool = False
    ignored_colors: tuple[str, ...] = ()
    votes: tuple[tuple[bool, ...] | None, ...] = ()
    uncertainty: float = 0.0
    sources: tuple[str, ...] = ()
    judge_relevant: tuple[bool, ...] | None = None

    def __post_init__(self) -> None:
        _check((self.relevant is None) != (self.failure is None), "Verdicts needs exactly one of relevant, failure")
        _check(not (self.retryable and self.failure is None), "Verdicts: only a failure can be retryable")
        if self.relevant is not None:
            _check(
                len(self.relevant) == len(self.colors),
                f"Verdicts for sample {self.sample_id}: {len(self.relevant)} verdicts for {len(self.colors)} colours",
            )
        for vote in self.votes:
            _check(vote is None or len(vote) == len(self.colors), f"Verdicts for sample {self.sample_id}: a vote for {len(vote or ())} of {len(self.colors)} colours")
        _check(0.0 <= self.uncertainty <= 1.0, f"Verdicts for sample {self.sample_id}: uncertainty {self.uncertainty} outside [0, 1]")
        _check(
            not self.sources or (len(self.sources) == len(self.colors) and set(self.sources) <= {"judge", "person"}),
            f"Verdicts for sample {self.sample_id}: sources must name 'judge' or 'person' for each of {len(self.colors)} colours",
        )

    @property
    def overridden(self) -> tuple[str, ...]:
        """The colours a person decided."""
        return tuple(c for c, s in zip(self.colors, self.sources, strict=False) if s == "person")

    @property
    def ok(self) -> bool:
        return self.relevant is not None

    def to_state(self) -> dict[str, Any]:
        return {
            "sample_id": self.sample_id,
            "colors": list(self.colors),
            "relevant": None if self.relevant is None else list(self.relevant),
            "failure": self.failure,
            "attempts": self.attempts,
            "usage": self.usage.to_state(),
            "retryable": self.retryable,
            "ignored_colors": list(self.ignored_colors),
            # only where there is something to say: unsampled, unreviewed verdicts are stored
            # as they always were
            **({"votes": [None if v is None else list(v) for v in self.votes], "uncertainty": self.uncertainty} if self.votes else {}),
            **({"sources": list(self.sources)} if self.sources else {}),
            **({"judge_relevant": list(self.judge_relevant)} if self.judge_relevant is not None else {}),
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> Verdicts:
        return cls(
            sample_id=state["sample_id"],
            colors=tuple(state["colors"]),
            relevant=None if state["relevant"] is None else tuple(state["relevant"]),
            failure=state["failure"],
            attempts=state["attempts"],
            usage=Usage(**state["usage"]),
            retryable=state.get("retryable", False),
            ignored_colors=tuple(state.get("ignored_colors", ())),
            votes=tuple(None if v is None else tuple(v) for v in state.get("votes", ())),
            uncertainty=float(state.get("uncertainty", 0.0)),
            sources=tuple(state.get("sources", ())),
            judge_relevant=None if state.get("judge_relevant") is None else tuple(state["judge_relevant"]),
        )


def total_usage(items: Sequence[Critique | Verdicts]) -> Usage:
    out = Usage()
    for item in items:
        out = out + item.usage
    return out


@dataclass(frozen=True)
class TrainedModel:
    """A model with what was chosen to make it, for aligners and mitigators that select
    hyperparameters: ``details`` (JSON-able) names the criterion, the grid with each point's
    validation scores and the choice. It is stored beside the model (``details.json``) and shown
    in results.json under ``models.<key>.details``. Returning a bare ``nn.Module`` is the same
    with no details."""

    model: Any
    details: dict[str, Any] = field(default_factory=dict)
