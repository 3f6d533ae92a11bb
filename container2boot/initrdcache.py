"""The initrd cache: an initrd is made again only when what it is made of changed, so a new web page in an image
does not cost a dracut run.

An initrd is filed under its recipe: the dracut command line, the kernel version, dracut's version and its own
files (configuration and modules), the kernel modules' listing, the source date and container2boot's version.
Beside it is recorded what dracut took from the image: every path in the initrd with the content of the image's
file there (a sha256, or a link's target), and the listing of each directory it took files from, so that a file
dracut would now pick up (a new binary, a new modprobe.d file) also counts. A later build with the same recipe
re-reads exactly those and reuses the initrd only when all are the same.
"""

import contextlib
import hashlib
import json
import os
import shutil
import stat
from pathlib import Path

from container2boot import __version__, lifecycle
from container2boot.initrd import InitrdJob, dracut_command
from container2boot.log import logger
from container2boot.manifest import sha256
from container2boot.tree import Entry, resolve_links

INPUTS = "inputs.json"
INITRD = "initrd.img"
DRACUT_OWN = ("etc/dracut.conf", "etc/dracut.conf.d", "usr/lib/dracut")  # their content is in the recipe
ALWAYS_LISTED = ("etc/modprobe.d", "etc/cmdline.d", "usr/lib/modprobe.d")  # read whole by dracut, maybe empty now
KEEP = 3  # initrds kept per recipe (images that differ in what dracut takes), the most recently used


def inside(root: Path, path: str) -> Path | None:
    """`path` of the directory tree `root` with its links resolved inside the tree; None when it does not exist."""
    def lookup(relative: str) -> Entry | None:
        try:
            mode = os.lstat(root / relative).st_mode
        except OSError:
            return None
        return Entry("link", 0, os.readlink(root / relative)) if stat.S_ISLNK(mode) else Entry("file", 0)

    resolved = resolve_links(path, lookup)
    return None if resolved is None else root / resolved


def content_digest(path: Path | None) -> str:
    """What decides a file's part in the initrd: its content, or a directory's listing; "absent" if missing."""
    if path is None:
        return "absent"
    if path.is_dir():
        return "dir:" + hashlib.sha256("\0".join(sorted(os.listdir(path))).encode()).hexdigest()
    if path.is_file():
        return sha256(path)
    return "other"


def tree_digest(root: Path, paths: tuple[str, ...]) -> str:
    """Every file under `paths` of `root`, by name and content (dracut's own configuration and modules)."""
    digest = hashlib.sha256()
    for top in paths:
        start = inside(root, top)
        if start is None:
            continue
        walked = [start] if start.is_file() else sorted(p for p in start.rglob("*"))
        for path in walked:
            relative = str(path.relative_to(start))
            link = os.readlink(path) if path.is_symlink() else ""
            body = sha256(path) if path.is_file() and not path.is_symlink() else ""
            digest.update(f"{top}/{relative}\0{link}\0{body}\n".encode())
    return digest.hexdigest()


def modules_directory(job: InitrdJob) -> Path | None:
    return job.kernel_modules or inside(job.dracut_root, f"usr/lib/modules/{job.kernel_version}")


def recipe(job: InitrdJob, epoch: int) -> str:
    """The key of everything but the image's files: the initrds made the same way from different images."""
    modules = modules_directory(job)
    listing = hashlib.sha256()
    if modules is not None:
        for path in sorted(modules.rglob("*")):
            listing.update(f"{path.relative_to(modules)}\0{path.lstat().st_size}\n".encode())
    text = json.dumps({"container2boot": __version__, "dracut": dracut_command(job), "version": job.dracut_version,
                       "kernel": job.kernel_version, "epoch": epoch, "modules": listing.hexdigest(),
                       "dracut files": tree_digest(job.dracut_root, DRACUT_OWN)}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def source_of(job: InitrdJob, path: str) -> Path | None:
    """Where the initrd's `path` came from: the kernel modules' tree for the modules, else the dracut tree."""
    for prefix in (f"usr/lib/modules/{job.kernel_version}/", f"lib/modules/{job.kernel_version}/"):
        if job.kernel_modules is not None and path.startswith(prefix):
            return inside(job.kernel_modules, path.removeprefix(prefix))
    return inside(job.dracut_root, path)


def fingerprint(job: InitrdJob, initrd_paths: list[str]) -> dict[str, str]:
    """What dracut took from the image (see the module's docstring), as path -> digest."""
    recorded: dict[str, str] = {}
    directories: set[str] = set(ALWAYS_LISTED)
    for path in initrd_paths:
        source = source_of(job, path)
        if source is None or source.is_dir():
            continue  # made by dracut (or a directory: its files are listed one by one)
        recorded[path] = content_digest(source)
        directories.add(os.path.dirname(path))
    for directory in directories:
        recorded[f"{directory}/"] = content_digest(source_of(job, directory))
    return recorded


def still_the_same(job: InitrdJob, recorded: dict[str, str]) -> bool:
    return all(content_digest(source_of(job, path.rstrip("/"))) == digest for path, digest in recorded.items())


class InitrdCache:
    """Initrds under `directory`/initrd/RECIPE/ENTRY/, each beside the inputs it was made of."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory / "initrd"

    def restore(self, job: InitrdJob, key: str, dest: Path) -> bool:
        """Copy an initrd of this recipe whose inputs are all unchanged to `dest`; a damaged one is removed."""
        for entry in sorted((self.directory / key).glob("[0-9a-f]*")):
            with contextlib.suppress(OSError, ValueError, KeyError):
                record = json.loads((entry / INPUTS).read_text())
                if not still_the_same(job, record["inputs"]):
                    continue
                if sha256(entry / INITRD) != record["sha256"]:
                    logger.warning("    warning: the cached initrd %s is damaged: making it again", entry.name[:12])
                    shutil.rmtree(entry, ignore_errors=True)
                    continue
                shutil.copyfile(entry / INITRD, dest)
                os.utime(entry)
                return True
        return False

    def store(self, job: InitrdJob, key: str, initrd: Path, initrd_paths: list[str]) -> None:
        """File `initrd` under its recipe with what it was made of (written aside, then renamed into place)."""
        inputs = fingerprint(job, initrd_paths)
        entry_id = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()
        (self.directory / key).mkdir(parents=True, exist_ok=True)
        with lifecycle.temporary_directory(".c2boot-partial-", self.directory / key) as partial:
            shutil.copyfile(initrd, partial / INITRD)
            (partial / INPUTS).write_text(json.dumps({"sha256": sha256(initrd), "inputs": inputs}) + "\n")
            with contextlib.suppress(OSError):  # the same entry stored by a concurrent build
                partial.rename(self.directory / key / entry_id)
                partial.mkdir()
        for stale in sorted((self.directory / key).glob("[0-9a-f]*"), key=lambda p: p.stat().st_mtime)[:-KEEP]:
            shutil.rmtree(stale, ignore_errors=True)
