"""An image's layers made one tar of its root filesystem, as podman would have unpacked them, without unpacking
anything: the rest of the pipeline takes a tar (as from `podman export`) and packs the root image from it, so
owners, modes, xattrs and hardlinks survive even where nothing may be chowned (a non-root pod).

The OCI rules (image-spec, layer.md): a later layer's entry replaces an earlier one's at the same path (a directory
over a directory only takes its metadata); `.wh.NAME` removes NAME and what is under it; `.wh..wh..opq` in a
directory hides what lower layers had in it. Two passes over the layers: the first reads only the headers and
decides what the root holds, the second writes those entries in order with their contents. A hardlink whose
target a later layer removed or replaced still holds the target's old contents (as unpacking would leave it): the
first such link gets them, copied aside when the second pass passes them."""

import gzip
import shutil
import tarfile
import tempfile
import zlib
from collections.abc import Generator, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from container2boot.errors import C2BootError

WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
GZIP_MAGIC = b"\x1f\x8b"
PAX_NAMES = ("path", "linkpath", "size", "hdrcharset")  # what tarfile writes from the header itself
DROPPED_PAX = (
    "GNU.sparse.",  # a sparse file's map: tarfile hands over its contents whole
    # overlayfs' own bookkeeping, which a layer pushed from rootless overlay storage carries; podman drops it too
    "SCHILY.xattr.user.overlay.", "SCHILY.xattr.trusted.overlay.",
)


@dataclass(eq=False)
class Entry:
    """One path of the merged root: the header that wins, where its contents are (layer, position in it), and for a
    hardlink the entry (a file, a symlink, a device...) whose inode it shares."""

    info: tarfile.TarInfo
    at: tuple[int, int]
    shares: "Entry | None" = None


@dataclass
class Root:
    """The root filesystem the layers make so far: paths in the order they appeared, and each directory's children,
    also of a directory no layer lists but its children imply (so a whiteout of a directory removes its tree without
    a scan)."""

    entries: dict[str, Entry] = field(default_factory=dict)
    children: dict[str, set[str]] = field(default_factory=dict)

    def add(self, path: str, entry: Entry) -> None:
        old = self.entries.get(path)
        if old is not None and old.info.isdir() and entry.info.isdir():
            self.entries[path] = entry  # in place: its children stay, and stay after it
            return
        if old is not None:  # (a directory only implied by its children so far keeps them)
            self.remove(path)
        self.entries[path] = entry
        while path:  # known to its parent, and each ancestor to its own
            siblings = self.children.setdefault(parent(path), set())
            if path in siblings:
                break
            siblings.add(path)
            path = parent(path)

    def remove(self, path: str) -> None:
        for child in self.children.pop(path, set()):
            self.remove(child)
        self.entries.pop(path, None)
        self.children.get(parent(path), set()).discard(path)

    def whiteout(self, path: str, layer: int) -> None:
        """`.wh.NAME`: NAME and its tree go, as lower layers made them (a whiteout never hides its own layer)."""
        entry = self.entries.get(path)
        if entry is None or entry.at[0] < layer:
            self.remove(path)

    def hide_lower(self, directory: str, layer: int) -> None:
        """An opaque directory: what layers below `layer` put in it goes (this layer's own entries stay, and so do
        the directories that lead to them, as directories only implied)."""
        for child in list(self.children.get(directory, ())):
            entry = self.entries.get(child)
            if entry is not None and entry.at[0] == layer and not entry.info.isdir():
                continue
            if entry is None or entry.info.isdir():
                self.hide_lower(child, layer)
                if entry is None or entry.at[0] == layer:
                    continue
                if self.children.get(child):
                    del self.entries[child]  # a lower directory, still holding this layer's entries
                    continue
            self.remove(child)


def parent(path: str) -> str:
    return path.rpartition("/")[0]


def normal(name: str) -> str:
    """Layer tars name paths `./etc/x`, `etc/x` or `/etc/x/`: one form, relative, for matching."""
    return "/".join(part for part in name.split("/") if part not in ("", "."))


@contextmanager
def open_layer(path: Path) -> Iterator[tarfile.TarFile]:
    """A layer blob as a streamed tar: gzip (every member of it: eStargz layers have many) or uncompressed, told by
    its first bytes (registry.fetch has made a zstd layer a plain tar already)."""
    with path.open("rb") as raw:
        gzipped = raw.read(2) == GZIP_MAGIC
        raw.seek(0)
        with (gzip.open(raw) if gzipped else raw) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
            yield tar


