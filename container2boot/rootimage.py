"""The root image: the whole rootfs as one compressed squashfs file, mounted read-only by dmsquash-live.

tar2sqfs (squashfs-tools-ng) packs a tar stream without privileges and keeps owners, modes, setuid/setgid bits,
hard links, symlinks and extended attributes (security.capability included) exactly as the stream has them.
"""

from pathlib import Path

from container2boot.run import require_tool, run, run_pipe

# GNU tar would store POSIX ACLs as system.posix_acl_* xattrs; squashfs cannot hold them.
TAR_CREATE = [
    "tar", "--create", "--file=-", "--numeric-owner", "--sparse", "--one-file-system",
    "--xattrs", "--xattrs-include=*", "--xattrs-exclude=system.posix_acl_*",
]


def tar2sqfs_command(dest: Path, compression: str) -> list[str]:
    return [require_tool("tar2sqfs"), "--quiet", "--no-skip", "--force", "--compressor", compression, str(dest)]


def build_root_image(source: Path, dest: Path, compression: str) -> None:
    """Pack `source` (a rootfs directory or a tar of one) into the squashfs file `dest`."""
    if source.is_dir():
        run_pipe([*TAR_CREATE, "--directory", str(source), "."], tar2sqfs_command(dest, compression))
    else:
        with source.open("rb") as stream:
            run(tar2sqfs_command(dest, compression), stdin=stream.fileno())
