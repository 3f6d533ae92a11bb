"""The root image: the whole rootfs as one compressed read-only file system, mounted by dmsquash-live.

Both packers read a tar stream without privileges and keep owners, modes, setuid/setgid bits, hard links, symlinks
and extended attributes (security.capability included) exactly as the stream has them: tar2sqfs
(squashfs-tools-ng) makes squashfs, the smallest; mkfs.erofs --tar makes EROFS, measured 4-5 times faster and about
a fifth bigger (the example: 2.7 s and 229 MiB against 13.7 s and 191 MiB, both zstd).
"""

import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from container2boot import lifecycle
from container2boot.errors import C2BootError
from container2boot.log import logger
from container2boot.reproducible import Reproducible
from container2boot.rootfs import kernel_config
from container2boot.run import dracut_at_least, failure_message, require_tool

# GNU tar would store POSIX ACLs as system.posix_acl_* xattrs; squashfs cannot hold them.
# --sort=name: the same order on every host, whatever order its file system lists a directory in.
TAR_CREATE = [
    "tar", "--create", "--file=-", "--numeric-owner", "--sparse", "--one-file-system", "--sort=name",
    "--xattrs", "--xattrs-include=*", "--xattrs-exclude=system.posix_acl_*",
]


FILES = {"squashfs": "squashfs.img", "erofs": "erofs.img"}  # in esp/container2boot, by --root-format
RATIOS = {"squashfs": 0.6, "erofs": 0.7}  # the image / the files in it; measured 0.54 and 0.64 (example, zstd)
# While it packs, mkfs.erofs --tar keeps the files' data uncompressed in the image file (sparse, past 1 TiB), then
# compresses it: measured 606 MB at the peak for 375 MB of files, 234 MB after. (Extra space / the files.)
PACKING_BUFFER = {"squashfs": 0.0, "erofs": 1.0}
# mkfs.erofs's compressor for each --compression, and the kernel option that reads it.
EROFS_COMPRESSORS = {"zstd": ("zstd", "CONFIG_EROFS_FS_ZIP_ZSTD"), "xz": ("lzma", "CONFIG_EROFS_FS_ZIP_LZMA"),
                     "gzip": ("deflate", "CONFIG_EROFS_FS_ZIP_DEFLATE"), "lz4": ("lz4hc", "CONFIG_EROFS_FS_ZIP")}
EROFS_CLUSTER = 65536  # bytes compressed together: against 4 KiB, 4 % smaller and faster to make (measured)
EROFS_DRACUT = (103,)  # dmsquash-live mounts EROFS since dracut-ng 103 (dracut-ng pull request 490)


def pack_command(root_format: str, dest: Path, compression: str, same: Reproducible) -> list[str]:
    """The packer reading a tar on its standard input. EROFS gets its UUID from the seed and the source date as
    its own time only (files keep theirs); tar2sqfs takes SOURCE_DATE_EPOCH from the environment."""
    if root_format == "erofs":
        return [require_tool("mkfs.erofs"), "--quiet", "--tar=f", f"-z{EROFS_COMPRESSORS[compression][0]}",
                f"-C{EROFS_CLUSTER}", f"-T{same.epoch}", "--mkfs-time", f"-U{same.uuid('erofs')}", str(dest)]
    return [require_tool("tar2sqfs"), "--quiet", "--no-skip", "--force", "--compressor", compression, str(dest)]


def check_bootable(root_format: str, compression: str, kernel_root: Path, kernel_version: str,
                   dracut_version: str | None) -> None:
    """Fail before the slow steps when the booted kernel or the initrd's dracut cannot mount the root image: the
    kernel's configuration (where the image keeps one) must read EROFS with the compressor, and dmsquash-live must
    know EROFS."""
    if root_format != "erofs":
        return
    assert compression in EROFS_COMPRESSORS, "the configuration refuses the others"
    if not dracut_at_least(dracut_version, EROFS_DRACUT):
        raise C2BootError(f"the initrd's dracut {dracut_version} cannot mount an EROFS root (dracut "
                          f"{'.'.join(map(str, EROFS_DRACUT))} or newer can): use --root-format squashfs")
    configuration = kernel_config(kernel_root, kernel_version)
    if configuration is None:
        logger.info("    the kernel keeps no configuration in the image: whether it reads EROFS is not checked")
        return
    options = set(re.findall(r"^(CONFIG_EROFS_\w+)=[ym]", configuration, re.M))
    needed = EROFS_COMPRESSORS[compression][1]
    if "CONFIG_EROFS_FS" not in options:
        raise C2BootError(f"kernel {kernel_version} cannot read EROFS (no CONFIG_EROFS_FS): use --root-format "
                          "squashfs")
    if needed not in options:
        readable = [name for name, (_, option) in EROFS_COMPRESSORS.items() if option in options]
        instead = f"--compression {' or '.join(readable)}, or " if readable else ""
        raise C2BootError(f"kernel {kernel_version} cannot read {compression}-compressed EROFS (no {needed}): use "
                          f"{instead}--root-format squashfs")


