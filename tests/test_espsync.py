"""`c2boot esp sync`: refusals, and real syncs into a FAT image (mkfs.vfat + mtools) and into a directory that a
mount table says is a FAT mount (mounting a real FAT filesystem needs root, which the tests do not have)."""

import hashlib
import os
import subprocess
from pathlib import Path

import pytest

from container2boot.errors import C2BootError
from container2boot.espsync import fat_label, mount_of, parse_mountinfo, sync
from tests.conftest import c2boot, require_host_tools

MTOOLS = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}


def esp_out(tmp_path: Path) -> Path:
    out = tmp_path / "out"
    for name, size in (("EFI/BOOT/BOOTX64.EFI", 5000), ("EFI/BOOT/grub.cfg", 300),
                       ("container2boot/vmlinuz", 300_000), ("container2boot/squashfs.img", 2_000_000)):
        path = out / "esp" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(size))
    return out


def fat_image(tmp_path: Path, label: str = "C2BOOT") -> Path:
    require_host_tools("mkfs.vfat", "mcopy", "mdir")
    image = tmp_path / "stick.img"
    subprocess.run(["mkfs.vfat", "-C", "-n", label, image, "16384"], check=True, capture_output=True)
    return image


def read_back(image: Path, name: str, tmp_path: Path) -> bytes:
    copy = tmp_path / "read-back"
    copy.unlink(missing_ok=True)
    subprocess.run(["mcopy", "-n", "-i", image, f"::/{name}", copy], check=True, env=MTOOLS)
    return copy.read_bytes()


def mountinfo(*mounts: tuple[Path | str, str, str]) -> str:
    return "".join(f"{n} 1 8:{n} / {point} rw,relatime shared:1 - {fstype} {source} rw\n"
                   for n, (point, fstype, source) in enumerate(mounts, 20))


def test_sync_into_a_fat_image_copies_then_skips_then_deletes_stale_files(tmp_path: Path) -> None:
    out, image = esp_out(tmp_path), fat_image(tmp_path)
    dry = sync(out, image, dry_run=True)
    assert len(dry.copy) == 4 and subprocess.run(["mdir", "-i", image, "-/", "-b", "::"], env=MTOOLS,
                                                 capture_output=True, text=True).stdout == ""
    sync(out, image)
    for name in ("EFI/BOOT/BOOTX64.EFI", "container2boot/squashfs.img"):
        assert read_back(image, name, tmp_path) == (out / "esp" / name).read_bytes()
    again = sync(out, image)
    assert again.copy == [] and len(again.unchanged) == 4
    (out / "esp" / "container2boot" / "vmlinuz").write_bytes(b"new kernel")
    (out / "esp" / "EFI" / "BOOT" / "grub.cfg").unlink()
    subprocess.run(["mcopy", "-i", image, out / "esp" / "container2boot" / "vmlinuz", "::/user-notes.txt"],
                   check=True, env=MTOOLS)
    changed = sync(out, image, delete=True)
    assert changed.copy == ["container2boot/vmlinuz"] and changed.delete == ["efi/boot/grub.cfg"]
    assert read_back(image, "container2boot/vmlinuz", tmp_path) == b"new kernel"
    listing = subprocess.run(["mdir", "-i", image, "-/", "-b", "::"], env=MTOOLS, capture_output=True,
                             text=True).stdout
    assert "::/user-notes.txt" in listing and "grub.cfg" not in listing  # only the ESP's directories are pruned


def test_a_target_not_labelled_c2boot_gets_a_warning(tmp_path: Path) -> None:
    out, image = esp_out(tmp_path), fat_image(tmp_path, label="MYSTICK")
    assert fat_label(image) == "MYSTICK"
    result = c2boot("esp", "sync", out, image, "--dry-run")
    assert "labelled 'MYSTICK', not C2BOOT" in result.stderr and "fatlabel" in result.stderr


def test_non_fat_targets_are_refused(tmp_path: Path) -> None:
    out = esp_out(tmp_path)
    plain = tmp_path / "plain"
    plain.mkdir()
    result = c2boot("esp", "sync", out, plain, check=False)  # a directory on the host's own filesystem
    assert result.returncode == 1 and "not a mounted FAT one" in result.stderr
    assert list(plain.iterdir()) == []
    not_fat = tmp_path / "file.img"
    not_fat.write_bytes(b"\0" * 4096)
    result = c2boot("esp", "sync", out, not_fat, check=False)
    assert result.returncode == 1 and "is not a FAT filesystem" in result.stderr
    result = c2boot("esp", "sync", out, tmp_path / "missing", check=False)
    assert result.returncode == 1 and "does not exist" in result.stderr
    result = c2boot("esp", "sync", tmp_path, fat_image(tmp_path), check=False)
    assert result.returncode == 1 and "not an ESP tree" in result.stderr


def test_the_hosts_own_esp_is_refused(tmp_path: Path) -> None:
    out = esp_out(tmp_path)
    stick = tmp_path / "stick"
    stick.mkdir()
    table = mountinfo(("/", "ext4", "/dev/sda2"), ("/boot/efi", "vfat", "/dev/sda1"), (stick, "vfat", "/dev/sda1"))
    with pytest.raises(C2BootError, match="this host's own EFI System Partition"):
        sync(out, stick, mountinfo=table)
    assert list(stick.iterdir()) == []


def test_sync_into_a_mounted_fat_directory_is_rsync_like(tmp_path: Path) -> None:
    out = esp_out(tmp_path)
    stick = tmp_path / "stick"
    stick.mkdir()
    table = mountinfo(("/", "ext4", "/dev/sda2"), ("/boot/efi", "vfat", "/dev/sda1"), (stick, "vfat", "/dev/sdb1"))
    plan = sync(out, stick, mountinfo=table)
    assert len(plan.copy) == 4
    for name in plan.copy:
        assert hashlib.sha256((stick / name).read_bytes()).digest() == \
            hashlib.sha256((out / "esp" / name).read_bytes()).digest()
    assert not list(stick.rglob("*.c2boot-partial"))
    assert sync(out, stick, mountinfo=table).copy == []  # same size and time: unchanged
    (stick / "EFI" / "BOOT" / "stale.efi").write_bytes(b"old")
    assert sync(out, stick, dry_run=True, delete=True, mountinfo=table).delete == ["efi/boot/stale.efi"]
    assert (stick / "EFI" / "BOOT" / "stale.efi").exists()  # --dry-run changed nothing


def test_mount_table_parsing_finds_the_innermost_mount(tmp_path: Path) -> None:
    mounts = parse_mountinfo(mountinfo(("/", "ext4", "/dev/sda2"), ("/media/me/C2\\040BOOT", "vfat", "/dev/sdb1")))
    assert mounts[1].point == Path("/media/me/C2 BOOT")
    assert mount_of(Path("/media/me/C2 BOOT/EFI"), mounts).fstype == "vfat"
    assert mount_of(Path("/media/me"), mounts).fstype == "ext4"
