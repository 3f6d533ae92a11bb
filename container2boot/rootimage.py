"""The root image: the whole rootfs as one compressed squashfs file, mounted read-only by dmsquash-live.

tar2sqfs (squashfs-tools-ng) packs a tar stream without privileges and keeps owners, modes, setuid/setgid bits,
hard links, symlinks and extended attributes (security.capability included) exactly as the stream has them.
"""

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from container2boot.run import require_tool, run, run_pipe

# GNU tar would store POSIX ACLs as system.posix_acl_* xattrs; squashfs cannot hold them.
# --sort=name: the same order on every host, whatever order its file system lists a directory in.
TAR_CREATE = [
    "tar", "--create", "--file=-", "--numeric-owner", "--sparse", "--one-file-system", "--sort=name",
    "--xattrs", "--xattrs-include=*", "--xattrs-exclude=system.posix_acl_*",
]


def tar2sqfs_command(dest: Path, compression: str) -> list[str]:
    return [require_tool("tar2sqfs"), "--quiet", "--no-skip", "--force", "--compressor", compression, str(dest)]


def build_root_image(source: Path, dest: Path, compression: str, extra: Path | None = None,
                     left_out: tuple[str, ...] = (), env: Mapping[str, str] | None = None) -> None:
    """Pack `source` (a rootfs directory or a tar of one) into the squashfs file `dest`; with `extra` (a
    directory), its files are added after the rootfs's (directories the rootfs has are not repeated), and the
    rootfs's `left_out` paths (those `extra` replaces, or that are reset) are not packed."""
    if extra is not None:
        assert source.is_dir(), "files are added to a rootfs directory"
        with merged_tar_command(source, extra, left_out) as tar:
            run_pipe(tar, tar2sqfs_command(dest, compression), env)
    elif source.is_dir():
        run_pipe([*TAR_CREATE, "--directory", str(source), "."], tar2sqfs_command(dest, compression), env)
    else:
        with source.open("rb") as stream:
            run(tar2sqfs_command(dest, compression), stdin=stream.fileno(), env=env)


@contextmanager
def merged_tar_command(source: Path, extra: Path, left_out: tuple[str, ...]) -> Iterator[list[str]]:
    """tar writing `source` without its `left_out` paths, then `extra`'s files, as one stream. Exclusions match
    every member, so the added files are listed as EXTRA/... and renamed to ./... on the way."""
    listing = extra.parent / f"{extra.name}.files"
    listing.write_bytes(b"".join(f"{extra.name}/{p}\0".encode() for p in added_paths(source, extra)))
    excludes = ["--anchored", "--no-wildcards", *(f"--exclude=./{path}" for path in left_out)]
    try:
        yield [*TAR_CREATE, *excludes, f"--transform=s,^{extra.name}/,./,S", "--directory", str(source), ".",
               "--no-recursion", "--null", "--verbatim-files-from", "--directory", str(extra.parent),
               f"--files-from={listing}"]
    finally:
        listing.unlink()


def added_paths(source: Path, extra: Path) -> list[str]:
    """Paths of `extra` (relative) to add to `source`: all but the directories `source` has already."""
    paths = []
    for directory, dirs, files in os.walk(extra):
        relative = os.path.relpath(directory, extra)
        for name in sorted(dirs) + sorted(files):
            path = os.path.normpath(os.path.join(relative, name))
            if name in dirs and os.path.isdir(os.path.join(source, path)) and \
                    not os.path.islink(os.path.join(source, path)):
                continue
            paths.append(path)
    return paths
