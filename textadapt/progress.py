"""A long stage's progress on the console: a Rich bar (counts, rate, time left) on a terminal, log lines otherwise.

    with stage_progress("generating", logger, console) as progress:
        pipeline.generate(..., progress=progress)      # progress(done, total) as batches complete

On a terminal the bar shows while the stage runs and goes when it ends. Elsewhere (a log file, a
Prefect worker, CI) the progress goes to the logger at every tenth of the way: at DEBUG, and at INFO
(with the time elapsed and an estimate of the time left) once the stage has run for ``LONG`` seconds, so
that a long stage is never silent while a short one stays one line. The stage's summary (what it did,
how long it took) is the caller's one INFO line.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.theme import Theme

LONG = 30.0  # seconds: a stage's progress lines are INFO after this long (a log without a terminal shows them)


class StageProgress:
    """``progress(done, total)``: one stage's progress, drawn as a bar or logged at DEBUG."""

    def __init__(self, label: str, logger: logging.Logger | logging.LoggerAdapter, bar: Progress | None):
        self.label, self.logger, self.bar = label, logger, bar
        self.task = bar.add_task(label, total=None) if bar else None
        self.done, self.total, self._tenth = 0, 0, -1
        self._t0 = time.monotonic()

    def __call__(self, done: int, total: int) -> None:
        self.done, self.total = done, total
        if self.bar is not None:
            self.bar.update(self.task, completed=done, total=total or None)
            return
        tenth = 10 * done // total if total else 10
        if tenth != self._tenth:
            self._tenth = tenth
            elapsed = time.monotonic() - self._t0
            if elapsed < LONG:
                self.logger.debug("%s: %d/%d", self.label, done, total)
            else:
                left = f", about {_duration(elapsed * (total - done) / done)} left" if 0 < done < total else ""
                self.logger.info("%s: %d/%d (%s%s)", self.label, done, total, _duration(elapsed), left)


def _duration(seconds: float) -> str:
    minutes, s = divmod(round(seconds), 60)
    return f"{minutes} min {s:02d} s" if minutes else f"{s} s"


@contextmanager
def stage_progress(
    label: str, logger: logging.Logger | logging.LoggerAdapter, console: Console | None = None
) -> Iterator[StageProgress]:
    """A progress callback for one stage; a bar on ``console`` (default: stderr) if it is a terminal.

    Pass the console the log handler prints with, so log lines show above the bar instead of through it.
    """
    console = console or Console(stderr=True)
    if not console.is_terminal:
        yield StageProgress(label, logger, None)
        return
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("elapsed"),
        TimeElapsedColumn(),
        TextColumn("left"),
        TimeRemainingColumn(),
    )
    console.push_theme(Theme())  # Rich's own styles, the bar's: a log handler's console may have a theme without them
    try:
        with Progress(*columns, console=console, transient=True) as bar:
            yield StageProgress(label, logger, bar)
    finally:
        console.pop_theme()
