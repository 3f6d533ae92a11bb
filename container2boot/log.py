"""Progress output and stage timing.

Every slow stage runs inside `stage()`, which says what is happening (on stderr, so stdout stays usable for
machine-readable output) and records how long it took for the manifest. On a terminal the running stage shows a
live elapsed time, a bar with the bytes done where the stage knows its size, and what it is doing now (the
rootbuilder's current step), and ends with its time; elsewhere (CI logs, pipes) each stage is one plain line with
the time of day it started.
"""

import logging
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console, RenderableType
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.text import Text

logger = logging.getLogger("container2boot")
STAGE_PREFIX = "==> "  # a stage's line: in the rootbuilder's output, the step the host shows it at
DONE_PREFIX = "==> Done: "  # the last line of a build; the host drops the rootbuilder's (it names the container's /out)
TOOL_PREFIX = "  | "  # a long tool's own output line: shown beside the running stage on a terminal, not logged
TOOL_LINES_ENV = "C2BOOT_TOOL_LINES"  # set by a host that shows the rootbuilder's stages live: pass tool lines on


class CurrentStderr(logging.Handler):
    """Writes to whatever sys.stderr is now: during a live stage, rich's proxy, which prints above the display."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
            sys.stderr.flush()
        except Exception:  # logging's own convention: report, never raise
            self.handleError(record)


def setup_logging(verbose: bool, quiet: bool = False) -> None:
    """Progress lines (none with `quiet`: warnings and errors only); the tools' command lines with `verbose`."""
    handler = CurrentStderr()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.handlers[:] = [handler]
    logger.setLevel(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)
    logger.propagate = False


class _WhenSized(ProgressColumn):
    """A column shown only once the stage has said how big its work is (no pulsing bar for the others)."""

    def __init__(self, column: ProgressColumn) -> None:
        super().__init__()
        self.column = column

    def render(self, task: Task) -> RenderableType:
        return self.column.render(task) if task.total else Text("")


class StageProgress:
    """What a running stage tells the terminal: the size of its work, how much is done, what it does now. Off a
    terminal it shows nothing (the plain log has the stage lines)."""

    def __init__(self, progress: Progress | None = None, task: TaskID | None = None) -> None:
        self._progress, self._task = progress, task

    def size(self, total: int) -> None:
        """The bytes the stage will go through (none known: no bar)."""
        if self._progress is not None and self._task is not None and total > 0:
            self._progress.update(self._task, total=total)

    def advance(self, done: int) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.advance(self._task, done)

    @property
    def live(self) -> bool:
        return self._progress is not None

    def now(self, what: str) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, now=what[:NOW_WIDTH])


NOW_WIDTH = 70  # what a stage does now is cut to this, so that the display stays one line
_live_stage: list[StageProgress] = []  # the stage shown live in this process, if any


def tool_line(line: str) -> None:
    """A line of a long tool's output (see run's `follow`): beside the live stage on this terminal, or passed on to
    the host that shows the rootbuilder's stages live; otherwise only in the --verbose log."""
    line = line.strip()
    if not line:
        return
    logger.debug("    | %s", line)
    if _live_stage:
        _live_stage[-1].now(line)
    elif os.environ.get(TOOL_LINES_ENV) and not logger.isEnabledFor(logging.DEBUG):
        sys.stderr.write(f"{TOOL_PREFIX}{line}\n")
        sys.stderr.flush()


class StageTimer:
    """Collects the duration of each named stage, in the order they ran."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._live = False  # a stage is showing its elapsed time: stages inside it print plain lines

    @contextmanager
    def stage(self, name: str, what: str) -> Iterator[StageProgress]:
        start = time.monotonic()
        live = not self._live and sys.stderr.isatty() and logger.isEnabledFor(logging.INFO)
        finished = False
        try:
            if live:
                self._live = True
                console = Console(stderr=True)
                with Progress(SpinnerColumn(), TextColumn("==>", style="bold"),
                              TextColumn("{task.description}", markup=False), _WhenSized(BarColumn(bar_width=24)),
                              _WhenSized(DownloadColumn()), TimeElapsedColumn(),
                              TextColumn("{task.fields[now]}", markup=False, style="dim"), console=console,
                              transient=True, redirect_stderr=True) as progress:
                    shown = StageProgress(progress, progress.add_task(what, total=None, now=""))
                    _live_stage.append(shown)
                    try:
                        yield shown
                    finally:
                        _live_stage.remove(shown)
            else:
                logger.info("%s%s  [%s]", STAGE_PREFIX, what, time.strftime("%H:%M:%S"))
                yield StageProgress()
            finished = True
        finally:
            self._live = self._live and not live
            elapsed = time.monotonic() - start
            self.seconds[name] = round(self.seconds.get(name, 0.0) + elapsed, 2)
            if live and finished:
                logger.info("==> %s (%.1f s)", what, elapsed)
            else:
                logger.debug("    %s took %.1f s", name, elapsed)
