"""A root filesystem's paths, read from a directory or in one pass over a tar stream (`podman export`), so that
an image can be inspected without unpacking, mounting or building anything.

Symbolic links are followed inside the tree (an absolute target means the tree's root, never the host's), so
merged-/usr images (/lib -> usr/lib) and /etc/os-release -> ../usr/lib/os-release read as they would booted.
"""

import os
import posixpath
import re
import stat
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

MAX_LINK_HOPS = 40
HEADER_BYTES = 64  # enough of an ELF header for its machine field
# Small files whose contents inspection reads; everything else is known by name, type and size only.
CONTENT_FILES = frozenset({
    "etc/os-release", "usr/lib/os-release", "usr/lib/dracut/dracut-version.sh", "etc/selinux/config",
    "etc/passwd", "etc/group", "etc/cloud/cloud.cfg",
})
CLOUD_CONFIG_DROPIN = re.compile(r"etc/cloud/cloud\.cfg\.d/[^/]+\.cfg")  # cloud-init's datasource_list may be here
DPKG_STATUS = "var/lib/dpkg/status"  # the systemd version when no library name tells it; large on big images
HEADER_DIRS = ("usr/bin/", "bin/", "usr/lib/systemd/")  # the init and shell, for the architecture
KERNEL_IMAGE = re.compile(r"boot/vmlinuz-[^/]+|(usr/)?lib/modules/[^/]+/vmlinuz")
KERNEL_HEADER_BYTES = 0x210  # through the x86 boot protocol's "HdrS" magic


@dataclass(frozen=True)
class Entry:
    kind: str  # "file", "dir", "link" or "other"
    size: int
    target: str = ""  # a link's target


class Tree:
    """Paths (relative, no leading slash) of a root filesystem, with the contents of CONTENT_FILES and the first
    bytes of binaries at hand."""

    def __init__(self, entries: dict[str, Entry], contents: dict[str, bytes], directory: Path | None = None):
        self.entries = entries
        self.contents = contents
        self.directory = directory  # set when the tree is a real directory: real paths exist for its files
        self._children: dict[str, list[str]] = {}
        for path in entries:
            parent, _, name = path.rpartition("/")
            self._children.setdefault(parent, []).append(name)

    @classmethod
    def from_directory(cls, root: Path) -> "Tree":
        entries: dict[str, Entry] = {}
        contents: dict[str, bytes] = {}
        for directory, dirs, files in os.walk(root):
            for name in dirs + files:
                full = os.path.join(directory, name)
                path = os.path.relpath(full, root)
                st = os.lstat(full)
                entry = _entry(st.st_mode, st.st_size, os.readlink(full) if os.path.islink(full) else "")
                entries[path] = entry
                if entry.kind == "file" and (wanted := _wanted_bytes(path)):
                    try:
                        with open(full, "rb") as f:
                            contents[path] = f.read(wanted)
                    except OSError:  # unreadable to this user: known by name only
                        pass
        return cls(entries, contents, root)

    @classmethod
    def from_tar(cls, stream: IO[bytes]) -> "Tree":
        """One sequential pass over a tar stream (it is never seeked, so a pipe or an HTTP body will do)."""
        entries: dict[str, Entry] = {}
        contents: dict[str, bytes] = {}
        with tarfile.open(fileobj=stream, mode="r|*") as tar:
            for member in tar:
                path = posixpath.normpath(member.name.lstrip("/")).removeprefix("./")
                if path in (".", ""):
                    continue
                if member.islnk():  # a hard link: the same file as an earlier member
                    original = entries.get(posixpath.normpath(member.linkname.lstrip("/")).removeprefix("./"))
                    entries[path] = original or Entry("file", 0)
                    continue
                kind = "file" if member.isreg() else "dir" if member.isdir() else "link" if member.issym() else "other"
                entries[path] = Entry(kind, member.size if kind == "file" else 0, member.linkname)
                if kind == "file" and (wanted := _wanted_bytes(path)):
                    extracted = tar.extractfile(member)
                    if extracted is not None:
                        contents[path] = extracted.read(wanted)
        return cls(entries, contents)

    def resolve(self, path: str) -> str | None:
        """The path with every symbolic link in it followed inside the tree; None when it does not exist."""
        return resolve_links(path, self.entries.get)

    def entry(self, path: str) -> Entry | None:
        resolved = self.resolve(path)
        if resolved is None:
            return None
        return self.entries.get(resolved, Entry("dir", 0) if resolved == "" else None)

    def is_file(self, path: str) -> bool:
        entry = self.entry(path)
        return entry is not None and entry.kind == "file"

    def is_dir(self, path: str) -> bool:
        entry = self.entry(path)
        return entry is not None and entry.kind == "dir"

    def listdir(self, path: str) -> list[str]:
        resolved = self.resolve(path)
        return sorted(self._children.get(resolved, [])) if resolved is not None and self.is_dir(path) else []

    def read(self, path: str) -> bytes | None:
        """The captured contents (or first bytes) of a file, following links."""
        resolved = self.resolve(path)
        return None if resolved is None else self.contents.get(resolved)

    def read_text(self, path: str) -> str | None:
        data = self.read(path)
        return None if data is None else data.decode(errors="replace")

    def size_bytes(self) -> int:
        return sum(e.size for e in self.entries.values() if e.kind == "file")

    def real_path(self, path: str) -> Path:
        """Where a file of a directory tree is on disk (links resolved inside the tree)."""
        assert self.directory is not None, "only a directory tree has real paths"
        return self.directory / (self.resolve(path) or path)


def resolve_links(path: str, lookup: Callable[[str], Entry | None]) -> str | None:
    """`path` with every symbolic link in it followed inside a tree whose entries `lookup` gives (an absolute link
    points into the tree, as it does in the booted system); None when it does not exist."""
    parts = [p for p in path.strip("/").split("/") if p not in ("", ".")]
    resolved: list[str] = []
    hops = 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        entry = lookup("/".join([*resolved, part]))
        if entry is None:
            return None
        if entry.kind == "link":
            hops += 1
            if hops > MAX_LINK_HOPS:
                return None
            if entry.target.startswith("/"):
                resolved = []
            parts = [p for p in entry.target.split("/") if p not in ("", ".")] + parts
            continue
        resolved.append(part)
    return "/".join(resolved)


def _entry(mode: int, size: int, target: str) -> Entry:
    if stat.S_ISLNK(mode):
        return Entry("link", 0, target)
    if stat.S_ISDIR(mode):
        return Entry("dir", 0)
    return Entry("file", size) if stat.S_ISREG(mode) else Entry("other", 0)


def _wanted_bytes(path: str) -> int:
    """How much of a file to keep: all of the small config files, the header of binaries and kernels, nothing
    else."""
    if path in CONTENT_FILES or CLOUD_CONFIG_DROPIN.fullmatch(path):
        return 1024 * 1024
    if path == DPKG_STATUS:
        return 64 * 1024 * 1024
    if path.startswith(HEADER_DIRS):
        return HEADER_BYTES
    if KERNEL_IMAGE.fullmatch(path):
        return KERNEL_HEADER_BYTES
    return 0
