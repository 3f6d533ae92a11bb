"""The initrd: the machine image's own dracut, run inside the image's rootfs, with the live-boot modules for the
live layout or the root filesystem's driver for the installed one.

dracut must run from the image (its modules, binaries and kernel modules must match), but the rootfs is read-only
(an image mount) and we have no privileges. A new user and mount namespace gives us both: the rootfs is
bind-mounted read-only with tmpfs on /tmp and /var/tmp (dracut's only writes), /dev, /proc and /sys are bound in,
and dracut runs chrooted. This works as a normal user and inside a rootless container with default capabilities.
(An overlay over the image mount would exceed the kernel's filesystem stacking depth.)
"""

from pathlib import Path

from container2boot.rootfs import RootfsInfo
from container2boot.run import run

# Drivers a VM, a laptop and a USB stick need to find their disks.
DISK_DRIVERS = (
    "virtio_blk virtio_scsi virtio_pci sd_mod sr_mod ahci nvme usb_storage uas xhci_pci xhci_hcd ehci_pci "
    "ohci_pci uhci_hcd"
)
# What the live boot mounts: the ESP and the root image on it. nls_ascii is Debian's default FAT iocharset: without
# it the ESP mount fails.
LIVE_DRIVERS = "vfat fat nls_cp437 nls_ascii nls_iso8859_1 nls_utf8 squashfs erofs overlay loop"

# $1 rootfs, $2 scratch directory, $3 destination file, then the dracut command line.
SANDBOX_SCRIPT = r"""
set -eu
rootfs=$1 scratch=$2 dest=$3; shift 3
mkdir -p "$scratch/root"
mount --rbind "$rootfs" "$scratch/root"
mount -t tmpfs tmpfs "$scratch/root/tmp"
mount -t tmpfs tmpfs "$scratch/root/var/tmp"
for d in dev proc sys; do mount --rbind "/$d" "$scratch/root/$d"; done
chroot "$scratch/root" "$@" /tmp/initrd.img
cp "$scratch/root/tmp/initrd.img" "$dest"
chmod 0644 "$dest"
"""


def dracut_command(info: RootfsInfo, root_fstype: str | None = None, netboot: bool = False) -> list[str]:
    """dracut's command line: the live initrd (with `netboot`, also able to fetch the root image over HTTP), or
    with `root_fstype` the installed one, which mounts that root."""
    if root_fstype is None:
        wanted = ("overlayfs", "livenet", "network") if netboot else ("overlayfs",)
        modules = ["dmsquash-live"] + [m for m in wanted if m in info.dracut_modules]
        layout = ["--add", " ".join(modules), "--add-drivers", f"{DISK_DRIVERS} {LIVE_DRIVERS}"]
    else:  # the kernel driver is enough for a one-device root (dracut's btrfs module needs btrfs-progs)
        layout = ["--add-drivers", f"{DISK_DRIVERS} {root_fstype}"]
    return ["dracut", "--force", "--no-hostonly", "--no-hostonly-cmdline", "--kver", info.kernel_version, *layout]


def build_initrd(info: RootfsInfo, dest: Path, scratch: Path, root_fstype: str | None = None,
                 netboot: bool = False) -> None:
    """Write the initrd for the image's newest kernel to `dest`: live (`netboot`: also over HTTP), or for an
    installed `root_fstype` root."""
    run([
        "unshare", "--user", "--map-root-user", "--mount", "--",
        "sh", "-c", SANDBOX_SCRIPT, "c2boot-initrd", info.root.absolute(), scratch.absolute(), dest.absolute(),
        *dracut_command(info, root_fstype, netboot),
    ], name="dracut (the image's, in a user namespace)")
