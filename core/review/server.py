"""The review page: a Flask application over one run directory.

A run with several segmenters or critics has several branches (segmenter x critic/judge pair,
:func:`run_branches`), each with its own verdicts and its own overrides file; the page reviews
one at a time, named by ``branch`` (a query parameter of every ``GET``, a key of every ``POST``
body; a run with one segmenter and one critic in singular sections has the one branch ``""``
and needs neither). A ``GET`` without it shows the branch the server opened on.

- ``GET /``: the page (a Jinja template), one card per alignment sample, the most uncertain
  first when the critic answered several times, and a selector of the run's branches.
- ``GET /image/<sample>/<original|clusters|overlay>.png``: the rendered images the critic saw.
- ``GET /mask/<sample>.png``: the correction mask the current verdicts give (white: forbidden).
- ``GET /api/samples``: the state of every sample as JSON.
- ``GET /api/branches``: the run's branches: key, label, segmenter, critic, judge, overrides
  file, and whether its judge has finished.
- ``POST /api/toggle`` ``{"sample", "colour", "reviewer"?, "comment"?}``: flip one colour's
  verdict; ``POST /api/reset`` ``{"sample"}``: back to the judge's verdicts for a sample.

State-changing requests must carry the page's token in ``X-Review-Token`` (a page of another
site cannot read it, so cannot post), a JSON body, and a ``Host`` this server answers to (a
DNS-rebinding page cannot pose as it). In read-only mode they are refused. A body larger than
:data:`MAX_BODY_BYTES` is answered 413 (with or without a ``Content-Length``: a chunked body is
cut off where it passes the limit), one nested deeper than :data:`MAX_JSON_DEPTH` or not JSON
400, each with ``{"error": ...}`` and nothing written. Overrides are written atomically after
every change, so a closed browser or a killed server loses nothing.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import re
import secrets
import sys
import threading
import tomllib
import webbrowser
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import numpy as np

from ..atomic import open_lock_file, refuse_symlink
from ..overrides import (
    OVERRIDES_FILE,
    Override,
    OverridesError,
    apply_overrides,
    cluster_hash,
    now_iso,
    overrides_file,
    read_overrides,
    write_overrides,
)
from ..records import AlignmentSet, Critique, RenderedSample, Segmentation, Verdicts

if TYPE_CHECKING:
    from ..options import Settings

__all__ = ["ReviewBranch", "ReviewError", "ReviewRun", "run_branches", "create_app", "serve", "make_server"]

_KINDS = ("original", "clusters", "overlay")

#: the largest request body read; the page's requests are a few hundred bytes (a comment is
#: kept to 2,000 characters), so anything near this is not the page's
MAX_BODY_BYTES = 2 * 1024 * 1024
#: the deepest JSON nesting accepted; the page sends one flat object. Checked before parsing,
#: since Python's parser recurses once per level and fails with RecursionError far below the
#: nesting a body of MAX_BODY_BYTES can hold
MAX_JSON_DEPTH = 32

# a JSON string (escapes included; unterminated: to the end, so one pass stays linear) or a bracket
_JSON_TOKEN = re.compile(r'"(?:[^"\\]+|\\.)*"?|[\[\]{}]', re.DOTALL)


def _nested_too_deep(text: str, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether the JSON ``text`` opens more than ``limit`` arrays or objects inside each other
    (brackets outside strings, counted in one pass)."""
    depth = 0
    for match in _JSON_TOKEN.finditer(text):
        token = match.group()
        if token in ("[", "{"):
            depth += 1
            if depth > limit:
                return True
        elif token in ("]", "}"):
            depth -= 1
    return False


class ReviewError(Exception):
    """The run directory cannot be reviewed (not a run, no finished judge, an unusable
    overrides file); the message says what to do."""


class ReviewConflict(ReviewError):
    """The overrides file changed outside the page; nothing was written."""


