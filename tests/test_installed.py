"""The installed layout without podman: settings, sizing, the root partition's overlay (fstab, grow rule), its
repart definition, the kernel command line and dracut's command line."""

from pathlib import Path

import pytest

from container2boot.bootloader import installed_cmdline, live_cmdline
from container2boot.config import Config, parse_size
from container2boot.disk import MiB, check_disk_size, disk_size_needed, render_definitions
from container2boot.errors import C2BootError
from container2boot.initrd import InitrdJob, dracut_command
from container2boot.pipeline import assemble
from container2boot.plan import ImageConfig, decide
from container2boot.reproducible import decide as reproducible_decide
from container2boot.rootfs import examine_directory
from container2boot.rootpartition import (
    FSTAB,
    GROW_RULE,
    check_copyable,
    content_bytes,
    fstab_lines_without_root,
    prepare,
    root_size,
)
from container2boot.templates import render
from tests.conftest import c2boot
from tests.test_rootfs import make_rootfs

SAME = reproducible_decide(1700000000, "an image", [])


@pytest.mark.parametrize(("text", "size"), [("4G", 4 * 1024**3), ("1500M", 1500 * MiB), ("4GiB", 4 * 1024**3),
                                            ("2.5G", int(2.5 * 1024**3)), ("512k", 512 * 1024), ("4096", 4096)])
def test_sizes_are_parsed_in_powers_of_1024(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "4X", "G", "-1G", "0"])
def test_bad_sizes_say_what_a_size_looks_like(text: str) -> None:
    with pytest.raises(C2BootError, match=r"is not a size: use e\.g\. 4G or 1500M"):
        Config(diskimage=True, layout="installed", size=text)


def test_installed_settings_that_cannot_work_are_refused() -> None:
    assert Config(layout="installed").diskimage is True  # the root partition lives in disk.img
    with pytest.raises(C2BootError, match="GPT disks only"):
        Config(layout="installed", diskimage=True, bios=True, table="mbr")
    with pytest.raises(C2BootError, match="drop it for --layout installed"):
        Config(layout="installed", diskimage=True, compression="xz")
    with pytest.raises(C2BootError, match="add --layout installed"):
        Config(diskimage=True, size="4G")
    with pytest.raises(C2BootError, match="add --layout installed"):
        Config(diskimage=True, rootfs_type="xfs")
    with pytest.raises(C2BootError, match="unknown rootfs type 'zfs'"):
        Config(diskimage=True, layout="installed", rootfs_type="zfs")
    assert Config(diskimage=True, layout="installed", size="4G").size_bytes == 4 * 1024**3


def test_root_size_leaves_room_and_respects_mkfs_minimums() -> None:
    assert root_size(400 * MiB, "ext4") == 628 * MiB  # +25 % and 128 MiB
    assert root_size(1 * MiB, "xfs") == 300 * MiB
    assert root_size(400 * MiB, "btrfs") == 1140 * MiB  # mkfs.btrfs --rootdir needs much more metadata room


