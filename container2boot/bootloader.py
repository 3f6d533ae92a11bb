"""The UEFI boot loader: GRUB on the ESP, loading the kernel and initrd with the live command line.

Where the machine image carries its distribution's signed shim and GRUB, those are used, so that Secure Boot works.
Otherwise the rootbuilder's GRUB makes a small unsigned EFI image with an embedded config that finds the ESP.
"""

import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from container2boot import cmdline
from container2boot.run import dracut_live_overlay_args, require_tool, run
from container2boot.templates import render_to

ESP_LABEL = "C2BOOT"
CONSOLE_ARGS = "console=tty0 console=ttyS0,115200"  # the screen and the first serial port
BOOT_DIR = "container2boot"  # the ESP directory that holds vmlinuz, initrd.img and the root image
MENU_TIMEOUT = 3
GRUB_MODULES = (
    "part_gpt", "part_msdos", "fat", "normal", "linux", "boot", "configfile", "search", "search_label",
    "search_fs_uuid", "echo", "test", "all_video", "efi_gop", "serial", "terminal", "gzio", "ls", "cat",
    "reboot", "halt", "sleep",
)


@dataclass(frozen=True)
class BootEntry:
    """The one description of what to boot; every boot loader config is rendered from it."""

    title: str
    kernel: str  # path on the ESP
    initrd: str
    cmdline: str

    def __post_init__(self) -> None:
        cmdline.check(self.cmdline, "the kernel command line")


@dataclass(frozen=True)
class SignedLoader:
    """A distribution's signed shim and GRUB inside the machine rootfs."""

    vendor: str  # the EFI/<vendor> directory its GRUB reads grub.cfg from
    shim: str
    grub: str
    mok_manager: str


SIGNED_LOADERS = (
    SignedLoader("debian", "usr/lib/shim/shimx64.efi.signed", "usr/lib/grub/x86_64-efi-signed/grubx64.efi.signed",
                 "usr/lib/shim/mmx64.efi.signed"),
    SignedLoader("fedora", "boot/efi/EFI/fedora/shimx64.efi", "boot/efi/EFI/fedora/grubx64.efi",
                 "boot/efi/EFI/fedora/mmx64.efi"),
)


def live_cmdline(extra: str, dracut_version: str | None = None, root_image: str = "squashfs.img") -> str:
    """dmsquash-live finds the ESP by its FAT label (the same on GPT and MBR disks and on a USB stick) and mounts
    the root image (squashfs or EROFS, whichever it holds) with a tmpfs overlay, asked for as the initrd's dracut
    (`dracut_version`) understands it."""
    base = (f"root=live:LABEL={ESP_LABEL} rd.live.dir=/{BOOT_DIR} rd.live.squashimg={root_image} "
            f"rd.live.image {dracut_live_overlay_args(dracut_version)} {CONSOLE_ARGS}")
    return f"{base} {extra}".strip()


def installed_cmdline(partuuid: str, fstype: str, extra: str) -> str:
    """The installed root, found by its GPT partition UUID (never a /dev/sdX or /dev/vdX name) and mounted
    read-write from the start."""
    return f"root=PARTUUID={partuuid} rootfstype={fstype} rw {CONSOLE_ARGS} {extra}".strip()


def find_signed_loader(rootfs: Path) -> SignedLoader | None:
    return next((s for s in SIGNED_LOADERS if (rootfs / s.shim).is_file() and (rootfs / s.grub).is_file()), None)


def install_bootloader(esp: Path, entry: BootEntry, roots: Sequence[Path], scratch: Path) -> str:
    """Write EFI/BOOT/BOOTX64.EFI and its grub.cfg, with the first signed shim and GRUB found in `roots` (the
    image's; for a supplied, signed kernel also the rootbuilder's own); returns which loader was installed, for
    the manifest."""
    boot = esp / "EFI" / "BOOT"
    boot.mkdir(parents=True, exist_ok=True)
    render_to(boot / "grub.cfg", "grub.cfg.j2", entry=entry, timeout=MENU_TIMEOUT)
    rootfs, signed = next(((r, found) for r in roots if (found := find_signed_loader(r)) is not None),
                          (Path("/"), None))
    if signed is not None:
        shutil.copyfile(rootfs / signed.shim, boot / "BOOTX64.EFI")
        shutil.copyfile(rootfs / signed.grub, boot / "grubx64.efi")
        if (rootfs / signed.mok_manager).is_file():
            shutil.copyfile(rootfs / signed.mok_manager, boot / "mmx64.efi")
        # Signed GRUB has its prefix built in as /EFI/<vendor>.
        vendor_dir = esp / "EFI" / signed.vendor
        vendor_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(boot / "grub.cfg", vendor_dir / "grub.cfg")
        return f"shim+grub (signed, {signed.vendor})"
    early = render_to(scratch / "grub-early.cfg", "grub-early.cfg.j2", label=ESP_LABEL, prefix="/EFI/BOOT")
    run([require_tool("grub-mkimage"), "--format", "x86_64-efi", "--output", boot / "BOOTX64.EFI",
         "--prefix", "/EFI/BOOT", "--config", early, *GRUB_MODULES])
    return "grub (unsigned)"