@dataclass
class _Sample:
    row: int
    sample_id: int
    label: str
    colors: tuple[str, ...]
    rendered: RenderedSample
    critiques: list[Critique]
    judged: Verdicts


@dataclass(frozen=True)
class ReviewBranch:
    """One segmenter x critic/judge pair of a run, as the review page offers it."""

    #: ``"j5.oracle"`` (``<segmenter instance>.<critic instance>``, either part absent when its
    #: role has a singular section); ``""`` for a run with one segmenter and one critic
    key: str
    #: how the report names the segmenter (``"J=5"``), the critic (``"oracle critic"``) and
    #: the judge's plugin
    segmenter: str
    critic: str
    judge: str | None
    #: the stages the page reads: ``segment``, ``render``, ``critic`` and ``judge`` -> the
    #: branch's names for them (``segment.j5``, ``judge.j5.oracle``)
    stages: Mapping[str, str]

    @property
    def label(self) -> str:
        """``"J=5 x oracle critic (j5.oracle)"``."""
        return f"{self.segmenter} x {self.critic}" + (f" ({self.key})" if self.key else "")

    @property
    def overrides(self) -> Path:
        """Where its overrides live, relative to the run directory."""
        return overrides_file(self.key)

    def missing(self, finished: Sequence[str] | Mapping[str, Any]) -> list[str]:
        """The stages the page reads that are not among ``finished`` (stage names)."""
        return [name for name in ("select", *self.stages.values()) if name not in finished]


def run_branches(run_dir: Path) -> list[ReviewBranch]:
    """The branches of a run directory, in the order its stages run, as its
    ``settings.resolved.toml`` records them (the settings of its last compose). Read without
    the run's plugins and without building a pipeline: the recorded options are taken as they
    are, for the names and labels :func:`lvlmva.pipeline.stages.branch_inputs` gives them."""
    from ..pipeline.stages import branch_inputs

    path = Path(run_dir) / "settings.resolved.toml"
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ReviewError(f"{run_dir} has no settings.resolved.toml: run `lvlmva compose SETTINGS --until judge` first") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ReviewError(f"cannot read {path}: {exc}") from None
    out = []
    for b in branch_inputs(_recorded_settings(raw)):
        names = b["names"]
        out.append(ReviewBranch(
            key=b["key"], segmenter=b["segmenter"]["label"], critic=b["critic"], judge=b["judge"],
            stages={role: names[role] for role in ("segment", "render", "critic", "judge")},
        ))  # fmt: skip
    return out


def _recorded_settings(raw: Mapping[str, Any]) -> Settings:
    """The segmenters, critics and judges of a resolved settings file as :class:`Settings`,
    their options recorded but not validated (their plugins need not be installed here)."""
    from pydantic import ConfigDict

    from ..options import INSTANCE_SECTIONS, PAIRING_KEYS, MaskOptions, PluginChoice, paired_judge
    from ..options import Settings as RecordedSettings
    from ..protocols import PluginOptions

    class Recorded(PluginOptions):
        model_config = ConfigDict(extra="allow", frozen=True)

    plugins: dict[str, PluginChoice] = {}
    pairing: dict[str, Any] = {}
    for section, role in INSTANCE_SECTIONS.items():
        if role not in ("segmenter", "critic", "judge"):
            continue
        tables = [(role, raw[role])] if isinstance(raw.get(role), dict) else []
        tables += [(f"{section}.{name}", table) for name, table in (raw.get(section) or {}).items() if isinstance(table, dict)]
        for slot, table in tables:
            values = dict(table)
            name = values.pop("plugin", "")
            if role in PAIRING_KEYS and PAIRING_KEYS[role] in values:
                pairing[slot] = values.pop(PAIRING_KEYS[role])
            plugins[slot] = PluginChoice(role, str(name), Recorded.model_construct(**values), slot)
    judges = [slot for slot, c in plugins.items() if c.role == "judge"]
    for slot, critic in list(plugins.items()):
        if critic.role == "critic":  # as the settings paired them: the judge named, or the only one
            judge = paired_judge(pairing.get(slot), judges)
            plugins[slot] = PluginChoice("critic", critic.name, critic.options, slot, judge=judge)
    masks = raw.get("masks") if isinstance(raw.get("masks"), dict) else {}
    core = {"masks": MaskOptions.model_construct(**{k: v for k, v in masks.items() if k in MaskOptions.model_fields})}
    return RecordedSettings(source=None, core=core, plugins=plugins)


