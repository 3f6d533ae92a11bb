"""Progress output and stage timing.

Every slow stage runs inside `stage()`, which says what is happening (on stderr, so stdout stays usable for
machine-readable output) and records how long it took for the manifest. On a terminal the running stage shows a
live elapsed time and ends with its time; elsewhere (CI logs, pipes) each stage is one plain line with the time of
day it started.
"""

import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

logger = logging.getLogger("container2boot")
DONE_PREFIX = "==> Done: "  # the last line of a build; the host drops the rootbuilder's (it names the container's /out)


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


class StageTimer:
    """Collects the duration of each named stage, in the order they ran."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._live = False  # a stage is showing its elapsed time: stages inside it print plain lines

    @contextmanager
    def stage(self, name: str, what: str) -> Iterator[None]:
        start = time.monotonic()
        live = not self._live and sys.stderr.isatty() and logger.isEnabledFor(logging.INFO)
        finished = False
        try:
            if live:
                self._live = True
                console = Console(stderr=True)
                with Progress(SpinnerColumn(), TextColumn("[bold]==>[/bold] {task.description}"), TimeElapsedColumn(),
                              console=console, transient=True, redirect_stderr=True) as progress:
                    progress.add_task(what, total=None)
                    yield
            else:
                logger.info("==> %s  [%s]", what, time.strftime("%H:%M:%S"))
                yield
            finished = True
        finally:
            self._live = self._live and not live
            elapsed = time.monotonic() - start
            self.seconds[name] = round(self.seconds.get(name, 0.0) + elapsed, 2)
            if live and finished:
                logger.info("==> %s (%.1f s)", what, elapsed)
            else:
                logger.debug("    %s took %.1f s", name, elapsed)
