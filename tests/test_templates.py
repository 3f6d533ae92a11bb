"""Rendering: GRUB, syslinux and repart.d come from the templates; both boot loaders from one BootEntry."""

import re
from pathlib import Path

import pytest

from container2boot.bios import install_files, syslinux_file
from container2boot.bootloader import BootEntry, live_cmdline
from container2boot.disk import render_definitions
from container2boot.templates import render
from tests.conftest import require_host_tools

ENTRY = BootEntry("Test OS (container2boot live)", "/container2boot/vmlinuz", "/container2boot/initrd.img",
                  live_cmdline("quiet"))


def test_live_cmdline_defaults_and_extra() -> None:
    cmdline = live_cmdline("quiet systemd.unit=rescue.target")
    assert cmdline.startswith("root=live:LABEL=C2BOOT rd.live.dir=/container2boot rd.live.squashimg=squashfs.img")
    assert "console=tty0 console=ttyS0,115200" in cmdline
    assert cmdline.endswith("quiet systemd.unit=rescue.target")
    assert "rd.live.overlay=" not in cmdline  # without a persistent overlay it waits forever at "Press Enter"


def test_grub_cfg_boots_the_entry() -> None:
    cfg = render("grub.cfg.j2", entry=ENTRY, timeout=3)
    assert "menuentry 'Test OS (container2boot live)'" in cfg
    words = " ".join(f"'{word}'" for word in ENTRY.cmdline.split())
    assert f"linux /container2boot/vmlinuz {words}\n" in cfg
    assert "initrd /container2boot/initrd.img\n" in cfg
    assert "serial --unit=0 --speed=115200" in cfg and "set timeout=3" in cfg


def test_syslinux_cfg_boots_the_entry_on_the_serial_console() -> None:
    cfg = render("syslinux.cfg.j2", entry=ENTRY, timeout=3)
    lines = [line.strip() for line in cfg.splitlines()]
    assert lines[1:5] == ["SERIAL 0 115200", "PROMPT 0", "TIMEOUT 30", "DEFAULT container2boot"]
    assert "LABEL container2boot" in lines and "MENU LABEL Test OS (container2boot live)" in lines


def boot_triple_from_grub(cfg: str) -> tuple[str, str, str]:
    """GRUB's view: its script words with their single quotes taken off."""
    [linux] = re.findall(r"^\s*linux (\S+) (.*)$", cfg, re.MULTILINE)
    [initrd] = re.findall(r"^\s*initrd (\S+)$", cfg, re.MULTILINE)
    words = re.findall(r"'([^']*)'", linux[1])
    assert " ".join(f"'{w}'" for w in words) == linux[1], "every argument is one single-quoted GRUB word"
    return linux[0], initrd, " ".join(words)


def boot_triple_from_syslinux(cfg: str) -> tuple[str, str, str]:
    [kernel] = re.findall(r"^\s*LINUX (\S+)$", cfg, re.MULTILINE)
    [initrd] = re.findall(r"^\s*INITRD (\S+)$", cfg, re.MULTILINE)
    [append] = re.findall(r"^\s*APPEND (.*)$", cfg, re.MULTILINE)
    return kernel, initrd, append


@pytest.mark.parametrize("extra", ["", "quiet", "systemd.unit=rescue.target console=ttyS1,9600 foo=a,b"])
def test_grub_and_syslinux_boot_the_same_kernel_initrd_and_arguments(extra: str) -> None:
    entry = BootEntry("OS", "/container2boot/vmlinuz", "/container2boot/initrd.img", live_cmdline(extra))
    grub = boot_triple_from_grub(render("grub.cfg.j2", entry=entry, timeout=3))
    syslinux = boot_triple_from_syslinux(render("syslinux.cfg.j2", entry=entry, timeout=3))
    assert grub == syslinux == (entry.kernel, entry.initrd, entry.cmdline)


def test_bios_files_on_the_esp_tree(tmp_path: Path) -> None:
    """The ESP tree carries syslinux's config and core module, so the tree alone can be made BIOS-bootable."""
    require_host_tools("syslinux")
    assert install_files(tmp_path, ENTRY) == "syslinux (BIOS)"
    assert (tmp_path / "syslinux/syslinux.cfg").read_text() == render("syslinux.cfg.j2", entry=ENTRY, timeout=3)
    assert (tmp_path / "syslinux/ldlinux.c32").read_bytes() == syslinux_file("ldlinux.c32").read_bytes()


def test_grub_early_cfg_searches_the_label() -> None:
    cfg = render("grub-early.cfg.j2", label="C2BOOT", prefix="/EFI/BOOT")
    assert "search --no-floppy --label C2BOOT --set=root" in cfg
    assert "configfile $prefix/grub.cfg" in cfg


def test_repart_definition(tmp_path: Path) -> None:
    esp = tmp_path / "esp"
    render_definitions(tmp_path / "defs", esp, 123 * 1024 * 1024)
    conf = (tmp_path / "defs/10-esp.conf").read_text()
    for line in ("Type=esp", "Label=C2BOOT", "Format=vfat", f"CopyFiles={esp}:/",
                 "SizeMinBytes=128974848", "SizeMaxBytes=128974848"):
        assert f"\n{line}\n" in conf, line


def test_repo_repart_d_is_the_packaged_template() -> None:
    repo = Path(__file__).parent.parent
    assert (repo / "container2boot/templates/repart.d/10-esp.conf.j2").read_text() == \
        (repo / "repart.d/10-esp.conf.j2").read_text()