def test_content_bytes_counts_blocks(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d/a").write_bytes(b"x")
    (tmp_path / "d/b").write_bytes(b"x" * 4097)
    assert content_bytes(tmp_path) == (2 * 4096 + 4096) + (4096 + 256) + (8192 + 256)  # dirs, then files + inodes


def test_image_fstab_keeps_its_entries_but_not_its_root() -> None:
    fstab = "# comment\nUUID=1 / ext4 ro 0 1\n/dev/sdb1 /data xfs defaults 0 0\n\n"
    assert fstab_lines_without_root(fstab) == ["# comment", "/dev/sdb1 /data xfs defaults 0 0", ""]


def test_overlay_has_fstab_by_partuuid_and_grow_rule(tmp_path: Path) -> None:
    root = make_rootfs(tmp_path / "root")
    (root / FSTAB).write_text("# UNCONFIGURED FSTAB\nproc /proc proc defaults 0 0\n")
    partition = prepare(root, "ext4", tmp_path / "work", SAME)
    assert partition.overlay_files == (FSTAB, GROW_RULE) and partition.replaced == (FSTAB,)
    fstab = (partition.overlay / FSTAB).read_text().splitlines()
    assert fstab[:2] == ["# UNCONFIGURED FSTAB", "proc /proc proc defaults 0 0"]
    assert fstab[-1] == f"PARTUUID={partition.partuuid} / ext4 defaults,x-systemd.growfs 0 1"
    assert "[Partition]\nType=root\n" in (partition.overlay / GROW_RULE).read_text()
    assert partition.min_bytes >= 64 * MiB


def test_image_with_its_own_repart_rules_gets_no_grow_rule(tmp_path: Path) -> None:
    root = make_rootfs(tmp_path / "root")
    (root / "usr/lib/repart.d").mkdir(parents=True)
    (root / "usr/lib/repart.d/50-root.conf").write_text("[Partition]\nType=root\n")
    partition = prepare(root, "xfs", tmp_path / "work", SAME)
    assert partition.overlay_files == (FSTAB,) and partition.replaced == ()
    assert (partition.overlay / FSTAB).read_text().splitlines()[-1].endswith(" / xfs defaults,x-systemd.growfs 0 0")


def test_root_partition_definition(tmp_path: Path) -> None:
    root = make_rootfs(tmp_path / "root")
    (root / FSTAB).write_text("")
    partition = prepare(root, "ext4", tmp_path / "work", SAME)
    render_definitions(tmp_path / "defs", tmp_path / "esp", 100 * MiB, partition)
    lines = (tmp_path / "defs/20-root.conf").read_text().splitlines()
    assert [line for line in lines if not line.startswith("#")] == [
        "[Partition]", "Type=root", "Label=container2boot-root", f"UUID={partition.partuuid}", "Format=ext4",
        f"CopyFiles={root}:/", f"ExcludeFiles={root}/etc/fstab",
        f"CopyFiles={partition.overlay}/etc/fstab:/etc/fstab",
        f"CopyFiles={partition.overlay}/{GROW_RULE}:/{GROW_RULE}",
        f"SizeMinBytes={partition.min_bytes}",
    ]
    assert (tmp_path / "defs/10-esp.conf").is_file()


def test_too_small_size_names_a_size_that_fits(tmp_path: Path) -> None:
    root = make_rootfs(tmp_path / "root")
    partition = prepare(root, "ext4", tmp_path / "work", SAME)
    needed = disk_size_needed(60 * MiB, partition)
    assert needed == 60 * MiB + partition.min_bytes + 2 * MiB
    with pytest.raises(C2BootError, match=r"--size 100M is smaller than the 191M the content needs: use --size 200M "
                                          r"or more, or leave --size out"):
        check_disk_size(100 * MiB, needed)
    check_disk_size(needed, needed)
    check_disk_size(None, needed)


def test_installed_kernel_command_line_finds_root_by_partuuid_read_write() -> None:
    cmdline = installed_cmdline("1234-abcd", "ext4", "quiet")
    assert cmdline == "root=PARTUUID=1234-abcd rootfstype=ext4 rw console=tty0 console=ttyS0,115200 quiet"
    assert "/dev/" not in cmdline


def test_installed_initrd_has_the_filesystem_driver_and_no_live_modules(tmp_path: Path) -> None:
    root = make_rootfs(tmp_path / "root", live=False)
    report = examine_directory(root)
    argv = dracut_command(InitrdJob(root, report.dracut_modules, "106", "6.12.1-amd64", root_fstype="ext4"))
    assert "dmsquash-live" not in " ".join(argv) and "--add" not in argv
    assert argv[argv.index("--add-drivers") + 1].split()[-1] == "ext4"
    live = dracut_command(InitrdJob(root, report.dracut_modules, "106", "6.12.1-amd64"))
    assert live[live.index("--add") + 1] == "dmsquash-live"


def test_dracut_059_gets_its_own_live_arguments() -> None:
    assert "rd.live.overlay.overlayfs=1" in live_cmdline("", "059")
    assert "rd.live.overlay.readonly" in live_cmdline("", "106") and "overlayfs=1" not in live_cmdline("", "107")
    assert "rd.live.overlay.readonly" in live_cmdline("", None)  # unknown: a current dracut


def test_an_image_without_the_live_module_can_still_be_installed(tmp_path: Path) -> None:
    report = examine_directory(make_rootfs(tmp_path, live=False))
    assert report.initrd_ready("installed", False) and not report.initrd_ready("live", False)
    assert decide(report, ImageConfig(), Config(layout="installed")).kind == "machine"
    assert decide(report, ImageConfig(), Config()).kind == "own-kernel"  # the supplied dracut makes it


def test_cli_refuses_installed_mbr_at_once(tmp_path: Path) -> None:
    result = c2boot("build", "--layout", "installed", "--bios", "--table", "mbr", "-o", tmp_path / "out",
                    check=False)
    assert result.returncode == 1
    assert result.stderr.strip() == "c2boot: error: --layout installed makes GPT disks only: drop --table mbr " \
        "(--bios works with GPT)"
    assert list(tmp_path.iterdir()) == []


def test_host_assemble_refuses_sources_repart_would_skip(tmp_path: Path) -> None:
    """Outside the rootbuilder, a rootfs or output under /tmp would lose files silently: a clear error instead."""
    root = make_rootfs(tmp_path / "root")  # pytest's tmp_path is under /tmp
    with pytest.raises(C2BootError, match=r"is under /tmp or /var/tmp, which systemd-repart does not copy from"):
        assemble(root, Config(layout="installed", output=tmp_path / "out"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["root"]
    check_copyable(Path("/work"), Path("/home/someone/out"))


def test_fstab_template_without_image_entries() -> None:
    text = render("fstab.j2", kept=[], partuuid="u", fstype="btrfs", passno=0)
    assert text.splitlines()[-1] == "PARTUUID=u / btrfs defaults,x-systemd.growfs 0 0"
