"""The root image's input when the rootfs came as a tar and the build adds files (resets, accounts, units): the tar's
own members but the paths the build replaces, then the added files, as one tar on standard output. Read from the
tar, not from its unpacked copy, whose owners and setuid bits are the unpacking user's wherever that is not root
(a Kubernetes pod's user 1000). Run by rootimage.packing as the packer's producer:

    python3 -m container2boot.tarmerge ROOTFS.TAR EXTRA_DIR LEFT_OUT_LIST   (NUL-separated paths)
"""

import os
import signal
import sys
import tarfile
from pathlib import Path

from container2boot.layers import header, normal
from container2boot.rootimage import added_paths


def merge(source: Path, extra: Path, left_out: set[str], out: "tarfile.TarFile") -> None:
    """Copy `source`'s members but `left_out` (and what is under them), then `extra`'s files but the directories
    `source` has already. Files this (non-root) user made for the build belong to root, as they would have."""
    directories: set[str] = set()
    with tarfile.open(source, "r|") as tar:
        for info in tar:
            path = normal(info.name)
            if not path or left(path, left_out) or (info.islnk() and left(normal(info.linkname), left_out)):
                continue
            if info.isdir():
                directories.add(path)
            out.addfile(header(info, path), tar.extractfile(info) if info.isreg() else None)
    me = (os.geteuid(), os.getegid())
    for path in added_paths(extra, directories.__contains__):
        full = extra / path
        info = out.gettarinfo(full, arcname=path)
        if me[0] != 0:
            info.uid = 0 if info.uid == me[0] else info.uid
            info.gid = 0 if info.gid == me[1] else info.gid
        info.uname = info.gname = ""
        if info.isreg():
            with full.open("rb") as data:
                out.addfile(info, data)
        else:
            out.addfile(info)


def left(path: str, left_out: set[str]) -> bool:
    return path in left_out or any(path.startswith(f"{gone}/") for gone in left_out)


def main() -> None:
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # a packer that failed ends this quietly, as it would tar
    source, extra, listing = (Path(arg) for arg in sys.argv[1:4])
    left_out = {normal(p) for p in listing.read_text().split("\0") if p}
    with tarfile.open(fileobj=sys.stdout.buffer, mode="w|", format=tarfile.PAX_FORMAT) as out:
        merge(source, extra, left_out, out)


if __name__ == "__main__":
    main()
