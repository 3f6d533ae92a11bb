"""The build cache: finished outputs, keyed by everything that decides them, so that building the same image with the
same settings again copies them (verified by their sha256 first) instead of making them again.

Entries live under the user's cache directory ($XDG_CACHE_HOME/container2boot/outputs/KEY/, mode 0700: an entry
may hold a password's hash). Each is written to a temporary directory and renamed into place, so that a killed
build never leaves half an entry; a lock file is held shared while an entry is read or written and exclusively
while entries are evicted, so that concurrent builds share the cache safely. Least recently used entries go first
when the cache outgrows its limit (--cache-size), or would leave less than a tenth of its file system free.
"""

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from container2boot import __version__, lifecycle
from container2boot.log import logger
from container2boot.manifest import sha256
from container2boot.output import MANIFEST
from container2boot.run import run

ENTRY = "entry.json"  # what the entry is and the sha256 of every file in it
LAST_USED = "last-used"  # its modification time is when the entry was last stored or used
LEFTOVER_SECONDS = 3600  # a half-written entry this old belongs to a killed build, not to one storing now
KEEP_FREE = 0.10  # the share of its file system the cache always leaves free: builds need the room more


@dataclass(frozen=True)
class Entry:
    """One cached set of outputs."""

    key: str
    path: Path
    image: str
    settings: str
    size: int
    last_used: float


