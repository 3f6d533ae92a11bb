"""The root image: the whole rootfs as one compressed squashfs file, mounted read-only by dmsquash-live.

tar2sqfs (squashfs-tools-ng) packs a tar stream without privileges and keeps owners, modes, setuid/setgid bits,
hard links, symlinks and extended attributes (security.capability included) exactly as the stream has them.
"""

import os
from pathlib import Path

from container2boot.run import require_tool, run, run_pipe

# GNU tar would store POSIX ACLs as system.posix_acl_* xattrs; squashfs cannot hold them.
TAR_CREATE = [
    "tar", "--create", "--file=-", "--numeric-owner", "--sparse", "--one-file-system",
    "--xattrs", "--xattrs-include=*", "--xattrs-exclude=system.posix_acl_*",
]


def tar2sqfs_command(dest: Path, compression: str) -> list[str]:
    return [require_tool("tar2sqfs"), "--quiet", "--no-skip", "--force", "--compressor", compression, str(dest)]


def build_root_image(source: Path, dest: Path, compression: str, extra: Path | None = None) -> None:
    """Pack `source` (a rootfs directory or a tar of one) into the squashfs file `dest`; with `extra` (a
    directory), its files are added after the rootfs's (it only adds: directories the rootfs has are not
    repeated, and no file of the rootfs is replaced)."""
    if extra is not None:
        assert source.is_dir(), "files are added to a rootfs directory"
        listing = extra.parent / f"{extra.name}.files"
        listing.write_bytes(b"".join(f"{p}\0".encode() for p in added_paths(source, extra)))
        try:
            run_pipe([*TAR_CREATE, "--directory", str(source), ".", "--no-recursion", "--null",
                      "--directory", str(extra), f"--files-from={listing}"], tar2sqfs_command(dest, compression))
        finally:
            listing.unlink()
    elif source.is_dir():
        run_pipe([*TAR_CREATE, "--directory", str(source), "."], tar2sqfs_command(dest, compression))
    else:
        with source.open("rb") as stream:
            run(tar2sqfs_command(dest, compression), stdin=stream.fileno())


def added_paths(source: Path, extra: Path) -> list[str]:
    """Paths of `extra` (./relative) to add to `source`: all but the directories `source` has already."""
    paths = []
    for directory, dirs, files in os.walk(extra):
        relative = os.path.relpath(directory, extra)
        for name in sorted(dirs) + sorted(files):
            path = os.path.normpath(os.path.join(relative, name))
            if name in dirs and os.path.isdir(os.path.join(source, path)) and \
                    not os.path.islink(os.path.join(source, path)):
                continue
            paths.append(f"./{path}")
    return paths
