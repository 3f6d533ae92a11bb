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
import posixpath
import shutil
import stat
from pathlib import Path

from container2boot import __version__, lifecycle
from container2boot.initrd import SANDBOX_SCRIPT, ZSTD, InitrdJob, dracut_command
from container2boot.log import logger
from container2boot.manifest import sha256
from container2boot.run import tool_version_line
from container2boot.tree import Entry, resolve_links

INPUTS = "inputs.json"
INITRD = "initrd.img"
DRACUT_OWN = ("etc/dracut.conf", "etc/dracut.conf.d", "usr/lib/dracut")  # their content is in the recipe
ALWAYS_LISTED = ("etc/modprobe.d", "etc/cmdline.d", "usr/lib/modprobe.d")  # read whole by dracut, maybe empty now
# What dracut runs to make the initrd (compressors, cpio, depmod, ldconfig) and the early microcode it prepends,
# which its staging tree does not show: their content is in the recipe.
DRACUT_TOOLS = ("usr/bin/zstd", "usr/bin/xz", "usr/bin/gzip", "usr/bin/pigz", "usr/bin/lz4", "usr/bin/cpio",
                "usr/bin/kmod", "usr/sbin/depmod", "usr/sbin/ldconfig", "sbin/ldconfig",
                "usr/lib/firmware/intel-ucode", "usr/lib/firmware/amd-ucode")
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


def listing_digest(path: Path | None) -> str:
    """A directory's names (a new file in it may be taken by dracut); "absent" if it is not a directory."""
    if path is None or not path.is_dir():
        return "absent"
    return "dir:" + hashlib.sha256("\0".join(sorted(os.listdir(path))).encode()).hexdigest()


def file_digest(job: InitrdJob, path: str) -> str:
    """What decides a copied file's part in the initrd, as dracut-install copies it: the link the path itself is
    (if it is one), and the mode, owner, time and content of the file it leads to; "absent" if missing."""
    directory = source_of(job, posixpath.dirname(path))
    target = source_of(job, path)
    if directory is None or target is None:
        return "absent"
    own = directory / posixpath.basename(path)
    link = os.readlink(own) if own.is_symlink() else ""
    status = target.stat()
    body = sha256(target) if stat.S_ISREG(status.st_mode) else "dir" if stat.S_ISDIR(status.st_mode) else "other"
    return f"{link}\0{status.st_mode:o} {status.st_uid}:{status.st_gid} {int(status.st_mtime)}\0{body}"


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
            digest.update(f"{top}/{relative}\0{link}\0{path.lstat().st_mode:o}\0{body}\n".encode())
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
                       "sandbox": SANDBOX_SCRIPT, "kernel": job.kernel_version, "epoch": epoch,
                       "modules": listing.hexdigest(), "dracut files": tree_digest(job.dracut_root, DRACUT_OWN),
                       "tools": tree_digest(job.dracut_root, DRACUT_TOOLS),
                       "zstd": tool_version_line(ZSTD[0]) if job.zstd else None}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def source_of(job: InitrdJob, path: str) -> Path | None:
    """Where the initrd's `path` came from: the kernel modules' tree for the modules, else the dracut tree."""
    for prefix in (f"usr/lib/modules/{job.kernel_version}/", f"lib/modules/{job.kernel_version}/"):
        if job.kernel_modules is not None and f"{path}/".startswith(prefix):
            return inside(job.kernel_modules, path[len(prefix):])
    return inside(job.dracut_root, path)


def ancestors(path: str) -> list[str]:
    """"a/b/c" -> ["a/b", "a", ""]."""
    found = []
    while path:
        path = posixpath.dirname(path)
        found.append(path)
    return found


def fingerprint(job: InitrdJob, initrd_paths: list[str]) -> dict[str, str]:
    """What dracut took from the image (see the module's docstring), as path -> digest."""
    recorded: dict[str, str] = {}
    directories: set[str] = set(ALWAYS_LISTED)
    for path in initrd_paths:
        source = source_of(job, path)
        if source is None or source.is_dir():
            continue  # made by dracut (or a directory: what it holds is listed below)
        recorded[path] = file_digest(job, path)
        directories.update(ancestors(path))
    for directory in directories:
        recorded[f"{directory}/"] = listing_digest(source_of(job, directory))
    return recorded


def still_the_same(job: InitrdJob, recorded: dict[str, str]) -> bool:
    return all((listing_digest(source_of(job, path[:-1])) if path.endswith("/") else file_digest(job, path))
               == digest for path, digest in recorded.items())


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
            target = self.directory / key / entry_id
            if target.exists():  # made again (--no-cache): the new one replaces it
                shutil.rmtree(target, ignore_errors=True)
            with contextlib.suppress(OSError):  # the same entry stored by a concurrent build meanwhile
                partial.rename(target)
                partial.mkdir()
        for stale in sorted((self.directory / key).glob("[0-9a-f]*"), key=lambda p: p.stat().st_mtime)[:-KEEP]:
            shutil.rmtree(stale, ignore_errors=True)
