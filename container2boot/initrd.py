"""The initrd: the machine image's own dracut, run inside the image's rootfs, with the live-boot modules for the
live layout or the root filesystem's driver for the installed one.

dracut must run from the image (its modules, binaries and kernel modules must match), but the rootfs is read-only
(an image mount) and we have no privileges. A new user and mount namespace gives us both: the rootfs is
bind-mounted read-only with tmpfs on /tmp and /var/tmp (dracut's only writes), /dev, /proc and /sys are bound in,
and dracut runs chrooted. This works as a normal user and inside a rootless container with default capabilities.
(An overlay over the image mount would exceed the kernel's filesystem stacking depth.)
"""

import re
import shutil
import struct
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from container2boot.errors import C2BootError
from container2boot.log import logger
from container2boot.run import run
from container2boot.tree import Tree

# Drivers a VM, a laptop and a USB stick need to find their disks.
DISK_DRIVERS = (
    "virtio_blk virtio_scsi virtio_pci sd_mod sr_mod ahci nvme usb_storage uas xhci_pci xhci_hcd ehci_pci "
    "ohci_pci uhci_hcd"
)
# What the live boot mounts: the ESP and the root image on it. nls_ascii is Debian's default FAT iocharset: without
# it the ESP mount fails.
LIVE_DRIVERS = "vfat fat nls_cp437 nls_ascii nls_iso8859_1 nls_utf8 squashfs erofs overlay loop"
# An app has no udev of its own: what it needs is loaded by the initrd's udev and stays loaded after the switch to
# the root. Network cards (and virtio's), the ACPI power button and its input events.
APP_DRIVERS = "=drivers/net/ethernet virtio_net button evdev"
KMODDIR = "/tmp/c2boot-kmod/lib/modules"  # another tree's modules appear inside the sandbox as KMODDIR/VERSION
# The initrd's compression when the kernel unpacks zstd: measured on the example's 70 MB archive, 0.7 s on two cores
# and 37.5 MB, against 8.1 s and 39.2 MB for the gzip -9 that dracut picks without zstd in the image (and 4.6 s for
# its zstd -15). zstd's output does not depend on the number of threads.
ZSTD = ("zstd", "--quiet", "-9", "--threads=0")
DRACUT_CONFIGURATION = ("etc/dracut.conf.d", "usr/lib/dracut/dracut.conf.d")
COMPRESSION_CHOSEN = re.compile(r"^\s*compress\s*=", re.MULTILINE)
CPIO_MAGICS = (b"070701", b"070702")  # newc, with and without checksums
CPIO_HEADER = 110
PT_INTERP = 3  # the ELF program header that names a program's dynamic loader
SHELLS = ("usr/bin/bash", "bin/bash")  # dracut is a bash script: every initrd it makes holds bash

# $1 rootfs, $2 scratch directory, $3 destination file, $4 modules directory or "", $5 a file to list the initrd's
# paths in (NUL-separated; dracut runs with --keep) or "", then the dracut command line.
SANDBOX_SCRIPT = r"""
set -eu
rootfs=$1 scratch=$2 dest=$3 kmoddir=$4 listing=$5; shift 5
mkdir -p "$scratch/root"
mount --rbind "$rootfs" "$scratch/root"
mount -t tmpfs tmpfs "$scratch/root/tmp"
mount -t tmpfs tmpfs "$scratch/root/var/tmp"
for d in dev proc sys; do mount --rbind "/$d" "$scratch/root/$d"; done
if [ -n "$kmoddir" ]; then
  mkdir -p "$scratch/root/tmp/c2boot-kmod/lib/modules/${kmoddir##*/}"
  mount --rbind "$kmoddir" "$scratch/root/tmp/c2boot-kmod/lib/modules/${kmoddir##*/}"
fi
chroot "$scratch/root" "$@" /tmp/initrd.img
if [ -n "$listing" ]; then
  for initdir in "$scratch/root/var/tmp"/dracut.*/initramfs "$scratch/root/tmp"/dracut.*/initramfs; do
    if [ -d "$initdir" ]; then (cd "$initdir" && find . -mindepth 1 -printf '%P\0'); fi
  done > "$listing"
fi
cp "$scratch/root/tmp/initrd.img" "$dest"
chmod 0644 "$dest"
"""