def _choose_branch(run_dir: Path, branches: Sequence[ReviewBranch], key: str | None, finished: Mapping[str, Any]) -> ReviewBranch:
    """The branch named ``key`` (``None``: the first whose judge has finished), or a
    :class:`ReviewError` naming the branches or the stages to run."""
    if key is None:
        ready = [b for b in branches if not b.missing(finished)]
        branch = ready[0] if ready else branches[0]
    else:
        by_key = {b.key: b for b in branches}
        if key not in by_key:
            raise ReviewError(f"{run_dir} has no branch {key!r}; {_branch_list(branches)}")
        branch = by_key[key]
    missing = branch.missing(finished)
    if missing:
        raise ReviewError(
            f"{run_dir} has no finished {', '.join(missing)} stage(s): run "
            f"`lvlmva compose SETTINGS --until {branch.stages['judge']}` (with a critic and a judge) first"
        )
    return branch


def _branch_list(branches: Sequence[ReviewBranch]) -> str:
    if [b.key for b in branches] == [""]:
        return "it has one branch, named by no key (no [segmenters.<name>] or [critics.<name>] tables): leave out --branch"
    return "its branches: " + ", ".join(f"{b.key} ({b.segmenter} x {b.critic})" for b in branches)


class ReviewRun:
    """What the page shows of one branch of a run directory (``branch``: its key; ``None``: the
    first whose judge has finished), and the overrides made on it."""

    def __init__(self, run_dir: Path, branch: str | None = None) -> None:
        from ..pipeline import ArtifactError, open_run
        from ..pipeline.errors import NotARunDirectory

        self.run_dir = Path(run_dir)
        try:
            run = open_run(self.run_dir)
            records = run.records()
        except (NotARunDirectory, OSError) as exc:
            raise ReviewError(str(exc)) from None
        self.branches = run_branches(self.run_dir)
        self.branch = _choose_branch(self.run_dir, self.branches, branch, records)
        stage = self.branch.stages
        try:
            chosen: AlignmentSet = run.load("select")
            self.segmentation: Segmentation = run.load(stage["segment"])
            rendered: list[RenderedSample] = run.load(stage["render"])
            critiques: list[Critique] = run.load(stage["critic"])
            verdicts: list[Verdicts] = run.load(stage["judge"])
        except ArtifactError as exc:
            raise ReviewError(f"cannot read the run: {exc}") from None
        by_sample: dict[int, list[Critique]] = {}
        for c in critiques:
            by_sample.setdefault(c.sample_id, []).append(c)
        judged = {v.sample_id: v for v in verdicts}
        self.samples: dict[int, _Sample] = {}
        for row, (index, r) in enumerate(zip(chosen.indices.tolist(), rendered, strict=True)):
            answers = by_sample.get(index, [])
            v = judged.get(index)
            if v is None:
                raise ReviewError(f"{self.run_dir}: sample {index} has no verdicts in the {stage['judge']} stage")
            label = answers[0].label if answers else ""
            self.samples[index] = _Sample(row, index, label, tuple(r.colors), r, answers, v)
        self.path = self.run_dir / self.branch.overrides
        self.clusters = {sid: cluster_hash(self.segmentation.labels[s.row]) for sid, s in self.samples.items()}
        self._disk = self._on_disk()  # what the file held when read: an edit elsewhere is noticed
        try:
            self.overrides: dict[tuple[int, str], Override] = {(o.sample, o.colour): o for o in read_overrides(self.path)}
            # the same check compose makes: overrides of samples or colours this run lacks
            apply_overrides(verdicts, list(self.overrides.values()), self.path, self.clusters)
        except OverridesError as exc:
            raise ReviewError(str(exc)) from None
        # one lock for reading and changing the overrides (the server answers in threads)
        self.lock = threading.RLock()

    # -- state ------------------------------------------------------------------------------
    def effective(self, sample_id: int) -> Verdicts:
        s = self.samples[sample_id]
        with self.lock:
            mine = [o for (sid, _c), o in self.overrides.items() if sid == sample_id]
        return apply_overrides([s.judged], mine, self.path)[0]

    def state(self, sample_id: int) -> dict[str, Any]:
        with self.lock:
            return self._state(sample_id)

    def _state(self, sample_id: int) -> dict[str, Any]:
        s = self.samples[sample_id]
        v = self.effective(sample_id)
        judge = s.judged.relevant
        colours = []
        for j, color in enumerate(s.colors):
            o = self.overrides.get((sample_id, color))
            colours.append({
                "colour": color,
                "judge": None if judge is None else ("yes" if judge[j] else "no"),
                "verdict": o.verdict if o is not None else (None if judge is None else ("yes" if judge[j] else "no")),
                "source": "person" if o is not None else "judge",
                "votes": [None if vote is None else ("yes" if vote[j] else "no") for vote in s.judged.votes],
                "reviewer": o.reviewer if o else "",
                "comment": o.comment if o else "",
            })  # fmt: skip
        return {
            "sample": sample_id,
            "row": s.row,
            "label": s.label,
            "uncertainty": s.judged.uncertainty,
            "answers": len(s.judged.votes) or 1,
            "judge_failure": s.judged.failure,
            "failure": v.failure,
            "overridden": any(c["source"] == "person" for c in colours),
            "colours": colours,
            "critiques": [c.text if c.text is not None else f"(no answer: {c.failure})" for c in s.critiques],
        }

    def ordered(self) -> list[int]:
        """Sample ids, most uncertain first (equal uncertainty: the run's order)."""
        return sorted(self.samples, key=lambda sid: (-self.samples[sid].judged.uncertainty, self.samples[sid].row))

    def toggle(self, sample_id: int, colour: str, reviewer: str = "", comment: str = "") -> dict[str, Any]:
        """Flip one colour's current verdict (a colour without one becomes "no"); an override
        that comes back to the judge's verdict is removed. Saved before this returns."""
        s = self.samples[sample_id]
        if colour not in s.colors:
            raise KeyError(f"sample {sample_id} has no cluster {colour!r} (its colours: {', '.join(s.colors)})")
        with self.lock:
            self._unchanged()
            key = (sample_id, colour)
            j = s.colors.index(colour)
            judge = None if s.judged.relevant is None else ("yes" if s.judged.relevant[j] else "no")
            current = self.overrides[key].verdict if key in self.overrides else judge
            new = "no" if current in (None, "yes") else "yes"
            before = dict(self.overrides)
            if new == judge:
                self.overrides.pop(key, None)
            else:
                self.overrides[key] = Override(sample_id, colour, new, now_iso(), reviewer, comment, self.clusters[sample_id])
            self._save(before)
            return self._state(sample_id)

    def reset(self, sample_id: int) -> dict[str, Any]:
        if sample_id not in self.samples:
            raise KeyError(f"sample {sample_id} is not an alignment sample of this run")
        with self.lock:
            self._unchanged()
            before = dict(self.overrides)
            for key in [k for k in self.overrides if k[0] == sample_id]:
                del self.overrides[key]
            self._save(before)
            return self._state(sample_id)

    def _on_disk(self) -> str | None:
        try:
            return hashlib.sha256(self.path.read_bytes()).hexdigest()
        except FileNotFoundError:
            return None

    def _unchanged(self) -> None:
        """Refuse to write over an overrides file someone else changed since this page read
        or wrote it (a hand edit): that person's work is not ours to overwrite."""
        if self._on_disk() != self._disk:
            raise ReviewConflict(f"{self.path} was changed outside this page since it was read: restart `lvlmva review` to load it; nothing was written")

    def _save(self, before: dict[tuple[int, str], Override]) -> None:
        try:
            refuse_symlink(self.path.parent)  # review/<branch>/: never written through a link
            write_overrides(self.path, self.overrides.values())
        except OSError:
            self.overrides = before  # what the page shows stays what the file holds
            raise
        self._disk = self._on_disk()

    # -- images -----------------------------------------------------------------------------
    def image(self, sample_id: int, kind: str) -> bytes:
        r = self.samples[sample_id].rendered
        return dict(zip(_KINDS, r.images, strict=True))[kind]

    def mask_png(self, sample_id: int) -> bytes:
        """The correction mask of the current verdicts: the clusters judged "no", in white."""
        from PIL import Image

        s = self.samples[sample_id]
        v = self.effective(sample_id)
        labels = self.segmentation.labels[s.row].numpy()
        mask = np.zeros(labels.shape, dtype=np.uint8)
        if v.relevant is not None:
            for j, relevant in enumerate(v.relevant):
                if not relevant:
                    mask[labels == j] = 255
        else:
            mask[:] = 64  # no usable verdicts: the sample is left out of alignment
        buf = io.BytesIO()
        Image.fromarray(mask, mode="L").save(buf, format="PNG")
        return buf.getvalue()


