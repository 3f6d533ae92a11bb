"""The live root image: squashfs or EROFS, the packer's arguments, and the checks that the booted kernel and the
initrd's dracut can mount it (the e2e test boots an EROFS root)."""

import dataclasses
from pathlib import Path

import pytest

from container2boot import netboot, rootimage
from container2boot.bootloader import live_cmdline
from container2boot.config import Config
from container2boot.errors import C2BootError
from container2boot.pipeline import Sources, output_bytes, root_description
from container2boot.reproducible import decide
from container2boot.rootfs import examine_directory
from tests.test_rootfs import make_rootfs

SAME = decide(1700000000, "an image", [])
TRIXIE_KERNEL = "CONFIG_EROFS_FS=m\nCONFIG_EROFS_FS_ZIP=y\nCONFIG_EROFS_FS_ZIP_LZMA=y\nCONFIG_EROFS_FS_ZIP_ZSTD=y\n"
BOOKWORM_KERNEL = "CONFIG_EROFS_FS=m\nCONFIG_EROFS_FS_ZIP=y\nCONFIG_EROFS_FS_ZIP_LZMA=y\n"  # no zstd before 6.10


@pytest.fixture(autouse=True)
def tools_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    """The packers live in the rootbuilder, not on the test host: their arguments are what is checked here."""
    monkeypatch.setattr(rootimage, "require_tool", lambda name: name)


def kernel_tree(tmp_path: Path, config_text: str | None, where: str = "boot/config-6.12.0") -> Path:
    if config_text is not None:
        (tmp_path / where).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / where).write_text(config_text)
    return tmp_path


def test_erofs_is_packed_from_tar_with_the_seed_and_the_source_date() -> None:
    command = rootimage.pack_command("erofs", Path("/out/erofs.img"), "zstd", SAME)
    assert command == ["mkfs.erofs", "--quiet", "--tar=f", "-zzstd", "-C65536", "-T1700000000", "--mkfs-time",
                       f"-U{SAME.uuid('erofs')}", "/out/erofs.img"]
    assert "-zlz4hc" in rootimage.pack_command("erofs", Path("x"), "lz4", SAME)
    assert "-zlzma" in rootimage.pack_command("erofs", Path("x"), "xz", SAME)
    assert rootimage.pack_command("squashfs", Path("/out/squashfs.img"), "xz", SAME)[-3:] == \
        ["--compressor", "xz", "/out/squashfs.img"]


def test_the_file_and_the_kernel_argument_follow_the_root_format() -> None:
    assert "rd.live.squashimg=erofs.img" in live_cmdline("", "106", rootimage.FILES["erofs"])
    assert "rd.live.squashimg=squashfs.img" in live_cmdline("", "106")
    assert root_description(Config(root_format="erofs", compression="lz4"), None) == \
        "erofs.img (erofs, lz4) with a tmpfs overlay"
    squashfs, erofs = (output_bytes(10**9, Config(root_format=f)) for f in ("squashfs", "erofs"))
    assert erofs > squashfs + 10**9  # mkfs.erofs keeps the files uncompressed in the image file while it packs


def test_netboot_serves_whichever_root_image_the_build_made(tmp_path: Path) -> None:
    boot_dir = tmp_path / "esp/container2boot"
    boot_dir.mkdir(parents=True)
    with pytest.raises(C2BootError, match=r"has no esp/container2boot/squashfs\.img or erofs\.img: network boots"):
        netboot.boot_files(tmp_path, {"boot": {"netboot": True}})
    (boot_dir / "erofs.img").write_bytes(b"")
    assert netboot.boot_files(tmp_path, {"boot": {"netboot": True}}) == boot_dir
    assert netboot.root_image(boot_dir) == "erofs.img"
    (boot_dir / "squashfs.img").write_bytes(b"")
    assert netboot.root_image(boot_dir, "root=live:LABEL=C2BOOT rd.live.squashimg=erofs.img") == "erofs.img"


