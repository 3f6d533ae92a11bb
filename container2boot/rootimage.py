"""The root image: the whole rootfs as one compressed squashfs file, mounted read-only by dmsquash-live.

tar2sqfs (squashfs-tools-ng) packs a tar stream without privileges and keeps owners, modes, setuid/setgid bits,
hard links, symlinks and extended attributes (security.capability included) exactly as the stream has them.
"""

import os
import shlex
import signal
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from pathlib import Path

from container2boot import lifecycle
from container2boot.errors import C2BootError
from container2boot.log import logger
from container2boot.run import failure_message, require_tool

# GNU tar would store POSIX ACLs as system.posix_acl_* xattrs; squashfs cannot hold them.
# --sort=name: the same order on every host, whatever order its file system lists a directory in.
TAR_CREATE = [
    "tar", "--create", "--file=-", "--numeric-owner", "--sparse", "--one-file-system", "--sort=name",
    "--xattrs", "--xattrs-include=*", "--xattrs-exclude=system.posix_acl_*",
]


def tar2sqfs_command(dest: Path, compression: str) -> list[str]:
    return [require_tool("tar2sqfs"), "--quiet", "--no-skip", "--force", "--compressor", compression, str(dest)]


@contextmanager
def packing(source: Path, dest: Path, compression: str, extra: Path | None = None, left_out: tuple[str, ...] = (),
            env: Mapping[str, str] | None = None) -> Iterator[Callable[[], None]]:
    """Start packing `source` (a rootfs directory or a tar of one) into the squashfs file `dest`, in the background
    beside what the caller does next (dracut: the two do not depend on each other); yields the function that waits
    for it and raises as `run()` does. Leaving early (an error, Ctrl-C) stops it. With `extra` (a directory), its
    files are added after the rootfs's (directories the rootfs has are not repeated), and the rootfs's `left_out`
    paths (those `extra` replaces, or that are reset) are not packed."""
    with ExitStack() as stack:
        producer: list[str] | None = None
        if extra is not None:
            assert source.is_dir(), "files are added to a rootfs directory"
            producer = stack.enter_context(merged_tar_command(source, extra, left_out))
        elif source.is_dir():
            producer = [*TAR_CREATE, "--directory", str(source), "."]
        errors = [stack.enter_context(tempfile.TemporaryFile(mode="w+")) for _ in range(2)]
        consumer = tar2sqfs_command(dest, compression)  # a missing tool fails before anything starts
        tar = None
        if producer is not None:
            logger.debug("$ %s |", shlex.join(producer))
            tar = lifecycle.start_process([require_tool(producer[0]), *producer[1:]], stdout=subprocess.PIPE,
                                          stderr=errors[0], env=env)
        logger.debug("$ %s", shlex.join(consumer))
        try:
            packer = lifecycle.start_process(consumer,
                                             stdin=tar.stdout if tar else stack.enter_context(source.open("rb")),
                                             stdout=errors[1], stderr=errors[1], env=env)
        except BaseException:
            if tar is not None:
                lifecycle.stop_process(tar)
            raise
        if tar is not None and tar.stdout is not None:
            tar.stdout.close()  # tar2sqfs's end only: when it fails, tar gets SIGPIPE

        def wait() -> None:
            for process, tool, output in ((packer, "tar2sqfs", errors[1]), (tar, "tar", errors[0])):
                if process is not None and process.wait() not in (0, -signal.SIGPIPE):
                    output.seek(0)
                    raise C2BootError(failure_message(tool, process.returncode, output.read()))

        try:
            yield wait
        finally:
            for process in (packer, tar):
                if process is not None:
                    lifecycle.stop_process(process)


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