class _Reviews:
    """The review of every branch of one run, each made when the page first asks for it and
    then kept: one :class:`ReviewRun` per branch, so that every request on a branch shares its
    lock and what it last wrote."""

    def __init__(self, first: ReviewRun) -> None:
        self.run_dir = first.run_dir
        self.branches = first.branches
        self.default = first.branch.key
        self._runs = {first.branch.key: first}
        self._lock = threading.Lock()

    def get(self, key: str) -> ReviewRun:
        """The review of branch ``key``: :class:`KeyError` when the run has no such branch,
        :class:`ReviewError` when it cannot be reviewed (not judged yet, a stale overrides file)."""
        with self._lock:
            if key not in self._runs:
                if key not in {b.key for b in self.branches}:
                    raise KeyError(key)
                self._runs[key] = ReviewRun(self.run_dir, key)
            return self._runs[key]

    def listing(self) -> list[dict[str, Any]]:
        """Every branch for the selector and ``/api/branches``."""
        from ..pipeline import open_run

        finished = open_run(self.run_dir).records()
        return [
            {"key": b.key, "label": b.label, "segmenter": b.segmenter, "critic": b.critic, "judge": b.judge,
             "overrides": b.overrides.as_posix(), "judged": not b.missing(finished)}
            for b in self.branches
        ]  # fmt: skip