def merged_root(layers: tuple[Path, ...]) -> Root:
    """First pass: the headers of every layer, applied in order."""
    root = Root()
    for index, layer in enumerate(layers):
        with open_layer(layer) as tar:
            for position, info in enumerate(tar):
                path = normal(info.name)
                name = path.rpartition("/")[2]
                if not path:
                    continue  # the root directory itself: the root image makes its own
                if name == OPAQUE:
                    root.hide_lower(parent(path), index)
                elif name.startswith(WHITEOUT):
                    if not name.startswith(WHITEOUT + WHITEOUT):  # .wh..wh.* is aufs' bookkeeping, not a file
                        root.whiteout(f"{parent(path)}/{name.removeprefix(WHITEOUT)}".lstrip("/"), index)
                elif info.islnk():
                    target = root.entries.get(normal(info.linkname))
                    if target is None or target.info.isdir():
                        raise C2BootError(f"layer {index + 1} of the image has a hardlink {path} to "
                                          f"{info.linkname}, which no layer up to it holds (but as a directory)")
                    root.add(path, Entry(info, (index, position), target.shares or target))
                else:
                    root.add(path, Entry(info, (index, position)))
    return root


def write_root_tar(layers: tuple[Path, ...], dest: Path) -> Path:
    """Write the image's root filesystem as one PAX tar at `dest` (see the module's docstring)."""
    try:
        root = merged_root(layers)
        present = {id(e) for e in root.entries.values() if e.shares is None}
        orphans = {e.shares.at for e in root.entries.values()
                   if e.shares is not None and id(e.shares) not in present and e.shares.info.isreg()}
        with tempfile.TemporaryDirectory(dir=dest.parent) as aside, \
                tarfile.open(dest, "w", format=tarfile.PAX_FORMAT) as out, \
                closing(Contents(layers, orphans, Path(aside))) as contents:
            written: dict[tuple[int, int], str] = {}  # an inode (its first entry) -> the path it went out under
            for path, entry in root.entries.items():
                info = header(entry.info, path)
                source = entry.shares or entry
                if source.at in written:
                    info.type, info.linkname, info.size = tarfile.LNKTYPE, written[source.at], 0
                    out.addfile(info)
                    continue
                if entry.shares is not None:  # its target is gone: the link takes the inode over
                    for attribute in ("type", "linkname", "size", "devmajor", "devminor"):
                        setattr(info, attribute, getattr(source.info, attribute))
                if info.isreg():
                    with contents.of(source.at) as data:
                        out.addfile(info, data)
                else:
                    out.addfile(info)
                if not info.isdir():
                    written[source.at] = path
    except ValueError as e:  # what tarfile raises for a header it cannot parse (a sparse map, a number)
        dest.unlink(missing_ok=True)
        raise C2BootError(f"a layer of the image has an entry this tool cannot read ({e}): check the image with "
                          "`skopeo inspect`, or build it with podman or buildah") from None
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as e:
        dest.unlink(missing_ok=True)
        raise C2BootError(f"a layer of the image is not a readable tar ({e}): fetch it again, or check the "
                          "image with `skopeo inspect`") from None
    except BaseException:
        dest.unlink(missing_ok=True)
        raise
    return dest


def header(info: tarfile.TarInfo, path: str) -> tarfile.TarInfo:
    """A copy of a layer's header for the merged tar, named by its normal path (PAX records that tarfile derives
    from the header, the sparse map tarfile has already applied, and overlayfs' xattrs dropped; the rest, other
    xattrs among them, kept)."""
    copy = tarfile.TarInfo(path)
    for attribute in ("mode", "uid", "gid", "size", "mtime", "type", "linkname", "uname", "gname", "devmajor",
                      "devminor"):
        setattr(copy, attribute, getattr(info, attribute))
    if info.isreg():
        copy.type = tarfile.REGTYPE  # also for a sparse file (tarfile reads it whole) or a contiguous one
    if info.islnk():
        copy.linkname = normal(info.linkname)  # named as its target now is
    copy.pax_headers = {k: v for k, v in info.pax_headers.items()
                        if k not in PAX_NAMES and not k.startswith(DROPPED_PAX)}
    return copy


class Contents:
    """Second pass: the layers read once more, in order, up to each regular file the merged tar takes; on the way,
    the contents that only an orphaned hardlink still needs are copied aside."""

    def __init__(self, layers: tuple[Path, ...], orphans: set[tuple[int, int]], aside: Path) -> None:
        self._members = self._walk(layers)
        self._orphans = orphans
        self._aside = aside

    @staticmethod
    def _walk(layers: tuple[Path, ...]) -> Generator[tuple[tuple[int, int], tarfile.TarFile, tarfile.TarInfo]]:
        for index, layer in enumerate(layers):
            with open_layer(layer) as tar:
                for position, info in enumerate(tar):
                    yield (index, position), tar, info

    @contextmanager
    def of(self, at: tuple[int, int]) -> Iterator[IO[bytes]]:
        kept = self._aside / f"{at[0]}-{at[1]}"
        if kept.exists():
            with kept.open("rb") as aside:
                yield aside
            return
        for where, tar, info in self._members:
            data = tar.extractfile(info) if info.isreg() else None
            if where == at and data is not None:
                yield data
                return
            if where in self._orphans and data is not None:
                with kept.open("wb") as copy:
                    shutil.copyfileobj(data, copy)
        raise C2BootError("the image's layers changed while they were read: fetch the image again")

    def close(self) -> None:
        self._members.close()
