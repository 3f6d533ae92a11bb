"""Rendering: GRUB and repart.d come from the templates, driven by one BootEntry."""

from pathlib import Path

from container2boot.bootloader import BootEntry, live_cmdline
from container2boot.disk import render_definitions
from container2boot.templates import render

ENTRY = BootEntry("Test OS (container2boot live)", "/container2boot/vmlinuz", "/container2boot/initrd.img",
                  live_cmdline("quiet"))


def test_live_cmdline_defaults_and_extra() -> None:
    cmdline = live_cmdline("quiet systemd.unit=rescue.target")
    assert cmdline.startswith("root=live:PARTLABEL=C2BOOT rd.live.dir=/container2boot rd.live.squashimg=squashfs.img")
    assert "console=tty0 console=ttyS0,115200" in cmdline
    assert cmdline.endswith("quiet systemd.unit=rescue.target")
    assert "rd.live.overlay=" not in cmdline  # without a persistent overlay it waits forever at "Press Enter"


def test_grub_cfg_boots_the_entry() -> None:
    cfg = render("grub.cfg.j2", entry=ENTRY, timeout=3)
    assert "menuentry 'Test OS (container2boot live)'" in cfg
    assert f"linux /container2boot/vmlinuz {ENTRY.cmdline}\n" in cfg
    assert "initrd /container2boot/initrd.img\n" in cfg
    assert "serial --unit=0 --speed=115200" in cfg and "set timeout=3" in cfg


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
