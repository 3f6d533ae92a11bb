"""End to end, installed layout: a writable ext4 root partition filled by systemd-repart in the rootbuilder, booted
under SeaBIOS and OVMF. The example machine's c2boot-ready line reports the root's type, mode and size and a boot
count kept on the root itself, so every claim below is the booted system's own word."""

import json
import re
import subprocess
from pathlib import Path

import pytest

from container2boot.disk import MiB, read_table
from tests.conftest import EXAMPLE_IMAGE, assert_rebuilt_identically, boot_evidence, c2boot, in_either_order

pytestmark = pytest.mark.slow
ROOT_TYPE = "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709"  # the discoverable x86-64 root partition type
SIZE = 3 * 1024 * MiB
READY = re.compile(r"container2boot: reached multi-user\.target, root filesystem (\S+) (\S+), size (\d+)M, "
                   r"boot (\d+)")


@pytest.fixture(scope="module")
def installed_build(example_build: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("installed") / "out"
    c2boot("build", "--image", EXAMPLE_IMAGE, "--diskimage", "--layout", "installed", "--size", "3G", "--bios",
           "-o", out)
    return out


def boot_writable(disk: Path, firmware: str) -> tuple[str, str, int, int]:
    """Boot `disk` letting the guest write to it; returns (fstype, mode, size MiB, boot count) as it reported."""
    console = boot_evidence(disk, in_either_order(READY.pattern, "login:"), firmware, snapshot=False)
    match = READY.search(console)
    assert match is not None
    return match.group(1), match.group(2), int(match.group(3)), int(match.group(4))


def test_installed_disk_layout_and_manifest(installed_build: Path) -> None:
    disk = installed_build / "disk.img"
    assert disk.stat().st_size == SIZE
    table = read_table(disk)
    esp, root = table.partitions
    assert esp.name == "C2BOOT" and "LegacyBIOSBootable" in esp.attrs
    assert root.type.upper() == ROOT_TYPE and esp.start_bytes + esp.size_bytes <= root.start_bytes
    assert root.start_bytes + root.size_bytes > SIZE - 2 * MiB  # the root takes the rest of the disk
    manifest = json.loads((installed_build / "manifest.json").read_text())
    assert manifest["boot"]["layout"] == "installed" and manifest["boot"]["firmware"] == ["uefi", "bios"]
    assert manifest["kernel"]["cmdline"].startswith(f"root=PARTUUID={root.uuid.lower()} rootfstype=ext4 rw ")
    assert not (installed_build / "esp/container2boot/squashfs.img").exists()


def test_the_installed_disk_is_the_same_bytes_when_built_again(installed_build: Path, tmp_path: Path) -> None:
    again = tmp_path / "out"
    c2boot("verify", installed_build, "-o", again)  # the options the manifest records: installed, 3G, --bios
    assert_rebuilt_identically(installed_build, again)


def test_installed_disk_is_writable_persists_and_grows(installed_build: Path, tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    subprocess.run(["cp", "--sparse=always", installed_build / "disk.img", disk], check=True)
    fstype, mode, size, boots = boot_writable(disk, "bios")
    assert (fstype, mode, boots) == ("ext4", "rw", 1)
    assert 2600 < size < 3072, "the root should fill the 3G disk"
    with disk.open("r+b") as f:  # as if the image were written to a larger disk
        f.truncate(SIZE + 1024 * MiB)
    fstype, mode, grown, boots = boot_writable(disk, "uefi")
    assert (fstype, mode, boots) == ("ext4", "rw", 2), "the first boot's write did not survive the reboot"
    assert grown > size + 900, f"the root did not grow into the larger disk: {size}M -> {grown}M"


def test_too_small_size_fails_before_the_slow_steps(example_build: Path, tmp_path: Path) -> None:
    result = c2boot("build", "--image", EXAMPLE_IMAGE, "--diskimage", "--layout", "installed", "--size", "200M",
                    "-o", tmp_path / "out", check=False)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert re.fullmatch(r"c2boot: error: --size 200M is smaller than the \d+M the content needs: use --size \d+M "
                        r"or more, or leave --size out", last), last
    assert "initrd" not in result.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fstype", ["xfs", "btrfs"])
def test_other_root_filesystems_boot_read_write(example_build: Path, tmp_path: Path, fstype: str) -> None:
    out = tmp_path / "out"
    c2boot("build", "--image", EXAMPLE_IMAGE, "--diskimage", "--layout", "installed", "--rootfs-type", fstype,
           "-o", out)
    assert boot_writable(out / "disk.img", "uefi")[:2] == (fstype, "rw")
