"""Legacy BIOS boot: syslinux on the ESP, started by boot code in the disk's first sector.

Nothing is mounted and no root is needed: the syslinux installer writes into the FAT filesystem inside disk.img
through mtools (`--offset`), the partition table is edited with sfdisk, and the boot code is 440 bytes written into
the image file. The syslinux files come from the system running the assemble stage (the rootbuilder), so the
installer and its ldlinux.c32 always match.
"""

import shutil
from collections.abc import Mapping
from pathlib import Path

from container2boot.bootloader import MENU_TIMEOUT, BootEntry
from container2boot.disk import PartitionTable, read_table
from container2boot.errors import C2BootError
from container2boot.run import require_tool, run
from container2boot.templates import render_to

SYSLINUX_DIR = "syslinux"  # on the ESP: syslinux.cfg, ldlinux.c32 and the installed ldlinux.sys
# Where distributions keep syslinux's BIOS files: Debian/Ubuntu, Arch, Fedora.
SYSLINUX_FILE_DIRS = ("/usr/lib/syslinux/mbr", "/usr/lib/syslinux/modules/bios", "/usr/lib/syslinux/bios",
                      "/usr/share/syslinux")
BOOT_CODE = {"gpt": "gptmbr.bin", "dos": "mbr.bin"}  # boots the partition marked bootable in that table
BOOT_CODE_BYTES = 440  # the MBR's code area; the disk signature and partition table follow it
LEGACY_BIOS_BOOTABLE = "LegacyBIOSBootable"  # GPT attribute bit 2: where gptmbr.bin looks for the boot partition


def syslinux_file(name: str) -> Path:
    for directory in SYSLINUX_FILE_DIRS:
        path = Path(directory) / name
        if path.is_file():
            return path
    raise C2BootError(f"syslinux's BIOS file {name} not found in {', '.join(SYSLINUX_FILE_DIRS)}: install "
                      "syslinux-common (Debian) / syslinux (Fedora), or run inside the rootbuilder container")


def install_files(esp: Path, entry: BootEntry) -> str:
    """Put syslinux's config (the same entry as GRUB's) and its core module on the ESP tree; returns the loader's
    name for the manifest. The tree then needs only `syslinux --install` to boot a BIOS machine."""
    require_tool("syslinux")
    directory = esp / SYSLINUX_DIR
    render_to(directory / "syslinux.cfg", "syslinux.cfg.j2", entry=entry, timeout=MENU_TIMEOUT)
    shutil.copyfile(syslinux_file("ldlinux.c32"), directory / "ldlinux.c32")
    return "syslinux (BIOS)"


def install_boot_code(disk: Path, env: Mapping[str, str] | None = None) -> PartitionTable:
    """Make `disk` boot under BIOS: mark its ESP bootable, write the boot code that fits its partition table, and
    install syslinux's boot sector and ldlinux.sys into the ESP's FAT filesystem. Returns the table as read back
    afterwards. `env` carries SOURCE_DATE_EPOCH, the time mtools stamps on ldlinux.sys."""
    table = read_table(disk)
    if table.label not in BOOT_CODE:
        raise C2BootError(f"{disk}: a {table.label} partition table cannot boot with BIOS here: use GPT or MBR")
    number, esp = table.esp()
    if table.label == "gpt" and LEGACY_BIOS_BOOTABLE not in esp.attrs.split():
        run(["sfdisk", "--part-attrs", disk, str(number), " ".join([*esp.attrs.split(), LEGACY_BIOS_BOOTABLE])])
    if table.label == "dos" and not esp.bootable:
        run(["sfdisk", "--activate", disk, str(number)])
    write_boot_code(disk, syslinux_file(BOOT_CODE[table.label]).read_bytes())
    run(["syslinux", "--install", "--offset", str(esp.start_bytes), "--directory", f"/{SYSLINUX_DIR}", disk],
        env=env)
    return read_table(disk)


def write_boot_code(disk: Path, code: bytes) -> None:
    """Replace the first sector's code area, leaving the disk signature and partition table after it alone."""
    if len(code) > BOOT_CODE_BYTES:
        raise C2BootError(f"boot code of {len(code)} bytes does not fit the MBR's {BOOT_CODE_BYTES}")
    with disk.open("r+b") as f:
        f.write(code)