# What the sandbox's own steps say when the container's seccomp profile or capabilities refuse them.
SANDBOX_REFUSED = re.compile(
    r"\b(unshare|chroot|mount): .*(operation not permitted|permission denied|must be superuser)", re.IGNORECASE)


@dataclass(frozen=True)
class InitrdJob:
    """Which dracut makes the initrd, for which kernel, for what."""

    dracut_root: Path  # the tree whose dracut runs (the image's own, or the supplied kernel image's)
    dracut_modules: frozenset[str]  # dracut's modules in that tree
    dracut_version: str | None
    kernel_version: str
    kernel_modules: Path | None = None  # another tree's /usr/lib/modules/VERSION (the image's own kernel)
    root_fstype: str | None = None  # installed layout: the root's filesystem; None: live
    netboot: bool = False
    app: bool = False
    zstd: bool = False  # dracut writes the archive uncompressed, and zstd compresses it here (see ZSTD)
    loader: str | None = None  # the dynamic loader of the dracut root's bash, which the initrd must hold


def compress_with_zstd(dracut_tree: Tree, kernel_configuration: str | None) -> bool:
    """Whether the initrd is compressed here with zstd: when the kernel unpacks it (CONFIG_RD_ZSTD), zstd is here,
    and the image's dracut configuration chooses no compression of its own."""
    if kernel_configuration is None or not re.search(r"^CONFIG_RD_ZSTD=y", kernel_configuration, re.MULTILINE):
        return False
    return shutil.which(ZSTD[0]) is not None and not any(map(COMPRESSION_CHOSEN.search, dracut_settings(dracut_tree)))


def dracut_settings(tree: Tree) -> Iterator[str]:
    """The texts of dracut's configuration files in a directory tree."""
    paths = ["etc/dracut.conf", *(f"{d}/{name}" for d in DRACUT_CONFIGURATION for name in tree.listdir(d)
                                  if name.endswith(".conf"))]
    for path in paths:
        if tree.is_file(path):
            yield tree.real_path(path).read_text(errors="replace")


def dracut_command(job: InitrdJob) -> list[str]:
    """dracut's command line: the live initrd (with `netboot`, also able to fetch the root image over HTTP), or
    with `root_fstype` the installed one, which mounts that root."""
    if job.root_fstype is None:
        wanted = ("overlayfs", "livenet", "network") if job.netboot else ("overlayfs",)
        modules = ["dmsquash-live"] + [m for m in wanted if m in job.dracut_modules]
        drivers = f"{DISK_DRIVERS} {LIVE_DRIVERS}"
        layout = ["--add", " ".join(modules)]
    else:  # the kernel driver is enough for a one-device root (dracut's btrfs module needs btrfs-progs)
        drivers = f"{DISK_DRIVERS} {job.root_fstype}"
        layout = []
    if job.app:
        drivers += f" {APP_DRIVERS}"
    # dracut wants the path to end in lib/modules/VERSION, as the real one does.
    kmoddir = ["--kmoddir", f"{KMODDIR}/{job.kernel_modules.name}"] if job.kernel_modules is not None else []
    compression = ["--no-compress"] if job.zstd else []
    return ["dracut", "--force", "--reproducible", "--no-hostonly", "--no-hostonly-cmdline", *compression, "--kver",
            job.kernel_version, *kmoddir,
            *layout, "--add-drivers", drivers]


def build_initrd(job: InitrdJob, dest: Path, scratch: Path, env: Mapping[str, str] | None = None,
                 listing: Path | None = None) -> None:
    """Write the initrd to `dest`, made by `job.dracut_root`'s dracut in a user namespace (`env`: with
    SOURCE_DATE_EPOCH, which dracut's reproducible mode stamps on every file); with `listing`, also list the paths
    it holds there (NUL-separated), for the initrd cache."""
    dracut = dracut_command(job)
    if listing is not None:
        dracut.insert(1, "--keep")  # its staging tree stays (in the sandbox's tmpfs) to be listed
    try:
        run([
            "unshare", "--user", "--map-root-user", "--mount", "--",
            "sh", "-c", SANDBOX_SCRIPT, "c2boot-initrd", job.dracut_root.absolute(), scratch.absolute(),
            dest.absolute(), job.kernel_modules.absolute() if job.kernel_modules else "",
            listing.absolute() if listing else "", *dracut,
        ], env=env, name=f"dracut (of {job.dracut_root}, in a user namespace)", follow=True)
    except C2BootError as e:
        if SANDBOX_REFUSED.search(str(e)):
            raise C2BootError(f"{e}: this container may not make the user namespace dracut runs in, or mount or "
                              "chroot there; give it CAP_SYS_CHROOT, or a seccomp profile (and an AppArmor profile) "
                              "that allows unshare, mount and chroot, on nodes with user namespaces (README: "
                              "\"Running it in CI and on Kubernetes\")") from None
        raise
    if job.zstd:
        compress(dest)


