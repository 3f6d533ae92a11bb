"""Rootfs inspection: kernel selection in version order, and the errors that name the package to add."""

import re
from pathlib import Path

import pytest

from container2boot.rootfs import examine_directory, find_kernels, parse_os_release, version_key
from container2boot.tree import Tree

ELF_X86_64 = b"\x7fELF\x02\x01\x01" + bytes(11) + b"\x3e\x00" + bytes(44)


def make_rootfs(root: Path, *, os_id: str = "debian", kernels: tuple[str, ...] = ("6.12.1-amd64",),
                fedora_layout: bool = False, dracut: bool = True, live: bool = True, init: bool = True) -> Path:
    """A small merged-/usr rootfs with the parts inspection looks for (the init is an x86-64 ELF header)."""
    (root / "usr/lib").mkdir(parents=True)
    (root / "usr/lib/os-release").write_text(f'ID={os_id}\nVERSION_ID="13"\nPRETTY_NAME="Test {os_id}"\n')
    (root / "etc").mkdir()
    (root / "etc/os-release").symlink_to("../usr/lib/os-release")
    (root / "lib").symlink_to("usr/lib")
    (root / "boot").mkdir()
    for version in kernels:
        moddir = root / "usr/lib/modules" / version
        (moddir / "kernel").mkdir(parents=True)
        (moddir / "vmlinuz" if fedora_layout else root / "boot" / f"vmlinuz-{version}").write_bytes(b"kernel")
    if init:
        (root / "usr/lib/systemd").mkdir()
        (root / "usr/lib/systemd/systemd").write_bytes(ELF_X86_64)
    if dracut:
        (root / "usr/bin").mkdir(parents=True)
        (root / "usr/bin/dracut").write_text("#!/bin/sh\n")
        modules = root / "usr/lib/dracut/modules.d"
        modules.mkdir(parents=True)
        (modules / "90kernel-modules").mkdir()
        if live:
            (modules / "90dmsquash-live").mkdir()
    return root


def test_version_order_is_numeric_not_lexical() -> None:
    versions = ["6.9.0-1", "6.10.2-1", "6.10.10-1", "5.15.0", "6.10.2-1-rc1"]
    assert sorted(versions, key=version_key)[-1] == "6.10.10-1"
    assert sorted(versions, key=version_key)[0] == "5.15.0"


def test_newest_kernel_is_chosen(tmp_path: Path) -> None:
    root = make_rootfs(tmp_path, kernels=("6.9.12-amd64", "6.12.1-amd64", "6.10.3-amd64"))
    report = examine_directory(root)
    assert report.kernel is not None and report.kernel.version == "6.12.1-amd64"
    assert report.kernel_image_path == root / "boot/vmlinuz-6.12.1-amd64"


def test_fedora_layout_kernel_in_modules_dir(tmp_path: Path) -> None:
    root = make_rootfs(tmp_path, os_id="fedora", kernels=("6.11.4-301.fc41.x86_64",), fedora_layout=True)
    assert find_kernels(Tree.from_directory(root))[0].image == "usr/lib/modules/6.11.4-301.fc41.x86_64/vmlinuz"


def test_only_a_kernel_with_image_and_modules_is_chosen(tmp_path: Path) -> None:
    """Issue 16: an extra /usr/lib/modules/9.99.0-fake (no vmlinuz) was listed first and chosen. Incomplete
    kernels are listed as such and never chosen: modules without an image, an image without modules, an empty
    vmlinuz, a file that is not a kernel."""
    root = make_rootfs(tmp_path, kernels=("6.1.0",))
    (root / "usr/lib/modules/9.99.0-fake/kernel").mkdir(parents=True)
    (root / "usr/lib/modules/9.99.0-fake/modules.dep").write_text("")
    (root / "boot/vmlinuz-9.0.0-image-only").write_bytes(b"kernel")
    (root / "usr/lib/modules/8.0.0-empty/kernel").mkdir(parents=True)
    (root / "boot/vmlinuz-8.0.0-empty").write_bytes(b"")
    (root / "usr/lib/modules/7.0.0-text/kernel").mkdir(parents=True)
    (root / "boot/vmlinuz-7.0.0-text").write_bytes(b"x" * 0x300)  # read as a kernel header: no HdrS magic
    kernels = find_kernels(Tree.from_directory(root))
    assert [(k.version, k.problem) for k in kernels] == [
        ("9.99.0-fake", "no vmlinuz"), ("9.0.0-image-only", "no modules"), ("8.0.0-empty", "no vmlinuz"),
        ("7.0.0-text", "no vmlinuz"), ("6.1.0", None)]
    kernel = examine_directory(root).kernel
    assert kernel is not None and kernel.version == "6.1.0"


@pytest.mark.parametrize(("os_id", "package"), [("debian", "linux-image-amd64"), ("fedora", "kernel"),
                                                ("ubuntu", "linux-image-generic"), ("arch", "linux")])
def test_no_kernel_names_the_package(tmp_path: Path, os_id: str, package: str) -> None:
    root = make_rootfs(tmp_path, os_id=os_id, kernels=())
    assert re.search(rf"has no kernel.*`{package}`", examine_directory(root).verdict())


def test_no_dracut_names_the_package(tmp_path: Path) -> None:
    root = make_rootfs(tmp_path, dracut=False)
    assert re.search(r"has no dracut.*dracut dracut-live", examine_directory(root).verdict())


def test_dracut_without_live_module(tmp_path: Path) -> None:
    root = make_rootfs(tmp_path, live=False)
    assert "dmsquash-live" in examine_directory(root).verdict()


def test_os_release_parsing() -> None:
    parsed = parse_os_release('# comment\nID=debian\nPRETTY_NAME="Debian GNU/Linux 13 (trixie)"\nX=\'y\'\n\n')
    assert parsed == {"ID": "debian", "PRETTY_NAME": "Debian GNU/Linux 13 (trixie)", "X": "y"}
