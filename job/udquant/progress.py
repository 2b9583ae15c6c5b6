"""Live progress for long stages: a bar when the stage reports steps, a live line otherwise.

Off when stderr is not a terminal or UDQUANT_NO_PROGRESS is set; logging still says
when each stage starts and ends.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn


def progress_enabled() -> bool:
    return sys.stderr.isatty() and not os.environ.get("UDQUANT_NO_PROGRESS")


class StageProgress:
    """What a running stage reports: a step count and/or its latest output line."""

    def __init__(self, progress: Progress | None, stage: str) -> None:
        self._progress = progress
        self._task = progress.add_task(stage, total=None, line="") if progress else None

    def step(self, done: int, total: int) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, completed=done, total=total)

    def line(self, text: str) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, line=text.strip()[:60])


@contextmanager
def stage_progress(stage: str) -> Iterator[StageProgress]:
    if not progress_enabled():
        yield StageProgress(None, stage)
        return
    columns = (TextColumn("[bold]{task.description:<9}"), BarColumn(), TimeElapsedColumn(),
               TextColumn("{task.fields[line]}", style="dim"))
    with Progress(*columns, console=Console(stderr=True), transient=True) as progress:
        yield StageProgress(progress, stage)