def create_app(
    run_dir: Path, *, branch: str | None = None, read_only: bool = False, reviewer: str = "", allowed_hosts: set[str] | None = None
) -> Any:
    """The Flask application for one run directory, opening on ``branch`` (its key; ``None``:
    the first branch whose judge has finished). ``allowed_hosts``: the ``Host`` headers it
    answers requests for; ``None`` = any, for tests."""
    from flask import Flask, Response, abort, jsonify, render_template, request

    reviews = _Reviews(ReviewRun(run_dir, branch))
    token = secrets.token_urlsafe(32)
    app = Flask(__name__, template_folder="templates", static_folder="static")
    # a Content-Length above MAX_CONTENT_LENGTH is refused (413) before reading; a body without
    # one (chunked) is read only up to it, but werkzeug then stops there without an error, so
    # the limit lies one byte past ours and _body refuses a body that reaches it
    app.config.update(REVIEW_RUNS=reviews, REVIEW_TOKEN=token, JSON_SORT_KEYS=False, MAX_CONTENT_LENGTH=MAX_BODY_BYTES + 1)

    def _check_write() -> None:
        if read_only:
            abort(403, description="this review page is read-only (lvlmva review --read-only)")
        sent = request.headers.get("X-Review-Token", "")
        if not hmac.compare_digest(sent, token):
            abort(403, description="missing or wrong review token: reload the page")
        if not request.is_json:
            abort(415, description="send JSON")

    def _body() -> dict[str, Any]:
        # read here, not through get_json: its RecursionError on deep nesting would be a 500
        data = request.get_data(cache=False)
        if len(data) > MAX_BODY_BYTES:  # a chunked body cut off at MAX_CONTENT_LENGTH
            abort(413)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            abort(400, description="the body must be JSON in UTF-8")
        if _nested_too_deep(text):
            abort(400, description=f"the body nests arrays or objects deeper than {MAX_JSON_DEPTH} levels")
        try:
            body = json.loads(text)
        except ValueError:
            abort(400, description="the body is not valid JSON")
        if not isinstance(body, dict):
            abort(400, description="the body must be a JSON object")
        return body

    def _review(key: str) -> ReviewRun:
        try:
            return reviews.get(key)
        except KeyError:
            abort(404, description=f"no branch {key!r} in this run; {_branch_list(reviews.branches)}")
        except ReviewError as exc:
            abort(409, description=str(exc))

    def _shown() -> ReviewRun:
        """The branch a read asks for (``?branch=``), else the one the server opened on."""
        return _review(request.args.get("branch", reviews.default))

    def _changed(body: dict[str, Any]) -> ReviewRun:
        """The branch a change names. Only a run whose one branch has no key may leave it out:
        a change must not land in another branch's file than the one the person looked at."""
        key = body.get("branch", "" if [b.key for b in reviews.branches] == [""] else None)
        if not isinstance(key, str):
            abort(400, description=f"name the branch to change (\"branch\": a string); {_branch_list(reviews.branches)}")
        return _review(key)

    def _sample(run: ReviewRun, body: dict[str, Any]) -> int:
        sid = body.get("sample")
        if not isinstance(sid, int) or isinstance(sid, bool) or sid not in run.samples:
            abort(404, description=f"no alignment sample {sid!r} in this run")
        return sid

    @app.before_request
    def _host() -> None:
        # every request, reads too: a page of another site whose name was made to resolve to
        # this address (DNS rebinding) must not read the run's images and answers either
        if allowed_hosts is not None and request.host not in allowed_hosts:
            abort(403, description=f"requests for host {request.host!r} are not served")

    @app.errorhandler(400)
    @app.errorhandler(403)
    @app.errorhandler(404)
    @app.errorhandler(409)
    @app.errorhandler(415)
    @app.errorhandler(500)
    def _error(exc: Any) -> Any:
        return jsonify({"error": getattr(exc, "description", str(exc))}), getattr(exc, "code", 500)

    @app.errorhandler(413)
    def _too_large(exc: Any) -> Any:
        return jsonify({"error": f"the request body is larger than {MAX_BODY_BYTES // (1024 * 1024)} MiB; nothing was changed"}), 413

    @app.get("/")
    def page() -> Any:
        key = request.args.get("branch", reviews.default)
        branches = reviews.listing()
        problem, status, states = "", 200, []
        try:
            run = reviews.get(key)
        except KeyError:
            named = [b["key"] for b in branches] != [""]
            problem, status = f"This run has no branch {key!r}: " + ("choose one above." if named else "open the page without ?branch=."), 404
        except ReviewError as exc:
            problem, status = str(exc), 409
        else:
            states = [run.state(sid) for sid in run.ordered()]
        shown = next((b for b in branches if b["key"] == key), None)
        return render_template(
            "review.html", states=states, token=token, read_only=read_only, reviewer=reviewer,
            run_dir=str(reviews.run_dir), sampled=any(s["answers"] > 1 for s in states), colours=_swatches(),
            overrides_file=str(reviews.run_dir / overrides_file(key)), branch=key, branches=branches,
            shown=shown, problem=problem, query=f"?branch={quote(key, safe='')}" if key else "",
        ), status  # fmt: skip

    @app.get("/favicon.ico")
    def favicon() -> Any:
        return Response(status=204)

    @app.get("/api/branches")
    def branches() -> Any:
        return jsonify({"opened": reviews.default, "branches": reviews.listing()})

    @app.get("/api/samples")
    def samples() -> Any:
        run = _shown()
        return jsonify([run.state(sid) for sid in run.ordered()])

    @app.get("/image/<int:sample>/<kind>.png")
    def image(sample: int, kind: str) -> Any:
        run = _shown()
        if sample not in run.samples or kind not in _KINDS:
            abort(404)
        return Response(run.image(sample, kind), mimetype="image/png")

    @app.get("/mask/<int:sample>.png")
    def mask(sample: int) -> Any:
        run = _shown()
        if sample not in run.samples:
            abort(404)
        response = Response(run.mask_png(sample), mimetype="image/png")
        response.headers["Cache-Control"] = "no-store"
        return response

    @app.post("/api/toggle")
    def toggle() -> Any:
        _check_write()
        body = _body()
        run = _changed(body)
        sid = _sample(run, body)
        colour = body.get("colour")
        if not isinstance(colour, str) or colour not in run.samples[sid].colors:
            abort(404, description=f"sample {sid} has no cluster {colour!r}")
        who = body.get("reviewer", reviewer)
        comment = body.get("comment", "")
        if not isinstance(who, str) or not isinstance(comment, str):
            abort(400, description="reviewer and comment must be strings")
        try:
            return jsonify(run.toggle(sid, colour, who[:200], comment[:2000]))
        except ReviewConflict as exc:
            return jsonify({"error": str(exc)}), 409

    @app.post("/api/reset")
    def reset() -> Any:
        _check_write()
        body = _body()
        run = _changed(body)
        try:
            return jsonify(run.reset(_sample(run, body)))
        except ReviewConflict as exc:
            return jsonify({"error": str(exc)}), 409

    @app.after_request
    def _headers(response: Any) -> Any:
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("X-Frame-Options", "DENY")
        response.headers.setdefault("Content-Security-Policy", "default-src 'self'; img-src 'self'; style-src 'self'; script-src 'self'")
        return response

    return app


