"""Progress bars for long loops, for plugin authors and the built-ins alike.

A plugin draws a bar through its run context, which knows whether bars are wanted (not when the
output is not a terminal, nor with ``--quiet``)::

    with ctx.progress_bar("my-critic", total=len(requests)) as bar:
        for request in requests:
            ...
            bar.advance()

Without bars the same code runs and draws nothing (the handle still counts). Bars are drawn
with rich on standard error; a bar opened while another is open (a loop inside a loop) becomes
a second row of the same display and disappears when its loop ends.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress, TaskID

__all__ = ["ProgressBar", "progress_bar"]


class ProgressBar:
    """The handle a progress bar's ``with`` block gets.

    - ``advance(steps=1)``: that many more units done (calling the handle does the same, so
      ``advance = bar`` reads as a function);
    - ``grow(steps)``: the total is that many units larger (a retry round, a repair);
    - ``completed`` and ``total``: the counts so far (kept also when nothing is drawn).
    """

    def __init__(self, total: int | None, completed: int = 0, progress: Progress | None = None, task: TaskID | None = None) -> None:
        self.total = total
        self.completed = completed
        self._progress = progress
        self._task = task

    @property
    def drawn(self) -> bool:
        """Whether a bar is drawn (False when progress bars are off)."""
        return self._progress is not None

    def advance(self, steps: int = 1) -> None:
        self.completed += steps
        if self._progress is not None:
            self._progress.advance(self._task, steps)  # type: ignore[arg-type]

    __call__ = advance

    def grow(self, steps: int) -> None:
        self.total = (self.total or 0) + steps
        if self._progress is not None:
            self._progress.update(self._task, total=self.total)  # type: ignore[arg-type]


#: the display open now (bars opened inside it become rows of it), with how many bars use it
_open: list[Any] = []
_lock = threading.Lock()


def _columns() -> tuple[Any, ...]:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )


@contextlib.contextmanager
def progress_bar(
    enabled: bool,
    description: str,
    total: int | None,
    *,
    completed: int = 0,
    transient: bool = False,
    console: Console | None = None,
) -> Iterator[ProgressBar]:
    """A progress bar over ``total`` units (``None``: unknown), drawn only when ``enabled``;
    yields a :class:`ProgressBar`. ``completed``: units already done (a resumed loop);
    ``transient``: the bar disappears when the loop ends (else its last state stays on
    screen); ``console``: where to draw (default: a rich console on standard error).

    Plugins call it as :meth:`lvlmva.RunContext.progress_bar`, which passes the run's setting
    for ``enabled``."""
    if not enabled:
        yield ProgressBar(total, completed)
        return
    from rich.progress import Progress

    with _lock:
        outer = _open[-1] if _open and console is None else None
    if outer is not None:  # a loop inside a loop: one more row of the display already open
        task = outer.add_task(description, total=total, completed=completed)
        try:
            yield ProgressBar(total, completed, outer, task)
        finally:
            outer.remove_task(task)
        return
    if console is None:
        from rich.console import Console

        console = Console(stderr=True)
    with Progress(*_columns(), console=console, transient=transient) as progress:
        task = progress.add_task(description, total=total, completed=completed)
        with _lock:
            _open.append(progress)
        try:
            yield ProgressBar(total, completed, progress, task)
        finally:
            with _lock:
                _open.remove(progress)
