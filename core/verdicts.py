"""Verdicts from several answers of the critic: majority per colour and the sample's uncertainty.

With ``critic.samples = k`` the critic answers each alignment sample k times (at a temperature
above zero) and the judge reads every answer. :func:`combine_draws` turns the k verdicts of one
sample into one :class:`~lvlmva.records.Verdicts`: per colour the verdict most answers gave, and
as the sample's uncertainty the share of all votes that disagree with the majority (summed over
colours, divided by the number of votes cast). A colour on which the answers are tied (an even
number of usable answers) has no majority: the sample is then a recorded failure, left out of
alignment, and a person can decide it in ``lvlmva review``.
"""

from __future__ import annotations

from collections.abc import Sequence

from .records import Usage, Verdicts

__all__ = ["combine_draws", "uncertainty_of"]


def uncertainty_of(votes: Sequence[Sequence[bool]], majority: Sequence[bool]) -> float:
    """Share of the votes that disagree with the majority verdict of their colour."""
    cast = sum(len(v) for v in votes)
    if cast == 0:
        return 0.0
    against = sum(int(a != m) for vote in votes for a, m in zip(vote, majority, strict=True))
    return against / cast


def combine_draws(draws: Sequence[Verdicts]) -> Verdicts:
    """One sample's verdicts from the verdicts of each of its critic answers (in draw order).

    A single draw is returned as it is. Draws that failed give no vote; when none gave one, the
    sample fails with the first draw's reason (retryable if any draw's failure was)."""
    if not draws:
        raise ValueError("combine_draws needs the verdicts of at least one answer")
    if len(draws) == 1:
        return draws[0]
    first = draws[0]
    ids = {v.sample_id for v in draws}
    colors = {v.colors for v in draws}
    if len(ids) != 1 or len(colors) != 1:
        raise ValueError(f"combine_draws: the draws are of different samples or colours ({sorted(ids)})")
    usage = sum((v.usage for v in draws), Usage())
    attempts = sum(v.attempts for v in draws)
    ignored = tuple(dict.fromkeys(c for v in draws for c in v.ignored_colors))
    votes = tuple(v.relevant for v in draws)
    cast = [v for v in votes if v is not None]
    common = {"sample_id": first.sample_id, "colors": first.colors, "attempts": attempts, "usage": usage, "ignored_colors": ignored, "votes": votes}
    if not cast:
        reason = next(v.failure for v in draws if v.failure)
        return Verdicts(relevant=None, failure=f"no answer of {len(draws)} gave verdicts; the first: {reason}",
                        retryable=any(v.retryable for v in draws), **common)  # fmt: skip
    majority: list[bool] = []
    tied: list[str] = []
    for j, color in enumerate(first.colors):
        yes = sum(int(v[j]) for v in cast)
        no = len(cast) - yes
        if yes == no:
            tied.append(f"{color} ({yes} yes, {no} no)")
        majority.append(yes > no)
    uncertainty = uncertainty_of(cast, majority)
    if tied:
        return Verdicts(relevant=None, failure=f"the {len(cast)} answers with verdicts are tied on {', '.join(tied)}",
                        uncertainty=uncertainty, **common)  # fmt: skip
    return Verdicts(relevant=tuple(majority), uncertainty=uncertainty, **common)
