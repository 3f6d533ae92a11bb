"""The disk image: a GPT disk holding the ESP, assembled by systemd-repart without loop devices or privileges;
for `--table mbr` its partition table is then rewritten as an MBR (dos) table with the same partition.

systemd-repart's `--size=auto` does not account for vfat CopyFiles (the partition stays tiny and mcopy runs out of
space), so the ESP is sized from its content here: files rounded up to the largest FAT cluster, plus FAT tables
and a modest headroom.
"""

import json
import os
from dataclasses import dataclass
from pathlib import Path

from container2boot.bootloader import ESP_LABEL
from container2boot.run import check_version, require_tool, run
from container2boot.templates import render_to

MiB = 1024 * 1024
CLUSTER = 64 * 1024  # the largest cluster mkfs.vfat picks; rounding every file to it never undercounts
HEADROOM = 0.02
FIXED_OVERHEAD = 8 * MiB  # reserved sectors, FATs, root directory, alignment
MIN_ESP = 40 * MiB  # FAT32 with 512-byte sectors needs at least 65525 clusters


MBR_ESP_TYPE = "ef"  # EFI System on MBR: UEFI firmware boots it, BIOS boot code ignores the type


@dataclass(frozen=True)
class Partition:
    name: str  # GPT only
    type: str  # a GUID on GPT, a hex byte on MBR
    start_bytes: int
    size_bytes: int
    attrs: str  # GPT attributes, e.g. "LegacyBIOSBootable"
    bootable: bool  # MBR's active flag


@dataclass(frozen=True)
class PartitionTable:
    label: str  # sfdisk's name: "gpt" or "dos" (MBR)
    sector_size: int
    partitions: list[Partition]


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


def render_definitions(definitions: Path, esp: Path, size_bytes: int) -> None:
    render_to(definitions / "10-esp.conf", "repart.d/10-esp.conf.j2",
              label=ESP_LABEL, source=esp.absolute(), size_bytes=size_bytes)


def build_disk(esp: Path, dest: Path, scratch: Path, table: str = "gpt") -> int:
    """Write a new disk image `dest` whose one partition is an ESP holding the tree `esp`, with a GPT or an MBR
    (`table` "mbr") partition table; returns the ESP size in bytes."""
    check_version("systemd-repart")
    for tool in ("mkfs.vfat", "mcopy", "sfdisk"):
        require_tool(tool)
    size = esp_size(tree_bytes(esp))
    definitions = scratch / "repart.d"
    render_definitions(definitions, esp, size)
    run([
        "systemd-repart", f"--definitions={definitions}", "--empty=create", "--size=auto", "--offline=yes",
        "--sector-size=512", "--dry-run=no", "--seed=random", "--no-pager", dest,
    ])
    if table == "mbr":
        convert_to_mbr(dest)
    return size


def convert_to_mbr(disk: Path) -> None:
    """Replace the GPT of a one-partition disk by an MBR table with the same partition. The GPT headers (at the
    start and at the end of the disk) are wiped, so that no tool mistakes the disk for GPT."""
    table = read_table(disk)
    [esp] = table.partitions
    sector = table.sector_size
    script = (f"label: dos\nstart={esp.start_bytes // sector}, size={esp.size_bytes // sector}, "
              f"type={MBR_ESP_TYPE}\n")
    run(["sfdisk", "--wipe=always", "--wipe-partitions=never", "--no-reread", "--no-tell-kernel", disk],
        input=script)


def read_table(disk: Path) -> PartitionTable:
    """The partition table as written on the image (read back, not from our inputs)."""
    table = json.loads(run(["sfdisk", "--json", disk], capture=True).stdout)["partitiontable"]
    sector = int(table.get("sectorsize", 512))
    partitions = [
        Partition(p.get("name", ""), p["type"], p["start"] * sector, p["size"] * sector, p.get("attrs", ""),
                  bool(p.get("bootable", False)))
        for p in table.get("partitions", [])
    ]
    return PartitionTable(table["label"], sector, partitions)
