"""The critic and judge flows, written once for every backend.

A backend is a transport (:mod:`.transport`): it turns chat requests into answers or failures.
Everything else happens here, the same for every backend: prompts, the critic's draws, the
response cache, the checks an answer must pass (:mod:`.answers`, :mod:`.verdict_schema`), the
judge's repair rounds (an invalid answer sent back with the error, ``repair_attempts`` times),
usage and cost, transcripts, and what kind of failure a sample gets.

What happens to each request (one sample, or one draw of a sample):

- a good answer in the response cache is used; one that no longer passes the checks (stored by
  an older version) is moved to the unusable answers, and a stored unusable answer that passes
  now is used;
- otherwise it is asked: when it has no answer yet ("missing"), when its last request got none
  ("failed in transport"), or when its answers so far were unusable and fewer than
  ``max_invalid_attempts`` ("invalid so far"). ``--refresh`` asks every request again;
  ``retry_invalid`` (``lvlmva compose --retry-invalid``) also those at ``max_invalid_attempts``;
- an answer that passes is stored and used. One that was had (paid for) but is unusable is
  stored apart with its text and counted, never used: below ``max_invalid_attempts`` its failure
  is ``retryable`` (the stage is left unfinished and a new run asks again), at it the sample is
  a recorded failure, left out of alignment, which a person may decide in ``lvlmva review``;
- a transport failure is ``retryable`` (it says nothing about the sample), unless the transport
  says asking again cannot help.

:meth:`LvlmPlugin.plan` says, before anything is sent, how many requests a call will send and
why; the pipeline prints it. Every text stored, returned or raised passes through
:func:`lvlmva.secrets.redact`.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from pydantic import Field

from lvlmva.protocols import RunContext
from lvlmva.records import Critique, CritiqueRequest, Usage, Verdicts
from lvlmva.secrets import redact, redact_json

from .answers import critic_answer_problem, cut_off_note
from .cache import ResponseCache, open_response_cache, sha256_hex
from .prompts import TemplateBook, render_critic_prompt, render_judge_prompt
from .transport import AnswerSchema, ChatAnswer, ChatRequest, Outcome, Transport, TransportFailure
from .verdict_schema import JudgeAnswerError, judge_json_schema, parse_judge_answer

__all__ = [
    "LvlmPlugin",
    "LvlmCritic",
    "LvlmJudge",
    "RequestPlan",
    "REASONS",
    "draw_seed",
    "max_invalid_attempts_field",
    "retry_invalid_field",
    "run_sync",
]

T = TypeVar("T")

#: why a request is sent, in the order a plan lists them
REASONS = ("missing", "failed in transport", "invalid so far", "retry-invalid", "refresh", "cache off")


def max_invalid_attempts_field() -> Any:
    """The ``max_invalid_attempts`` option of an LVLM plugin."""
    return Field(
        2,
        ge=1,
        description="Most unusable answers one request may get over all runs (a judge answer still invalid after its repair rounds; a critic answer that is empty, cut off, or does not discuss every cluster colour), counted in the response cache: below it a new run asks again, at it the sample is a recorded failure, left out of alignment (decide it in `lvlmva review`, or ask once more with `lvlmva compose --retry-invalid`). Without the cache, the first unusable answer is a recorded failure.",
    )


def retry_invalid_field() -> Any:
    """The ``retry_invalid`` option of an LVLM plugin."""
    return Field(
        False,
        description="Ask once more the requests whose unusable answers reached max_invalid_attempts (`lvlmva compose --retry-invalid` sets it for one run).",
    )


def draw_seed(seed: int, draw: int) -> int:
    """The seed of answer ``draw`` of a sample: the run seed for the first, another for each
    further one, so that a server that honours seeds does not repeat the first answer."""
    if not draw:
        return seed
    return int.from_bytes(hashlib.sha256(f"{seed}:draw:{draw}".encode()).digest()[:4], "little")


@dataclass(frozen=True)
class RequestPlan:
    """What a call will send, found before anything is sent: requests by reason (first
    requests; the judge's repairs come on top, at most ``repairs`` each), answers from the
    cache, requests not asked again (``max_invalid_attempts`` reached) and items with nothing to
    ask (a judge's failed critiques)."""

    role: str
    backend: str
    model: str
    reasons: dict[str, int]
    cached: int = 0
    shared: int = 0
    given_up: int = 0
    nothing_to_ask: int = 0
    repairs: int = 0
    max_invalid_attempts: int = 1

    @property
    def requests(self) -> int:
        return sum(self.reasons.values())

    def __str__(self) -> str:
        who, n = f"{self.role} ({self.backend} {self.model})", self.requests
        if n:
            why = ", ".join(f"{k} {reason}" for reason, k in self.reasons.items() if k)
            text = f"{who}: sends {n} request{'s' if n != 1 else ''} ({why})"
            if self.repairs:
                text += (
                    f" and up to {n * self.repairs} more to repair invalid answers "
                    f"({self.role}.repair_attempts = {self.repairs})"
                )
        else:
            text = f"{who}: sends no requests"
        more = []
        if self.cached:
            more.append(f"{self.cached} answer{'s' if self.cached != 1 else ''} from the response cache")
        if self.shared:
            more.append(f"{self.shared} the same as another request (asked once)")
        if self.given_up:
            more.append(
                f"{self.given_up} not asked again: {self.role}.max_invalid_attempts = "
                f"{self.max_invalid_attempts} unusable answers reached (lvlmva compose "
                "--retry-invalid asks once more)"
            )
        if self.nothing_to_ask:
            more.append(f"{self.nothing_to_ask} without a critique to judge")
        return text + "".join(f"; {m}" for m in more)


@dataclass
class _Job:
    """One request of a call and what became of it."""

    index: int
    item: Any
    record: dict[str, Any]
    chat: ChatRequest | None = None  # None: nothing to ask (a failed critique)
    key_extra: dict[str, Any] = field(default_factory=dict)
    key: str | None = None
    reason: str = ""  # why it is asked; "" when it is not
    cached: str | None = None  # a usable answer from the cache
    parsed: Any = None  # what the check made of it (the judge's verdicts)
    invalid: int = 0  # unusable answers stored for it
    given_up: bool = False
    last_unusable: tuple[str, str | None] | None = None  # (text, finish_reason)
    demote: str | None = None  # a cached answer that no longer passes: to move to unusable
    promote: str | None = None  # a stored unusable answer that passes now: to store as good
    answers: list[ChatAnswer] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    attempts: int = 0
    usage: Usage = field(default_factory=Usage)
    result: Any = None
    leader: _Job | None = None  # an identical request of the call, asked in its place
    followers: list[_Job] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)


class LvlmPlugin:
    """What every LVLM critic and judge does. A backend subclasses :class:`LvlmCritic` or
    :class:`LvlmJudge` and gives :meth:`transport`, :attr:`token_limit` and, if it has
    something to check before a run, ``preflight``. Its options need ``model``, ``family``,
    ``template``, ``cache``, ``cache_dir``, ``max_invalid_attempts`` and ``retry_invalid``
    (a judge's also ``repair_attempts``)."""

    role: ClassVar[str] = ""
    backend: ClassVar[str] = ""

    def __init__(self, options: Any) -> None:
        self.options = options
        self._templates = TemplateBook(self.role, self.backend, options.family, options.template)

    # -- what a backend gives -----------------------------------------------------------------
    def transport(self, ctx: RunContext) -> Transport:
        """The transport that answers this plugin's requests in ``ctx`` (made cheaply: it may
        be asked only for cache keys; secrets and models are read or loaded when it answers)."""
        raise NotImplementedError

    @property
    def token_limit(self) -> tuple[str, int]:
        """The option that bounds an answer's length and its value (``("max_tokens", 1024)``),
        as failures name it."""
        raise NotImplementedError

    # -- what a role gives (LvlmCritic, LvlmJudge) ----------------------------------------------
    repairs: ClassVar[int] = 0

    def _job(self, index: int, item: Any, ctx: RunContext, kind: str) -> _Job:
        raise NotImplementedError

    def _check(self, job: _Job, text: str, finish_reason: str | None) -> tuple[str | None, Any]:
        raise NotImplementedError

    def _answered(self, job: _Job, text: str, parsed: Any) -> Any:
        raise NotImplementedError

    def _failed(self, job: _Job, failure: str, retryable: bool) -> Any:
        raise NotImplementedError

    def _unusable_text(self, job: _Job, problem: str, answers: int, finish_reason: str | None) -> str:
        raise NotImplementedError

    def _record(self, job: _Job) -> dict[str, Any]:
        """The role's own transcript fields for a finished job."""
        return {}

    # -- the plan ---------------------------------------------------------------------------------
    def plan(self, items: Sequence[Any], ctx: RunContext) -> RequestPlan:
        """How many requests answering ``items`` would send now, and why. Reads the cache;
        sends and stores nothing."""
        transport = self.transport(ctx)
        with self._cache(ctx) as cache:
            jobs = self._jobs(items, ctx, transport, cache)
        reasons = Counter(j.reason for j in jobs if j.reason)
        return RequestPlan(
            role=self.role,
            backend=transport.kind,
            model=self.options.model,
            reasons={r: reasons[r] for r in REASONS if reasons[r]},
            cached=sum(j.cached is not None for j in jobs),
            shared=sum(j.leader is not None for j in jobs),
            given_up=sum(j.given_up for j in jobs),
            nothing_to_ask=sum(j.chat is None for j in jobs),
            repairs=self.repairs,
            max_invalid_attempts=self.options.max_invalid_attempts,
        )

    # -- the flow ---------------------------------------------------------------------------------
    def _answer_all(self, items: Sequence[Any], ctx: RunContext) -> list[Any]:
        return self._secret_free(lambda: run_sync(lambda: self._flow(items, ctx)))

    async def _flow(self, items: Sequence[Any], ctx: RunContext) -> list[Any]:
        transport = self.transport(ctx)
        with self._cache(ctx) as cache:
            jobs = self._jobs(items, ctx, transport, cache)
            for job in jobs:
                if cache is not None and job.key is not None:
                    self._settle(job, cache)
                if job.cached is not None:
                    self._finish(job, self._answered(job, job.cached, job.parsed), ctx, hit=True)
                elif job.given_up:
                    text, reason = job.last_unusable  # type: ignore[misc]
                    problem, _ = self._check(job, text, reason)
                    failure = self._unusable_text(job, problem or "", 0, reason)
                    self._finish(job, self._failed(job, failure + self._spent_note(job.invalid), False), ctx)
                elif job.result is not None:
                    self._finish(job, job.result, ctx)
            asked = [j for j in jobs if j.reason]
            if asked:
                await self._ask(asked, transport, cache, ctx)
            return [j.result for j in jobs]

    def _jobs(self, items: Sequence[Any], ctx: RunContext, transport: Transport, cache: ResponseCache | None) -> list[_Job]:
        jobs = []
        for index, item in enumerate(items):
            job = self._job(index, item, ctx, transport.kind)
            if job.chat is not None:
                parts = transport.key_parts(job.chat)
                if job.key_extra:
                    parts["params"] = {**parts["params"], **job.key_extra}
                job.key = ResponseCache.key(**parts, template_version=job.record["template_version"])
                self._look_up(job, cache, ctx)
            jobs.append(job)
        # identical requests (two samples whose critiques read alike) are asked once
        asked: dict[str, _Job] = {}
        for job in jobs:
            if job.reason and job.key is not None:
                leader = asked.setdefault(job.key, job)
                if leader is not job:
                    job.leader, job.reason = leader, ""
                    leader.followers.append(job)
        return jobs

    def _look_up(self, job: _Job, cache: ResponseCache | None, ctx: RunContext) -> None:
        """Decide from the cache whether ``job`` is answered, asked (and why) or given up."""
        if cache is None:
            job.reason = "cache off"
            return
        key = job.key
        assert key is not None
        if ctx.refresh:
            job.reason, job.invalid = "refresh", len(cache.unusable(key))
            return
        good = cache.get(key)
        if good is not None:
            problem, parsed = self._check(job, good, None)
            if problem is None:
                job.cached, job.parsed = good, parsed
                return
            job.demote = good  # stored by an older version whose checks it passed
        stored = cache.unusable(key)
        for text, meta in reversed(stored):
            problem, parsed = self._check(job, text, meta.get("finish_reason"))
            if problem is None:  # a check that changed since: it is usable after all
                job.promote = job.cached = text
                job.parsed = parsed
                return
        job.invalid = len(stored) + (job.demote is not None)
        if stored:
            job.last_unusable = (stored[-1][0], stored[-1][1].get("finish_reason"))
        if job.demote is not None:
            job.last_unusable = (job.demote, None)
        if not job.invalid:
            job.reason = "failed in transport" if cache.unanswered(key) else "missing"
        elif job.invalid < self.options.max_invalid_attempts:
            job.reason = "invalid so far"
        elif self.options.retry_invalid:
            job.reason = "retry-invalid"
        else:
            job.given_up = True

    def _settle(self, job: _Job, cache: ResponseCache) -> None:
        """Apply what the look-up found out about stored answers."""
        key = job.key
        assert key is not None
        if job.demote is not None:
            cache.add_unusable(key, job.demote, {"model": self.options.model, "moved": "no longer passes the checks"})
            cache.delete(key)
        if job.promote is not None:
            cache.put(key, job.promote, {"model": self.options.model, "moved": "passes the checks now"})

    async def _ask(self, jobs: list[_Job], transport: Transport, cache: ResponseCache | None, ctx: RunContext) -> None:
        """Ask in rounds: every job's first request, then the repairs of invalid answers."""
        pending = [(job, job.chat) for job in jobs]
        with ctx.progress_bar(f"{self.role} ({self.options.model})", len(pending), transient=True) as bar:
            advance, grow = bar.advance, bar.grow  # one request done; a repair round's requests
            for round_ in range(self.repairs + 1):
                last = round_ == self.repairs
                follow: list[tuple[_Job, ChatRequest]] = []
                delivered: set[int] = set()

                def deliver(i: int, outcome: Outcome, pending=pending, last=last, follow=follow, delivered=delivered) -> None:
                    if i in delivered or not 0 <= i < len(pending):
                        raise RuntimeError(f"transport {transport.kind!r} delivered request {i} twice or out of range")
                    delivered.add(i)
                    job, chat = pending[i]
                    repair = self._take(job, chat, outcome, last, cache, ctx)  # type: ignore[arg-type]
                    if repair is not None:
                        follow.append((job, repair))
                    advance()

                await transport.answer([chat for _, chat in pending], deliver)  # type: ignore[misc]
                if len(delivered) != len(pending):
                    raise RuntimeError(
                        f"transport {transport.kind!r} answered {len(delivered)} of {len(pending)} requests"
                    )
                if not follow:
                    return
                pending = sorted(follow, key=lambda p: p[0].index)
                grow(len(pending))

    def _take(self, job: _Job, chat: ChatRequest, outcome: Outcome, last: bool, cache: ResponseCache | None, ctx: RunContext) -> ChatRequest | None:
        """One outcome of ``job``: its result, or the repair request to send next round."""
        job.attempts += outcome.attempts
        job.errors.extend(redact(e) for e in outcome.errors)
        if isinstance(outcome, TransportFailure):
            job.usage = job.usage + Usage(requests=outcome.attempts)
            if outcome.retryable and cache is not None and job.key is not None:
                cache.mark_unanswered(job.key)
            self._finish(job, self._failed(job, redact(outcome.message), outcome.retryable), ctx)
            return None
        answer = outcome
        job.usage = job.usage + Usage(
            answer.prompt_tokens, answer.completion_tokens, answer.cost_usd, answer.attempts
        )
        job.answers.append(answer)
        problem, parsed = self._check(job, answer.text, answer.finish_reason)
        if problem is None:
            if cache is not None and job.key is not None:
                # under the first request's key, repaired or not: a re-run gets it at once
                cache.put(job.key, answer.text, self._meta(job, answer))
            job.parsed = parsed
            self._finish(job, self._answered(job, answer.text, parsed), ctx)
            return None
        job.problems.append(problem)
        if not last:
            return chat.then(answer.text, f"Your answer could not be used: {problem} Please answer again.")
        failure = self._unusable_text(job, problem, len(job.answers), answer.finish_reason)
        if cache is None or job.key is None:
            self._finish(job, self._failed(job, failure, False), ctx)
            return None
        job.invalid = cache.add_unusable(job.key, answer.text, self._meta(job, answer))
        limit = self.options.max_invalid_attempts
        if job.invalid < limit:
            note = f" (unusable answer {job.invalid} of {self.role}.max_invalid_attempts = {limit}: a new run asks again)"
            self._finish(job, self._failed(job, failure + note, True), ctx)
        else:
            self._finish(job, self._failed(job, failure + self._spent_note(job.invalid), False), ctx)
        return None

    def _spent_note(self, invalid: int) -> str:
        limit = self.options.max_invalid_attempts
        return (
            f" ({invalid} unusable answers, {self.role}.max_invalid_attempts = {limit}: not asked "
            "again; lvlmva compose --retry-invalid asks once more)"
        )

    def _meta(self, job: _Job, answer: ChatAnswer) -> dict[str, Any]:
        return {
            "model": self.options.model,
            "finish_reason": answer.finish_reason,
            "prompt_tokens": answer.prompt_tokens,
            "completion_tokens": answer.completion_tokens,
            "answers": len(job.answers),
            **({"problems": job.problems} if job.problems else {}),
        }

    def _finish(self, job: _Job, result: Any, ctx: RunContext, hit: bool = False) -> None:
        """Keep ``result`` and write the job's transcript line (every text redacted)."""
        job.result = result
        answer = job.cached if hit else (job.answers[-1].text if job.answers else None)
        if answer is None and job.given_up and job.last_unusable is not None:
            answer = job.last_unusable[0]
        record = {
            **job.record,
            "answer": answer,
            **self._record(job),
            "cache_hit": hit,
            "asked": job.reason or None,
            "unusable_answers": job.invalid,
            "attempts": job.attempts,
            "errors": job.errors,
            "latency_s": round(time.perf_counter() - job.started, 4),
            "failure": result.failure,
            "retryable": result.retryable,
            "usage": result.usage.to_state(),
            **({"same_as": job.leader.item.sample_id} if job.leader is not None else {}),
        }
        ctx.log_jsonl("transcripts.jsonl", redact_json(record))
        for follower in job.followers:  # what was had for an identical request, at no cost
            follower.invalid = job.invalid
            if result.failure is None:
                follower.cached, follower.parsed = job.answers[-1].text, job.parsed
                self._finish(follower, self._answered(follower, follower.cached, job.parsed), ctx, hit=True)
            else:
                self._finish(follower, self._failed(follower, result.failure, result.retryable), ctx)

    # -- shared plumbing --------------------------------------------------------------------------
    @contextmanager
    def _cache(self, ctx: RunContext) -> Iterator[ResponseCache | None]:
        cache = open_response_cache(self.options.cache, self.options.cache_dir, ctx.cache_dir)
        try:
            yield cache
        finally:
            if cache is not None:
                cache.close()

    def _secret_free(self, call: Callable[[], T]) -> T:
        """``call()``, and an exception out of it whose text (or that of an exception chained
        to it) holds a registered secret raised again as a RuntimeError with the texts
        redacted, and without the chain that held it."""
        try:
            return call()
        except Exception as exc:
            texts = _chain_texts(exc)
            if all(redact(text) == text for text in texts):
                raise
            message = "; from ".join(redact(text) for text in texts)
        # raised outside the except block, so that the original is not its __context__ either
        raise RuntimeError(f"{self.role} plugin {self.backend!r}: {message}")


class LvlmCritic(LvlmPlugin):
    """The critic flow: one request per sample (per draw with ``samples`` > 1), the three
    rendered images and the prompt; an answer is usable when whole and discussing every colour."""

    role: ClassVar[str] = "critic"
    needs_true_masks: ClassVar[bool] = False

    def critique(self, requests: Sequence[CritiqueRequest], ctx: RunContext) -> list[Critique]:
        """One Critique per request, in order; a request that got no usable answer carries
        ``failure`` (``retryable`` when a new run asks again)."""
        if not requests:
            return []
        for request in requests:
            self._templates.get(request.family)  # template errors surface before any request
        return self._answer_all(requests, ctx)

    def _job(self, index: int, request: CritiqueRequest, ctx: RunContext, kind: str) -> _Job:
        template = self._templates.get(request.family)
        prompt = render_critic_prompt(template, request)
        images = tuple(request.rendered.images)
        draw = request.draw
        chat = ChatRequest(
            user=prompt, images=images, seed=draw_seed(ctx.seed, draw),
            label=f"sample {request.sample_id}" + (f" draw {draw}" if draw else ""),
        )  # fmt: skip
        files = request.rendered.files or ("",) * len(images)
        record = {
            "stage": "critic", "backend": kind, "model": self.options.model,
            "sample_id": request.sample_id, **({"draw": draw} if draw else {}), "label": request.label,
            "family": template.family, "template_version": template.version, "prompt": prompt,
            "images": [{"sha256": sha256_hex(png), "file": f} for png, f in zip(images, files, strict=False)],
            "colors": list(request.colors),
        }  # fmt: skip
        # the first answer keeps the key it always had; each further one is keyed by its index
        return _Job(index, request, record, chat, key_extra={"draw": draw} if draw else {})

    def _check(self, job: _Job, text: str, finish_reason: str | None) -> tuple[str | None, Any]:
        return critic_answer_problem(text, finish_reason, job.item.colors, self.token_limit), None

    def _unusable_text(self, job: _Job, problem: str, answers: int, finish_reason: str | None) -> str:
        return problem

    def _common(self, job: _Job) -> dict[str, Any]:
        r: CritiqueRequest = job.item
        return {"sample_id": r.sample_id, "colors": r.colors, "model": self.options.model,
                "family": r.family, "label": r.label, "draw": r.draw}  # fmt: skip

    def _answered(self, job: _Job, text: str, parsed: Any) -> Critique:
        usage = Usage(cache_hits=1) if job.cached is not None else job.usage
        return Critique(text=redact(text), usage=usage, **self._common(job))

    def _failed(self, job: _Job, failure: str, retryable: bool) -> Critique:
        return Critique(text=None, failure=redact(failure), usage=job.usage, retryable=retryable, **self._common(job))

    def _record(self, job: _Job) -> dict[str, Any]:
        return {"finish_reason": job.answers[-1].finish_reason} if job.answers else {}


class LvlmJudge(LvlmPlugin):
    """The judge flow: the critique with the judge's instructions; an answer must parse into one
    verdict per colour, and an invalid one is sent back with the error (``repair_attempts``)."""

    role: ClassVar[str] = "judge"

    @property
    def repairs(self) -> int:  # type: ignore[override]
        return int(self.options.repair_attempts)

    def judge(self, critiques: Sequence[Critique], ctx: RunContext) -> list[Verdicts]:
        """One Verdicts per critique, in order; a critique that got no usable verdicts carries
        ``failure`` (``retryable`` when a new run asks again), never a guess."""
        if not critiques:
            return []
        for critique in critiques:
            if critique.text is not None:
                self._templates.get(critique.family)
        return self._answer_all(critiques, ctx)

    def _job(self, index: int, critique: Critique, ctx: RunContext, kind: str) -> _Job:
        colors = critique.colors
        record: dict[str, Any] = {"stage": "judge", "backend": kind, "model": self.options.model,
                                  "sample_id": critique.sample_id, "colors": list(colors)}  # fmt: skip
        if critique.text is None:
            # Not retryable: judging again cannot help; the critic's failure is the one a re-run
            # must fix.
            job = _Job(index, critique, record)
            reason = redact(f"no critique to judge: {critique.failure}")
            job.result = Verdicts(critique.sample_id, colors, None, failure=reason, attempts=0)
            return job
        template = self._templates.get(critique.family)
        instructions, user = render_judge_prompt(template, critique)
        chat = ChatRequest(
            user=user, system=instructions, seed=ctx.seed,
            label=f"sample {critique.sample_id}" + (f" draw {critique.draw}" if critique.draw else ""),
            schema=AnswerSchema("cluster_verdicts", judge_json_schema(colors)),
        )  # fmt: skip
        record.update(family=template.family, template_version=template.version,
                      prompt={"system": instructions, "user": user})  # fmt: skip
        return _Job(index, critique, record, chat)

    def _check(self, job: _Job, text: str, finish_reason: str | None) -> tuple[str | None, Any]:
        try:
            return None, parse_judge_answer(text, job.item.colors)
        except JudgeAnswerError as exc:
            return str(exc), None

    def _unusable_text(self, job: _Job, problem: str, answers: int, finish_reason: str | None) -> str:
        text = f"invalid judge answer after {answers} answer(s): {problem}" if answers else f"invalid judge answer: {problem}"
        if finish_reason == "length":
            text += cut_off_note("judge", self.token_limit)
        return text

    def _answered(self, job: _Job, text: str, parsed: Any) -> Verdicts:
        c: Critique = job.item
        hit = job.cached is not None
        return Verdicts(c.sample_id, c.colors, parsed.relevant, attempts=0 if hit else len(job.answers),
                        usage=Usage(cache_hits=1) if hit else job.usage, ignored_colors=parsed.ignored)  # fmt: skip

    def _failed(self, job: _Job, failure: str, retryable: bool) -> Verdicts:
        c: Critique = job.item
        attempts = max(1, len(job.answers)) if job.reason else 0
        return Verdicts(c.sample_id, c.colors, None, failure=redact(failure), attempts=attempts,
                        usage=job.usage, retryable=retryable)  # fmt: skip

    def _record(self, job: _Job) -> dict[str, Any]:
        verdicts = job.result.relevant if job.result is not None else None
        colors = job.item.colors
        return {
            "answers": [a.text for a in job.answers],
            "validation_errors": job.problems,
            "verdicts": None if verdicts is None else {c: ("yes" if r else "no") for c, r in zip(colors, verdicts, strict=True)},
            "ignored_colors": list(job.result.ignored_colors) if job.result is not None else [],
        }


def _chain_texts(exc: BaseException) -> list[str]:
    """``Type: message`` of ``exc`` and of every exception chained to it (cause or context,
    as a traceback prints them), notes included."""
    texts: list[str] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        notes = getattr(current, "__notes__", None) or []
        texts.append(" ".join([f"{type(current).__name__}: {current}", *map(str, notes)]))
        current = current.__cause__ or current.__context__
    return texts


def run_sync(factory: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine to completion from synchronous code, also when this thread already runs
    an event loop (a notebook): then in a fresh thread with its own loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(factory())
    result: list[T] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            result.append(asyncio.run(factory()))
        except BaseException as exc:  # handed back to the caller's thread below
            error.append(exc)

    thread = threading.Thread(target=target, name="lvlmva-lvlm")
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]