@contextmanager
def packing(source: Path, consumer: list[str], extra: Path | None = None, left_out: tuple[str, ...] = (),
            env: Mapping[str, str] | None = None,
            label_filter: list[str] | None = None) -> Iterator[Callable[[], float]]:
    """Start packing `source` (a rootfs directory or a tar of one) with `consumer` (pack_command's), in the
    background beside what the caller does next (dracut: the two do not depend on each other); yields the function
    that waits for it, raises as `run()` does and returns how long the packing itself took. Leaving early (an
    error, Ctrl-C) stops it. With `extra` (a directory), its files are added after the rootfs's (directories the
    rootfs has are not repeated), and the rootfs's `left_out` paths (those `extra` replaces, or that are reset) are
    not packed. `label_filter` (selinux.filter_command's) rewrites the tar stream on its way to the packer."""
    with ExitStack() as stack:
        producer: list[str] | None = None
        if extra is not None and not source.is_dir():
            producer = stack.enter_context(tar_merge_command(source, extra, left_out))
        elif extra is not None:
            producer = stack.enter_context(merged_tar_command(source, extra, left_out))
        elif source.is_dir():
            producer = [*TAR_CREATE, "--directory", str(source), "."]
        chain = [command for command in (producer, label_filter) if command is not None]
        errors = [stack.enter_context(tempfile.TemporaryFile(mode="w+")) for _ in range(len(chain) + 1)]
        processes: list[subprocess.Popen[bytes]] = []
        feed: Any = None if producer is not None else stack.enter_context(source.open("rb"))

        def stop_all() -> None:
            for process in processes:
                lifecycle.stop_process(process)

        stack.callback(stop_all)
        for command, output in zip([*chain, consumer], errors, strict=True):
            last = command is consumer
            logger.debug("$ %s%s", shlex.join(command), "" if last else " |")
            process = lifecycle.start_process([require_tool(command[0]), *command[1:]], stdin=feed,
                                              stdout=output if last else subprocess.PIPE,
                                              stderr=output, env=env)
            processes.append(process)  # stopped on the way out, whatever happens next
            if len(processes) > 1 and feed is not None:
                feed.close()  # the next one's end only: when it fails, the one before gets SIGPIPE
            feed = process.stdout
        packer = processes[-1]
        started, ended = time.monotonic(), [0.0]

        def note_the_end() -> None:  # the packer may be done long before wait() is called
            packer.wait()
            ended[0] = time.monotonic()

        watcher = threading.Thread(target=note_the_end, daemon=True)
        watcher.start()

        def wait() -> float:
            # In the order of the pipe: the first to fail says why (those after it read a cut stream, those before
            # it were cut off by SIGPIPE; the Python filters die by it too, see tarmerge.main).
            for process, command, output in zip(processes, [*chain, consumer], errors, strict=True):
                if process.wait() not in (0, -signal.SIGPIPE) or (process is packer and process.returncode != 0):
                    output.seek(0)
                    raise C2BootError(failure_message(tool_name(command), process.returncode, output.read()))
            watcher.join()
            return ended[0] - started

        yield wait


def tool_name(command: list[str]) -> str:
    """What an error calls a command: the tool, or the container2boot module a Python command runs."""
    return command[2].rpartition(".")[2] if command[1:2] == ["-m"] else Path(command[0]).name


@contextmanager
def merged_tar_command(source: Path, extra: Path, left_out: tuple[str, ...]) -> Iterator[list[str]]:
    """tar writing `source` without its `left_out` paths, then `extra`'s files, as one stream. Exclusions match
    every member, so the added files are listed as EXTRA/... and renamed to ./... on the way."""
    listing = extra.parent / f"{extra.name}.files"
    listing.write_bytes(b"".join(f"{extra.name}/{p}\0".encode() for p in added_paths(extra, has_directory(source))))
    excludes = ["--anchored", "--no-wildcards", *(f"--exclude=./{path}" for path in left_out)]
    try:
        yield [*TAR_CREATE, *excludes, f"--transform=s,^{extra.name}/,./,S", "--directory", str(source), ".",
               "--no-recursion", "--null", "--verbatim-files-from", "--directory", str(extra.parent),
               f"--files-from={listing}"]
    finally:
        listing.unlink()


@contextmanager
def tar_merge_command(source: Path, extra: Path, left_out: tuple[str, ...]) -> Iterator[list[str]]:
    """The same stream from a rootfs tar (see the tarmerge module): its own owners and modes, not those of the copy
    unpacked for dracut."""
    listing = extra.parent / f"{extra.name}.left-out"
    listing.write_bytes(b"".join(f"{path}\0".encode() for path in left_out))
    try:
        yield [sys.executable, "-m", "container2boot.tarmerge", str(source), str(extra), str(listing)]
    finally:
        listing.unlink()


def added_paths(extra: Path, source_has_directory: Callable[[str], bool]) -> list[str]:
    """Paths of `extra` (relative) to add to the rootfs: all but the directories the rootfs has already (a real
    directory, not a symlink to one)."""
    paths = []
    for directory, dirs, files in os.walk(extra):
        dirs.sort()
        relative = os.path.relpath(directory, extra)
        for name in (*dirs, *sorted(files)):
            path = os.path.normpath(os.path.join(relative, name))
            if name in dirs and source_has_directory(path):
                continue
            paths.append(path)
    return paths


def has_directory(root: Path) -> Callable[[str], bool]:
    """Whether the rootfs directory `root` has a real directory at a relative path."""
    return lambda path: os.path.isdir(root / path) and not os.path.islink(root / path)
