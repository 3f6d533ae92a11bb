"""End to end, legacy BIOS: `--bios` (hybrid GPT) and `--bios --table mbr` disks built by rootless podman and
systemd-repart in the rootbuilder, booted under SeaBIOS and OVMF. Each boot test passes only on evidence from the
booted system's serial console; the SeaBIOS boots must also show that syslinux loaded the kernel."""

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from container2boot.disk import read_table
from tests.conftest import EXAMPLE_IMAGE, READY, boot_evidence, c2boot, derived_image, in_either_order

pytestmark = pytest.mark.slow
BOOTED = in_either_order(READY, "c2boot-demo login:")
SYSLINUX_BANNER = "SYSLINUX 6."
UNSIGNED_IMAGE = "localhost/container2boot-tests/unsigned:latest"


@pytest.fixture(scope="module")
def hybrid_build(example_build: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Without the example's signed shim and GRUB, so that the GRUB container2boot makes boots under OVMF here
    (most images carry no signed loader)."""
    out = tmp_path_factory.mktemp("hybrid") / "out"
    with derived_image(UNSIGNED_IMAGE, "rm -f /usr/lib/shim/shimx64.efi.signed") as image:
        c2boot("build", "--image", image, "--diskimage", "--bios", "-o", out)
    yield out


@pytest.fixture(scope="module")
def mbr_build(example_build: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("mbr") / "out"
    c2boot("build", "--image", EXAMPLE_IMAGE, "--diskimage", "--bios", "--table", "mbr", "-o", out)
    return out


def test_hybrid_disk_layout_and_manifest(hybrid_build: Path, example_build: Path) -> None:
    """Also: the image differs from the example only outside the initrd (no signed shim), so the example's initrd
    is reused from the cache."""
    manifest = json.loads((hybrid_build / "manifest.json").read_text())
    assert manifest["cache"] == {"initrd": "reused", "outputs": "built"}
    initrd = "esp/container2boot/initrd.img"
    assert (hybrid_build / initrd).read_bytes() == (example_build / initrd).read_bytes()
    table = read_table(hybrid_build / "disk.img")
    assert table.label == "gpt"
    [esp] = table.partitions
    assert esp.name == "C2BOOT" and esp.attrs.split() == ["LegacyBIOSBootable"]
    assert (hybrid_build / "esp/syslinux/syslinux.cfg").is_file()
    assert (hybrid_build / "esp/syslinux/ldlinux.c32").is_file()
    boot_info = json.loads((hybrid_build / "manifest.json").read_text())["boot"]
    assert boot_info["firmware"] == ["uefi", "bios"] and boot_info["partition_table"] == "gpt"
    assert boot_info["bootloader"] == "grub (unsigned) + syslinux (BIOS)"
    assert boot_info["bootloader"].endswith("+ syslinux (BIOS)")


def test_mbr_disk_layout_and_manifest(mbr_build: Path) -> None:
    table = read_table(mbr_build / "disk.img")
    assert table.label == "dos"
    [esp] = table.partitions
    assert esp.type == "ef" and esp.bootable
    boot_info = json.loads((mbr_build / "manifest.json").read_text())["boot"]
    assert boot_info["firmware"] == ["uefi", "bios"] and boot_info["partition_table"] == "mbr"
    assert boot_info["bootloader"] == "shim+grub (signed, debian) + syslinux (BIOS)"  # the example's own


@pytest.mark.parametrize("firmware", ["bios", "uefi"])
@pytest.mark.parametrize("build", ["hybrid_build", "mbr_build"])
def test_disk_boots(build: str, firmware: str, request: pytest.FixtureRequest) -> None:
    """Both disks boot under SeaBIOS (through syslinux, whose banner shows) and OVMF (GRUB, no syslinux). Measured:
    OVMF boots EFI/BOOT/BOOTX64.EFI from an MBR partition of type EF, so the MBR disk keeps UEFI."""
    console = boot_evidence(request.getfixturevalue(build) / "disk.img", BOOTED, firmware)
    assert (SYSLINUX_BANNER in console) == (firmware == "bios")
