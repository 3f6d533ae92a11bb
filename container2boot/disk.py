"""The disk image: a GPT disk holding the ESP (and, for the installed layout, the root partition), assembled by
systemd-repart without loop devices or privileges; for `--table mbr` its partition table is then rewritten as an
MBR (dos) table with the same partition.

systemd-repart's `--size=auto` does not account for vfat CopyFiles (the partition stays tiny and mcopy runs out of
space), so the ESP is sized from its content here: files rounded up to the largest FAT cluster, plus FAT tables
and a modest headroom.
"""

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from container2boot.bootloader import ESP_LABEL
from container2boot.errors import C2BootError
from container2boot.reproducible import Reproducible
from container2boot.run import check_version, require_tool, run
from container2boot.templates import render_to

if TYPE_CHECKING:
    from container2boot.rootpartition import RootPartition

MiB = 1024 * 1024
CLUSTER = 64 * 1024  # the largest cluster mkfs.vfat picks; rounding every file to it never undercounts
HEADROOM = 0.02
FIXED_OVERHEAD = 8 * MiB  # reserved sectors, FATs, root directory, alignment
MIN_ESP = 40 * MiB  # FAT32 with 512-byte sectors needs at least 65525 clusters


INITRD_ALLOWANCE = 64 * MiB  # a no-hostonly dracut initrd is about 40 MB, plus the boot loaders
GPT_OVERHEAD = 2 * MiB  # the partition table at the start and at the end, and alignment
ESP_TYPES = ("C12A7328-F81F-11D2-BA4B-00A0C93EC93B", "ef")  # on GPT, on MBR
MBR_ESP_TYPE = "ef"  # EFI System on MBR: UEFI firmware boots it, BIOS boot code ignores the type


@dataclass(frozen=True)
class Partition:
    name: str  # GPT only
    type: str  # a GUID on GPT, a hex byte on MBR
    start_bytes: int
    size_bytes: int
    attrs: str  # GPT attributes, e.g. "LegacyBIOSBootable"
    bootable: bool  # MBR's active flag
    uuid: str  # GPT only


@dataclass(frozen=True)
class PartitionTable:
    label: str  # sfdisk's name: "gpt" or "dos" (MBR)
    sector_size: int
    partitions: list[Partition]

    def esp(self) -> tuple[int, Partition]:
        """The ESP and its partition number (from 1)."""
        for number, partition in enumerate(self.partitions, start=1):
            if partition.type.upper() in (t.upper() for t in ESP_TYPES):
                return number, partition
        raise C2BootError(f"the disk has no EFI System Partition ({self.label} table)")


def tree_bytes(root: Path) -> int:
    """Space the tree takes on FAT: each file and directory rounded up to a whole cluster."""
    total = 0
    for directory, dirs, files in os.walk(root):
        total += CLUSTER * (1 + len(dirs) // 16)
        for name in files:
            size = os.lstat(os.path.join(directory, name)).st_size
            total += -(-size // CLUSTER) * CLUSTER
    return total


def esp_size(content_bytes: int) -> int:
    """Partition size for `content_bytes` of files: headroom and FAT overhead, whole MiB."""
    wanted = int(content_bytes * (1 + HEADROOM)) + FIXED_OVERHEAD
    return max(MIN_ESP, -(-wanted // MiB) * MiB)


def render_definitions(definitions: Path, esp: Path, size_bytes: int, root: "RootPartition | None" = None) -> None:
    render_to(definitions / "10-esp.conf", "repart.d/10-esp.conf.j2",
              label=ESP_LABEL, source=esp.absolute(), size_bytes=size_bytes)
    if root is not None:
        render_to(definitions / "20-root.conf", "repart.d/20-root.conf.j2", root=root)


def estimate_esp(kernel_bytes: int) -> int:
    """The ESP size before the initrd exists, for checking --size before the slow steps."""
    return esp_size(kernel_bytes + INITRD_ALLOWANCE)


def disk_size_needed(esp_bytes: int, root: "RootPartition | None") -> int:
    return esp_bytes + (root.min_bytes if root else 0) + GPT_OVERHEAD


def check_disk_size(size: int | None, needed: int) -> None:
    """A --size too small for the content fails here, before the slow steps, with the size that fits."""
    if size is not None and size < needed:
        fits = -(-needed // (100 * MiB)) * 100
        raise C2BootError(f"--size {size / MiB:.0f}M is smaller than the {needed / MiB:.0f}M the content needs: "
                          f"use --size {fits}M or more, or leave --size out")


def build_disk(esp: Path, dest: Path, scratch: Path, same: Reproducible, *, table: str = "gpt",
               root: "RootPartition | None" = None, size: int | None = None) -> int:
    """Write a new disk image `dest`: an ESP holding the tree `esp`, then the root partition when given, in a GPT
    or (`table` "mbr") an MBR partition table, `size` bytes large (default: what it holds), the same bytes for the
    same inputs and `same`. Returns the ESP size."""
    check_version("systemd-repart")
    for tool in ("mkfs.vfat", "mcopy", "sfdisk", *([f"mkfs.{root.fstype}"] if root else [])):
        require_tool(tool)
    esp_bytes = esp_size(tree_bytes(esp))
    check_disk_size(size, disk_size_needed(esp_bytes, root))
    definitions = scratch / "repart.d"
    render_definitions(definitions, esp, esp_bytes, root)
    run([
        "systemd-repart", f"--definitions={definitions}", "--empty=create", f"--size={size or 'auto'}",
        "--offline=yes", "--sector-size=512", "--dry-run=no", f"--seed={same.seed}", "--no-pager", dest,
    ], env=same.environment(), follow=True)
    if table == "mbr":
        convert_to_mbr(dest, same.mbr_label_id())
    return esp_bytes


def convert_to_mbr(disk: Path, label_id: str) -> None:
    """Replace the GPT of a one-partition disk by an MBR table with the same partition. The GPT headers (at the
    start and at the end of the disk) are wiped, so that no tool mistakes the disk for GPT."""
    table = read_table(disk)
    [esp] = table.partitions
    sector = table.sector_size
    script = (f"label: dos\nlabel-id: {label_id}\nstart={esp.start_bytes // sector}, size={esp.size_bytes // sector}, "
              f"type={MBR_ESP_TYPE}\n")
    run(["sfdisk", "--wipe=always", "--wipe-partitions=never", "--no-reread", "--no-tell-kernel", disk],
        input=script)


def read_table(disk: Path) -> PartitionTable:
    """The partition table as written on the image (read back, not from our inputs)."""
    table = json.loads(run(["sfdisk", "--json", disk], capture=True).stdout)["partitiontable"]
    sector = int(table.get("sectorsize", 512))
    partitions = [
        Partition(p.get("name", ""), p["type"], p["start"] * sector, p["size"] * sector, p.get("attrs", ""),
                  bool(p.get("bootable", False)), p.get("uuid", ""))
        for p in table.get("partitions", [])
    ]
    return PartitionTable(table["label"], sector, partitions)