def elf_interpreter(program: Path) -> str | None:
    """The dynamic loader a 64-bit little-endian ELF program names (PT_INTERP); None for a static program or a file
    that is no such ELF."""
    with program.open("rb") as f:
        header = f.read(64)
        if len(header) < 64 or header[:4] != b"\x7fELF" or header[4:6] != b"\x02\x01":
            return None
        (table,) = struct.unpack_from("<Q", header, 32)
        entry_size, entries = struct.unpack_from("<HH", header, 54)
        for index in range(entries):
            f.seek(table + index * entry_size)
            kind, _, offset, _, _, size = struct.unpack("<IIQQQQ", f.read(40))
            if kind == PT_INTERP:
                f.seek(offset)
                return f.read(size).rstrip(b"\0").decode(errors="replace")
    return None


def shell_loader(dracut_tree: Tree) -> str | None:
    """The dynamic loader that the bash of a dracut tree names: every initrd its dracut makes holds that bash."""
    shell = next((path for path in SHELLS if dracut_tree.is_file(path)), None)
    return elf_interpreter(dracut_tree.real_path(shell)) if shell is not None else None


def loader_left_out(job: InitrdJob, paths: Iterable[str]) -> str | None:
    """The job's loader when the initrd's `paths` lack it, else None. Without it dracut found none of the shared
    libraries (its ldd failed: once in CI, nothing said so) and the initrd cannot run its init."""
    if job.loader is None:
        return None
    name = job.loader.rpartition("/")[2]
    return None if any(path.rpartition("/")[2] == name for path in paths) else job.loader


def early_archive_end(initrd: BinaryIO) -> int:
    """Where dracut's early archive (CPU microcode, ACPI tables; marked by its `early_cpio` file) ends, with its
    padding, in an uncompressed initrd; 0 when it has none. The kernel reads the early archive only uncompressed."""
    offset, names = 0, set()
    while True:
        initrd.seek(offset)
        header = initrd.read(CPIO_HEADER)
        if len(header) < CPIO_HEADER or header[:6] not in CPIO_MAGICS:
            return 0
        try:
            size, name_size = int(header[54:62], 16), int(header[94:102], 16)
        except ValueError:  # not a header after all: no early archive can be told apart
            return 0
        name = initrd.read(name_size).rstrip(b"\0")
        offset = _aligned(_aligned(offset + CPIO_HEADER + name_size) + size)
        if name == b"TRAILER!!!":
            break
        names.add(name)
    if b"early_cpio" not in names:
        return 0
    initrd.seek(offset)
    while initrd.read(4) == b"\0\0\0\0":  # cpio pads its output to whole blocks
        offset += 4
    return offset


def _aligned(offset: int) -> int:
    return (offset + 3) & ~3


def compress(initrd: Path) -> None:
    """Compress an uncompressed initrd in place with zstd, but its early archive. What is not a cpio archive (a
    dracut that compressed it all the same) is left as it is."""
    compressed = initrd.with_name(f"{initrd.name}.zst")
    with initrd.open("rb", buffering=0) as raw:
        if raw.read(6) not in CPIO_MAGICS:
            logger.warning("    warning: dracut did not write an uncompressed initrd: it is kept as dracut made it")
            return
        try:
            with compressed.open("wb") as out:
                early = early_archive_end(raw)
                raw.seek(0)
                out.write(raw.read(early))
                out.flush()
                raw.seek(early)
                run(ZSTD, stdin=raw.fileno(), stdout=out.fileno())
        except BaseException:
            compressed.unlink(missing_ok=True)
            raise
    compressed.chmod(0o644)
    compressed.replace(initrd)
