"""The legacy-BIOS disk steps on a small real disk image: partition tables, attributes and boot code are read
back from the image with sfdisk and mtools, not taken from our inputs. Real tools, no privileges, fast.

The image is made here with sfdisk and mkfs.vfat because the host's systemd-repart may be too old; the end-to-end
tests run the same steps on the disks systemd-repart makes in the rootbuilder."""

import subprocess
from pathlib import Path

import pytest

from container2boot.bios import BOOT_CODE_BYTES, install_boot_code, install_files, syslinux_file, write_boot_code
from container2boot.bootloader import ESP_LABEL, BootEntry, live_cmdline
from container2boot.disk import MiB, convert_to_mbr, read_table
from container2boot.errors import C2BootError
from tests.conftest import require_host_tools

ENTRY = BootEntry("Test OS", "/container2boot/vmlinuz", "/container2boot/initrd.img", live_cmdline(""))
ESP_START = 1 * MiB
ESP_SIZE = 40 * MiB
GPT_SIGNATURE = b"EFI PART"


@pytest.fixture
def gpt_disk(tmp_path: Path) -> Path:
    """A GPT disk like the one systemd-repart writes: one ESP named C2BOOT with a FAT32 labelled C2BOOT, holding
    an ESP tree with the BIOS files."""
    require_host_tools("sfdisk", "mkfs.vfat", "mcopy", "syslinux")
    disk = tmp_path / "disk.img"
    with disk.open("wb") as f:
        f.truncate(ESP_START + ESP_SIZE + MiB)
    subprocess.run(["sfdisk", "--quiet", disk], check=True, text=True,
                   input=f"label: gpt\nstart={ESP_START // 512}, size={ESP_SIZE // 512}, type=uefi, name={ESP_LABEL}\n")
    subprocess.run(["mkfs.vfat", "-F", "32", "-S", "512", "-n", ESP_LABEL, "--offset", str(ESP_START // 512),
                    disk, str(ESP_SIZE // 1024)], check=True, capture_output=True)
    tree = tmp_path / "esp"
    install_files(tree, ENTRY)
    subprocess.run(["mcopy", "-s", "-i", f"{disk}@@{ESP_START}", tree / "syslinux", "::/"], check=True)
    return disk


def esp_file(disk: Path, path: str) -> bytes:
    return subprocess.run(["mtype", "-i", f"{disk}@@{ESP_START}", f"::/{path}"], check=True,
                          capture_output=True).stdout


def esp_listing(disk: Path, directory: str) -> str:
    return subprocess.run(["mdir", "-a", "-b", "-i", f"{disk}@@{ESP_START}", f"::/{directory}"], check=True,
                          capture_output=True, text=True).stdout


def test_hybrid_gpt_gets_the_bios_boot_attribute_gptmbr_and_ldlinux(gpt_disk: Path) -> None:
    table = install_boot_code(gpt_disk)
    reread = read_table(gpt_disk)
    assert table == reread and reread.label == "gpt"
    [esp] = reread.partitions
    assert esp.attrs.split() == ["LegacyBIOSBootable"]
    assert (esp.name, esp.start_bytes, esp.size_bytes) == (ESP_LABEL, ESP_START, ESP_SIZE)
    head = gpt_disk.read_bytes()[:512]
    assert head[:BOOT_CODE_BYTES] == syslinux_file("gptmbr.bin").read_bytes().ljust(BOOT_CODE_BYTES, b"\0")
    assert head[450] == 0xEE and head[510:] == b"\x55\xaa"  # the protective MBR entry survives the boot code
    assert "ldlinux.sys" in esp_listing(gpt_disk, "syslinux")
    assert esp_file(gpt_disk, "syslinux/syslinux.cfg").decode().count(ENTRY.cmdline) == 1


def test_installing_twice_keeps_one_attribute(gpt_disk: Path) -> None:
    install_boot_code(gpt_disk)
    [esp] = install_boot_code(gpt_disk).partitions
    assert esp.attrs.split() == ["LegacyBIOSBootable"]


def test_mbr_table_keeps_the_partition_and_its_filesystem(gpt_disk: Path) -> None:
    convert_to_mbr(gpt_disk, "0x1234abcd")
    table = install_boot_code(gpt_disk)
    assert table.label == "dos"
    [esp] = table.partitions
    assert (esp.type, esp.bootable, esp.start_bytes, esp.size_bytes) == ("ef", True, ESP_START, ESP_SIZE)
    data = gpt_disk.read_bytes()
    assert data[:BOOT_CODE_BYTES] == syslinux_file("mbr.bin").read_bytes().ljust(BOOT_CODE_BYTES, b"\0")
    assert GPT_SIGNATURE not in data[512:1024] and GPT_SIGNATURE not in data[-512:], "GPT headers left behind"
    blkid = subprocess.run(["blkid", "-p", "-o", "export", gpt_disk], capture_output=True, text=True).stdout
    assert "PTTYPE=dos" in blkid and "PTUUID=1234abcd" in blkid  # the disk signature given, not a random one
    assert "ldlinux.sys" in esp_listing(gpt_disk, "syslinux")
    assert ENTRY.cmdline in esp_file(gpt_disk, "syslinux/syslinux.cfg").decode()


def test_boot_code_that_does_not_fit_is_refused(tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"\1" * 1024)
    with pytest.raises(C2BootError, match="does not fit"):
        write_boot_code(disk, b"\0" * (BOOT_CODE_BYTES + 1))
    assert disk.read_bytes() == b"\1" * 1024


def test_a_disk_without_an_esp_is_refused(tmp_path: Path) -> None:
    require_host_tools("sfdisk")
    disk = tmp_path / "disk.img"
    with disk.open("wb") as f:
        f.truncate(8 * MiB)
    subprocess.run(["sfdisk", "--quiet", disk], check=True, text=True, input="label: gpt\n")
    with pytest.raises(C2BootError, match="the disk has no EFI System Partition"):
        install_boot_code(disk)