def _swatches() -> dict[str, str]:
    from ..rendering import PALETTE

    return {name: "#{:02x}{:02x}{:02x}".format(*rgb) for name, rgb in PALETTE}


_LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _hosts(host: str, port: int) -> set[str]:
    names = {host, "127.0.0.1", "localhost", "[::1]"} if host in _LOOPBACK else {host}
    return {f"{name}:{port}" for name in names} | ({name for name in names} if port == 80 else set())


def make_server(
    run_dir: Path, *, branch: str | None = None, host: str = "127.0.0.1", port: int = 0, read_only: bool = False, reviewer: str = ""
) -> Any:
    """A werkzeug server (threaded) for the review page, bound but not yet serving; its
    ``port`` is the one bound (0 picks a free one), its ``reviews`` the run's branches and the
    one it opens on (``branch``, as for :func:`create_app`)."""
    from werkzeug.serving import make_server as _make

    holder: dict[str, Any] = {}

    def app(environ: Any, start_response: Any) -> Any:  # the real app, made once the port is known
        return holder["app"](environ, start_response)

    from werkzeug.serving import WSGIRequestHandler

    class _Quiet(WSGIRequestHandler):
        def log_request(self, code: Any = "-", size: Any = "-") -> None:  # noqa: D102 - one line per image would drown the terminal
            if self.command == "POST" or str(code)[:1] in ("4", "5"):
                super().log_request(code, size)

    if not 0 <= port <= 65535:
        raise ReviewError(f"--port {port}: a port is 0 (any free one) to 65535")
    try:
        server = _make(host, port, app, threaded=True, request_handler=_Quiet)
    except (OSError, OverflowError) as exc:
        raise ReviewError(f"cannot listen on {host}:{port}: {getattr(exc, 'strerror', None) or exc}") from None
    except SystemExit:  # werkzeug reports a port in use itself and exits 1
        raise ReviewError(f"cannot listen on {host}:{port}: the address is in use or cannot be bound (another lvlmva review?)") from None
    # bound to loopback: only the loopback names are served (no DNS rebinding); bound to another
    # address on purpose, any name others reach it by (the token still guards every change)
    hosts = _hosts(host, server.port) if host in _LOOPBACK else None
    try:
        # one writer per run: a second page would overwrite the first one's overrides
        lock = None if read_only else _hold_review_lock(Path(run_dir))
    except BaseException:
        server.server_close()
        raise
    close_socket = server.server_close
    closing = threading.Lock()  # werkzeug's serve_forever closes in its thread as the caller does

    def server_close() -> None:  # the socket and the run's review lock go together
        with closing:
            close_socket()
            if lock is not None and not lock.closed:
                lock.close()

    server.server_close = server_close
    try:
        holder["app"] = create_app(run_dir, branch=branch, read_only=read_only, reviewer=reviewer, allowed_hosts=hosts)
    except BaseException:
        server.server_close()  # a run that cannot be reviewed must not leave the port bound
        raise
    server.reviews = holder["app"].config["REVIEW_RUNS"]
    return server