def default_directory() -> Path:
    """$XDG_CACHE_HOME/container2boot, else ~/.cache/container2boot."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "container2boot"


def output_key(parts: Mapping[str, Any], inputs: Sequence[Path]) -> str:
    """The key of a build's outputs: `parts` (the image's id, the rootbuilder's, the settings...) and the content of
    the files the settings name (keys, password, cloud-init user-data), with this container2boot's version."""
    files = {str(path): sha256(path) if path.is_file() else None for path in inputs}
    text = json.dumps({"container2boot": __version__, **parts, "files": files}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def disk_bytes(path: Path) -> int:
    """Space a tree takes on disk (sparse disk images count what they hold, not their length)."""
    return sum(p.lstat().st_blocks * 512 for p in path.rglob("*")) + path.lstat().st_blocks * 512


def copy_tree(source: Path, destination: Path) -> None:
    """Copy `source`'s entries into the directory `destination`: holes kept, a reflink where the filesystem can."""
    run(["cp", "-a", "--sparse=always", "--reflink=auto", "--no-target-directory", source, destination])


def recorded_digests(outputs: Path) -> dict[str, str]:
    """The sha256 of every output file: from the manifest, which has them all but itself (no second reading)."""
    manifest = json.loads((outputs / MANIFEST).read_text())
    return {**{a["path"]: a["sha256"] for a in manifest["artifacts"]}, MANIFEST: sha256(outputs / MANIFEST)}


class Cache:
    """The outputs cache in `directory`, at most `limit` bytes."""

    def __init__(self, directory: Path, limit: int) -> None:
        self.directory = directory
        self.entries_directory = directory / "outputs"
        self.limit = limit

    @contextmanager
    def _locked(self, exclusive: bool) -> Iterator[None]:
        self.entries_directory.mkdir(parents=True, exist_ok=True)
        self.directory.chmod(0o700)
        with open(self.directory / "lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield

    def restore(self, key: str, staging: Path) -> bool:
        """Copy the outputs stored under `key` into the empty directory `staging`, if they are there and intact. A
        corrupt entry (a file changed, missing or added) is removed and the build goes on as a miss."""
        entry = self.entries_directory / key
        with self._locked(exclusive=False):
            if not (entry / ENTRY).is_file():
                return False
            problem = self._problem(entry)
            if problem is not None:
                logger.warning("    warning: the cached outputs %s are damaged (%s): building them again",
                               key[:12], problem)
                self._remove(entry)
                return False
            copy_tree(entry / "outputs", staging)
            with contextlib.suppress(OSError):  # the outputs are there: a read-only cache only loses its order
                (entry / LAST_USED).touch()
        return True

    def store(self, key: str, outputs: Path, image: str, settings: str) -> None:
        """Keep a copy of the finished `outputs` under `key`, in place of any entry stored there before (--no-cache
        builds refresh it); then evict the least recently used entries beyond the limit."""
        self.entries_directory.mkdir(parents=True, exist_ok=True)
        with lifecycle.temporary_directory(".c2boot-partial-", self.entries_directory) as partial:
            with self._locked(exclusive=False):  # written beside the entries, while others read theirs
                copy_tree(outputs, partial / "outputs")
                files = recorded_digests(partial / "outputs")
                (partial / ENTRY).write_text(json.dumps({"key": key, "image": image, "settings": settings,
                                                         "stored": time.time(), "files": files}, indent=2) + "\n")
                (partial / LAST_USED).touch()
            with self._locked(exclusive=True):  # swapped in while nobody reads the old one
                if (self.entries_directory / key).exists():
                    self._remove(self.entries_directory / key)
                partial.rename(self.entries_directory / key)
                partial.mkdir()  # for temporary_directory's cleanup
        self.prune(limit=self.room())

    def room(self) -> int:
        """The bytes the cache may hold now: --cache-size, but never so much that its file system keeps less than
        KEEP_FREE of its size free (the next build, or anything else, would fail for want of space)."""
        disk = os.statvfs(self.entries_directory)
        held = sum(entry.size for entry in self.entries())
        spare = disk.f_bavail * disk.f_frsize - int(disk.f_blocks * disk.f_frsize * KEEP_FREE)
        return max(0, min(self.limit, held + spare))

    def _problem(self, entry: Path) -> str | None:
        """What is wrong with the stored files, or None."""
        try:
            recorded: dict[str, str] = json.loads((entry / ENTRY).read_text())["files"]
        except (OSError, ValueError, KeyError) as e:
            return f"unreadable {ENTRY}: {e}"
        outputs = entry / "outputs"
        present = {str(p.relative_to(outputs)) for p in outputs.rglob("*") if p.is_file()}
        if present != set(recorded):
            return f"files differ: {sorted(present ^ set(recorded))[:3]}"
        for name, digest in recorded.items():
            if sha256(outputs / name) != digest:
                return f"{name} changed"
        return None

    def _remove(self, entry: Path) -> None:
        """Out of the way at once (a rename), then deleted."""
        trash = Path(tempfile.mkdtemp(prefix=".c2boot-removed-", dir=self.entries_directory))
        with contextlib.suppress(FileNotFoundError):
            entry.rename(trash / "entry")
        shutil.rmtree(trash, ignore_errors=True)

    def entries(self) -> list[Entry]:
        """The stored entries, most recently used first."""
        found = []
        if not self.entries_directory.is_dir():
            return []
        for path in self.entries_directory.iterdir():
            with contextlib.suppress(OSError, ValueError, KeyError):
                record = json.loads((path / ENTRY).read_text())
                found.append(Entry(path.name, path, record["image"], record["settings"], disk_bytes(path),
                                   (path / LAST_USED).stat().st_mtime))
        return sorted(found, key=lambda e: e.last_used, reverse=True)

    def prune(self, *, limit: int | None = None, unused_for: float | None = None,
              everything: bool = False) -> list[Entry]:
        """Remove every entry (and the kept initrds), or those unused for `unused_for` seconds, then the least
        recently used ones until the rest fit in `limit` bytes; also what killed builds left half written. Returns
        the removed entries."""
        removed = []
        now = time.time()
        with self._locked(exclusive=True):
            for initrd in self.directory.glob("initrd/*/[0-9a-f]*"):  # kept by initrdcache, a few per recipe
                with contextlib.suppress(OSError):
                    if everything or (unused_for is not None and now - initrd.stat().st_mtime > unused_for):
                        shutil.rmtree(initrd, ignore_errors=True)
            for leftover in self.entries_directory.glob(".c2boot-*"):  # killed while storing, not storing now
                with contextlib.suppress(OSError):
                    if now - leftover.stat().st_mtime > LEFTOVER_SECONDS:
                        shutil.rmtree(leftover, ignore_errors=True)
            total = 0
            for entry in self.entries():
                total += entry.size
                if everything or (unused_for is not None and now - entry.last_used > unused_for) or \
                        (limit is not None and total > limit):
                    self._remove(entry.path)
                    removed.append(entry)
                    total -= entry.size
        return removed