def test_an_installed_disk_has_no_root_image_and_unknown_formats_are_refused() -> None:
    with pytest.raises(C2BootError, match="--root-format sets the live layout's root image: drop it"):
        Config(layout="installed", root_format="erofs")
    with pytest.raises(C2BootError, match="unknown root format 'ext4': use one of squashfs, erofs"):
        Config(root_format="ext4")


def test_a_kernel_that_reads_erofs_with_the_compressor_passes(tmp_path: Path) -> None:
    rootimage.check_bootable("erofs", "zstd", kernel_tree(tmp_path, TRIXIE_KERNEL), "6.12.0", "106")
    rootimage.check_bootable("erofs", "lz4", kernel_tree(tmp_path, BOOKWORM_KERNEL), "6.12.0", "106")
    fedora = kernel_tree(tmp_path / "f", TRIXIE_KERNEL, "usr/lib/modules/6.15.1/config")
    rootimage.check_bootable("erofs", "zstd", fedora, "6.15.1", "105")
    rootimage.check_bootable("erofs", "zstd", kernel_tree(tmp_path / "none", None), "6.12.0", None)  # not known
    rootimage.check_bootable("squashfs", "lzo", kernel_tree(tmp_path / "old", ""), "4.19.0", "049")  # unchecked


def test_a_kernel_without_the_compressor_names_the_ones_it_reads(tmp_path: Path) -> None:
    with pytest.raises(C2BootError, match=r"kernel 6\.12\.0 cannot read zstd-compressed EROFS \(no "
                                          r"CONFIG_EROFS_FS_ZIP_ZSTD\): use --compression xz or lz4, or"):
        rootimage.check_bootable("erofs", "zstd", kernel_tree(tmp_path, BOOKWORM_KERNEL), "6.12.0", "106")
    with pytest.raises(C2BootError, match=r"CONFIG_EROFS_FS_ZIP\): use --root-format squashfs"):
        rootimage.check_bootable("erofs", "lz4", kernel_tree(tmp_path, "CONFIG_EROFS_FS=y\n"), "6.12.0", "106")
    with pytest.raises(C2BootError, match=r"kernel 6\.12\.0 cannot read EROFS \(no CONFIG_EROFS_FS\)"):
        rootimage.check_bootable("erofs", "lz4", kernel_tree(tmp_path, "# CONFIG_EROFS_FS is not set\n"), "6.12.0",
                                 "106")


def test_an_old_dracut_or_lzo_is_refused(tmp_path: Path) -> None:
    with pytest.raises(C2BootError, match=r"the initrd's dracut 059 cannot mount an EROFS root \(dracut 103 or newer"):
        rootimage.check_bootable("erofs", "zstd", kernel_tree(tmp_path, TRIXIE_KERNEL), "6.12.0", "059")
    with pytest.raises(C2BootError, match="EROFS cannot be compressed with lzo: use --compression zstd, xz, gzip"):
        Config(root_format="erofs", compression="lzo")


def test_an_image_with_its_own_kernel_boots_that_kernel_even_with_the_kernel_images_dracut(tmp_path: Path) -> None:
    """own-kernel: the kernel image lends its dracut only; vmlinuz (and its configuration) stay the image's, whose
    modules the initrd holds. (Found in review: the kernel image's vmlinuz was booted with the image's modules.)"""
    image = examine_directory(make_rootfs(tmp_path / "image", kernels=("6.1.0-40-amd64",), dracut=False))
    kernel_image = examine_directory(make_rootfs(tmp_path / "kernel", kernels=("6.12.57-amd64",)))
    sources = Sources(tmp_path / "image", image, tmp_path / "kernel", kernel_image)
    assert sources.kernel_tree == (tmp_path / "image", image)
    assert sources.kernel_tree[1].kernel_image_path == tmp_path / "image/boot/vmlinuz-6.1.0-40-amd64"
    supplied = dataclasses.replace(sources, kernel_supplied=True)
    assert supplied.kernel_tree == (tmp_path / "kernel", kernel_image)
