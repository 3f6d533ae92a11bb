"""Outputs appear atomically: everything is written to a staging directory beside (or inside) the output
directory and moved into place at the end, manifest.json last. A failed or interrupted build leaves nothing."""

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from container2boot.errors import C2BootError

MANIFEST = "manifest.json"
STAGING_PREFIX = ".c2boot-partial-"
WORK_PREFIX = STAGING_PREFIX + "work-"  # scratch space of a running build, beside its staging directory


def _entries(directory: Path) -> list[str]:
    return [name for name in os.listdir(directory) if not name.startswith(STAGING_PREFIX)]


def check_output(out: Path, force: bool) -> None:
    """Fail before any work when the outputs could not be written or would clobber something."""
    if out.exists():
        if not out.is_dir():
            raise C2BootError(f"output {out} exists and is not a directory: choose another --output")
        if _entries(out) and not force:
            raise C2BootError(f"output directory {out} is not empty: pass --force to replace its outputs, "
                              "or choose another --output")
        writable = out
    else:
        writable = out.absolute().parent
        if not writable.is_dir():
            raise C2BootError(f"cannot create {out}: {writable} does not exist")
    if not os.access(writable, os.W_OK | os.X_OK):
        raise C2BootError(f"cannot write to {writable}: choose a writable --output directory")


@contextmanager
def staged_output(out: Path, force: bool) -> Iterator[Path]:
    """Yield an empty staging directory; on success its entries become `out`'s, on any failure it is removed."""
    check_output(out, force)
    parent = out if out.is_dir() else out.absolute().parent
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=parent))
    staging.chmod(0o777 & ~_umask())  # mkdtemp's 0700 would become the output directory's mode
    try:
        yield staging
        publish(staging, out)
    except OSError as e:
        raise C2BootError(_os_error_message(e, out)) from e
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def publish(staging: Path, out: Path) -> None:
    """Move the staged outputs into `out`: one rename if `out` is new, else entry by entry, manifest last."""
    if not out.exists():
        staging.rename(out)
        staging.mkdir()  # so that the caller's cleanup finds what it expects
        return
    for name in sorted(os.listdir(staging), key=lambda n: n == MANIFEST):
        target = out / name
        if target.exists() or target.is_symlink():
            old = out / f"{STAGING_PREFIX}old-{name}"
            target.rename(old)
            (staging / name).rename(target)
            shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()
        else:
            (staging / name).rename(target)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _os_error_message(error: OSError, out: Path) -> str:
    if error.errno == 28:  # ENOSPC
        return f"no space left on the device of {out}: free some space or choose another --output"
    return f"writing the outputs to {out} failed: {error.strerror or error}"
