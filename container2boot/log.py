"""Progress output and stage timing.

Every slow stage runs inside `stage()`, which prints what is happening (to stderr, so stdout stays usable for
machine-readable output) and records how long it took for the manifest.
"""

import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

logger = logging.getLogger("container2boot")


def setup_logging(verbose: bool) -> None:
    """Progress lines always; the command lines of external tools only with --verbose."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.handlers[:] = [handler]
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    logger.propagate = False


class StageTimer:
    """Collects the duration of each named stage, in the order they ran."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str, what: str) -> Iterator[None]:
        logger.info("==> %s", what)
        start = time.monotonic()
        try:
            yield
        finally:
            elapsed = time.monotonic() - start
            self.seconds[name] = round(self.seconds.get(name, 0.0) + elapsed, 2)
            logger.debug("    %s took %.1f s", name, elapsed)