def _hold_review_lock(run_dir: Path) -> Any:
    """An exclusive lock on ``review/.lock`` held while the server runs (released when the
    process ends or the returned file is closed); every branch's overrides lie under
    ``review/``, so it guards them all."""
    import fcntl

    if not run_dir.is_dir():
        return None  # ReviewRun says what is wrong with the folder
    folder = run_dir / OVERRIDES_FILE.parent
    try:
        refuse_symlink(folder)
        folder.mkdir(exist_ok=True)
        fh = open_lock_file(folder / ".lock")  # held for the server's life; never through a link
    except OSError as exc:
        raise ReviewError(f"cannot write into {folder}: {exc.strerror or exc}") from None
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.close()
        raise ReviewError(f"{run_dir} is being reviewed by another lvlmva review (its changes would be overwritten); stop that one, or use --read-only") from None
    return fh


def serve(
    run_dir: Path, *, branch: str | None = None, host: str = "127.0.0.1", port: int = 8765, read_only: bool = False,
    reviewer: str = "", open_browser: bool = True,
) -> int:
    """Serve the review page until interrupted, opening on ``branch`` (its key; ``None``: the
    first branch judged); returns the exit code."""
    server = make_server(run_dir, branch=branch, host=host, port=port, read_only=read_only, reviewer=reviewer)
    reviews: _Reviews = server.reviews
    shown = f"[{host}]" if ":" in host else host
    opened = reviews.default
    url = f"http://{shown}:{server.port}/" + (f"?branch={quote(opened, safe='')}" if opened else "")
    saved = "read-only" if read_only else "overrides saved in " + str(Path(run_dir) / overrides_file(opened))
    print(f"lvlmva review: {url}  ({saved}); Ctrl-C to stop", file=sys.stderr)
    if opened:
        others = [b.key for b in reviews.branches if b.key != opened]
        print(f"lvlmva review: branch {opened}" + (f"; the page switches to the others ({', '.join(others)}), each with its own file" if others else ""), file=sys.stderr)
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"lvlmva review: listening on {host}: anyone who can reach this address can see the run's samples "
              "and change its verdicts (use --read-only to show them only)", file=sys.stderr)
    if open_browser:
        threading.Timer(0.5, lambda: webbrowser.open(url)).start()
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0
