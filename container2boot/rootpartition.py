"""The installed layout's root: a writable partition holding the image's filesystem, filled by systemd-repart.

systemd-repart formats the partition and copies the rootfs into it offline (mkfs.ext4 -d, mkfs.xfs -p, mkfs.btrfs
--rootdir), keeping owners, modes and xattrs, with no loop device and no privileges. The image itself is never
changed: the few files the installed system needs on top of it (an /etc/fstab that mounts this root read-write by
its partition UUID, and a systemd-repart rule that grows the root into a larger disk) come from an overlay tree
copied after the rootfs, with the image's own copies of those paths left out.
"""

import os
from dataclasses import dataclass
from pathlib import Path

from container2boot.disk import MiB
from container2boot.errors import C2BootError
from container2boot.reproducible import Reproducible
from container2boot.templates import render_to

FSCK_PASS = {"ext4": 1, "xfs": 0, "btrfs": 0}  # xfs and btrfs check themselves at mount
MIN_ROOT = {"ext4": 64 * MiB, "xfs": 300 * MiB, "btrfs": 114 * MiB}  # the smallest each mkfs accepts
BLOCK = 4096
ROOM = 0.25  # free space on the root by default: package updates, logs
# Filesystem metadata and journal. Measured: mkfs.btrfs --rootdir needed 917 MiB for 338 MiB of content.
FIXED_ROOM = {"ext4": 128 * MiB, "xfs": 128 * MiB, "btrfs": 640 * MiB}
FSTAB = "etc/fstab"
GROW_RULE = "etc/repart.d/50-container2boot-root.conf"
REPART_DIRS = ("etc/repart.d", "usr/lib/repart.d", "usr/local/lib/repart.d")
REPART_IGNORED = ("/tmp", "/var/tmp")


@dataclass(frozen=True)
class RootPartition:
    """What the disk stage needs to write the root partition."""

    source: Path  # the rootfs directory
    fstype: str
    partuuid: str  # GPT partition UUID: the kernel's root= and fstab find the root by it
    min_bytes: int
    overlay: Path  # a tree of files copied over the rootfs
    overlay_files: tuple[str, ...]  # its files, relative paths
    replaced: tuple[str, ...]  # those the rootfs has too: left out of the rootfs copy
    extra: Path | None = None  # what the build adds to the root (supplied.py): copied after the rootfs


def content_bytes(root: Path) -> int:
    """Space the rootfs takes on a filesystem with 4 KiB blocks: every file rounded up, plus an inode each."""
    total = 0
    for directory, dirs, files in os.walk(root):
        total += BLOCK * (1 + len(dirs))
        for name in files:
            size = os.lstat(os.path.join(directory, name)).st_size
            total += -(-size // BLOCK) * BLOCK + 256
    return total


def root_size(content: int, fstype: str) -> int:
    """The root partition's default (and smallest accepted) size for `content` bytes of files."""
    wanted = int(content * (1 + ROOM)) + FIXED_ROOM[fstype]
    return max(MIN_ROOT[fstype], -(-wanted // MiB) * MiB)


def fstab_lines_without_root(fstab: str) -> list[str]:
    """The image's fstab minus any entry for /, which the installed root replaces."""
    kept = []
    for line in fstab.splitlines():
        fields = line.split()
        if fields and not fields[0].startswith("#") and len(fields) >= 2 and fields[1] == "/":
            continue
        kept.append(line)
    return kept


def check_copyable(*paths: Path) -> None:
    """systemd-repart silently skips files under the host's /tmp and /var/tmp (its copy denylist): refuse such
    sources before any slow step instead of writing a root partition without them."""
    for path in paths:
        resolved = path.resolve()
        if any(resolved == Path(t) or Path(t) in resolved.parents for t in REPART_IGNORED):
            raise C2BootError(f"{path} is under {' or '.join(REPART_IGNORED)}, which systemd-repart does not copy "
                              "from: put the rootfs and --output elsewhere for --layout installed (or use `c2boot "
                              "build`, which runs this stage in the rootbuilder container)")


def prepare(root: Path, fstype: str, scratch: Path, same: Reproducible) -> RootPartition:
    """Choose the partition UUID (from the build's seed) and write the overlay tree for the root partition of
    `root`. `scratch` must not be under /tmp or /var/tmp: systemd-repart ignores files there."""
    partuuid = str(same.uuid("root partition"))
    overlay = scratch / "root-overlay"
    image_fstab = root / FSTAB
    kept = fstab_lines_without_root(image_fstab.read_text(errors="replace")) if image_fstab.is_file() else []
    render_to(overlay / FSTAB, "fstab.j2", kept=kept, partuuid=partuuid, fstype=fstype, passno=FSCK_PASS[fstype])
    files = [FSTAB]
    if not any(any((root / d).glob("*.conf")) for d in REPART_DIRS):  # the image's own rules know better
        render_to(overlay / GROW_RULE, "grow-root.conf.j2")
        files.append(GROW_RULE)
    same.clamp_times(overlay)
    replaced = tuple(f for f in files if (root / f).exists() or (root / f).is_symlink())
    return RootPartition(root, fstype, partuuid, root_size(content_bytes(root), fstype), overlay, tuple(files),
                         replaced)
