"""Outputs appear atomically: everything is written to a staging directory beside (or inside) the output
directory and moved into place at the end, manifest.json last. A failed or interrupted build leaves nothing.

One build owns an output directory at a time (a lock held for the whole build), and a build that runs out of space
says so, naming the filesystem and about how much it needs, whatever the tool that hit the wall printed.
"""

import contextlib
import errno
import fcntl
import hashlib
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from container2boot import lifecycle
from container2boot.errors import C2BootError

MANIFEST = "manifest.json"
STAGING_PREFIX = ".c2boot-partial-"
WORK_PREFIX = STAGING_PREFIX + "work-"  # scratch space of a running build, beside its staging directory
MB = 1000 * 1000
LOW_SPACE = 64 * 1024 * 1024  # after a failure, less free space than this means the disk was full


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
def locked(out: Path) -> Iterator[None]:
    """Hold the lock of output directory `out` (keyed by its real path, in the user's state directory); another
    build that wants it fails at once instead of silently replacing this one's outputs."""
    real = os.path.realpath(out)  # unlike Path.resolve, never fails (a link loop stays as it is)
    path = lifecycle.state_dir() / "locks" / f"{hashlib.sha256(os.fsencode(real)).hexdigest()[:24]}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise C2BootError(f"another c2boot (pid {holder}) is writing to {out}: wait until it is done, or choose "
                              "another --output") from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:  # else its holder removed it between our open and our lock: take the new one
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        os.close(fd)


@contextmanager
def staged_output(out: Path, force: bool) -> Iterator[Path]:
    """Yield an empty staging directory; on success its entries become `out`'s, on any failure it is removed."""
    with locked(out):
        check_output(out, force)
        parent = out if out.is_dir() else out.absolute().parent
        with lifecycle.temporary_directory(STAGING_PREFIX, parent) as staging:
            staging.chmod(0o777 & ~_umask())  # mkdtemp's 0700 would become the output directory's mode
            try:
                yield staging
                publish(staging, out)
            except OSError as e:
                if e.errno == errno.ENOSPC:
                    raise space_error(staging, None) from None
                raise C2BootError(f"writing the outputs to {out} failed: {e.strerror or e}") from e


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


# Space ---------------------------------------------------------------------------------------------------------


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def filesystem_of(path: Path) -> str:
    """What holds `path`, as a user knows it: the mount's source (a device, tmpfs, ...) from mountinfo."""
    real = str(path.absolute().resolve())
    best, source = "", "the filesystem"
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return source
    for line in lines:
        fields, _, tail = line.partition(" - ")
        mount_point = fields.split()[4].replace("\\040", " ") if len(fields.split()) > 4 else ""
        inside = real == mount_point or real.startswith(mount_point.rstrip("/") + "/")
        if inside and len(mount_point) >= len(best) and len(tail.split()) > 1:
            best, source = mount_point, tail.split()[1]
    return source


def space_error(path: Path, need_bytes: int | None) -> C2BootError:
    """'no space left on DEVICE (PATH), need about N MB': the one message for a full disk, whoever hit it."""
    need = f", need about {need_bytes / MB:.0f} MB" if need_bytes else ""
    try:
        free = f" ({free_bytes(path) / MB:.0f} MB free)"
    except OSError:
        free = ""
    shown = path.parent if path.name.startswith(STAGING_PREFIX) else path  # the user's directory, not ours
    return C2BootError(f"no space left on {filesystem_of(path)} ({shown}){need}{free}: free some space or "
                       "choose another --output")


def check_space(path: Path, need_bytes: int) -> None:
    """Before the slow steps: refuse when the outputs clearly cannot fit."""
    if free_bytes(path) < need_bytes:
        raise space_error(path, need_bytes)


@contextmanager
def space_explained(path: Path, need_bytes: int | None) -> Iterator[None]:
    """A tool that fails on a full disk often says only "I/O error": when the filesystem of `path` is (nearly)
    full after a failure, say that instead."""
    try:
        yield
    except (C2BootError, OSError) as e:
        full = isinstance(e, OSError) and e.errno == errno.ENOSPC
        with contextlib.suppress(OSError):
            full = full or free_bytes(path) < LOW_SPACE
        if full:
            raise space_error(path, need_bytes) from None
        raise
