"""Inspection and the host checks without podman: reports from directories and tars (real files, real tar
streams), verdicts per distribution family, and doctor's checks against real conditions of this host."""

import io
import json
import os
import tarfile
from pathlib import Path

import pytest

from container2boot.doctor import boot_tools, free_space, hand_over_tools, podman_version, subordinate_ids
from container2boot.rootfs import examine
from container2boot.tree import Tree
from tests.conftest import c2boot
from tests.test_rootfs import make_rootfs


def tar_of(root: Path) -> io.BytesIO:
    """The directory as `podman export` streams it: one tar, read front to back."""
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w") as tar:
        tar.add(root, arcname=".")
    data.seek(0)
    return data


def test_bootable_directory_report(tmp_path: Path) -> None:
    report = examine(Tree.from_directory(make_rootfs(tmp_path / "root")))
    data = report.as_json()
    assert data["missing"] == [] and data["family"] == "Debian/Ubuntu"
    assert data["architecture"] == "x86_64" and data["init"] == "systemd"
    assert data["kernels"] == [{"version": "6.12.1-amd64", "image": "/boot/vmlinuz-6.12.1-amd64", "modules": True,
                                "complete": True, "chosen": True}]
    assert data["dracut"]["live_modules"] == ["dmsquash-live"]
    assert report.verdict() == "Test debian can boot (live layout) as it is"


def test_tar_stream_gives_the_same_report_as_the_directory(tmp_path: Path) -> None:
    root = make_rootfs(tmp_path / "root", kernels=("6.1.0", "6.10.2"))
    assert examine(Tree.from_tar(tar_of(root))).as_json() == examine(Tree.from_directory(root)).as_json()


def test_links_resolve_inside_the_tree_not_on_the_host(tmp_path: Path) -> None:
    root = make_rootfs(tmp_path / "root")
    (root / "sbin").symlink_to("/usr/sbin")  # absolute: the tree's /usr/sbin, not the host's
    (root / "usr/sbin").mkdir()
    (root / "usr/sbin/mkinitramfs").write_text("#!/bin/sh\n")
    tree = Tree.from_tar(tar_of(root))
    assert tree.is_file("sbin/mkinitramfs") and tree.is_file("lib/os-release")
    assert tree.read_text("etc/os-release") == (root / "usr/lib/os-release").read_text()
    assert not tree.is_file("etc/passwd")  # exists on the host, not in the tree


@pytest.mark.parametrize(("os_release", "packages"), [
    ("ID=debian", "`linux-image-amd64 dracut dracut-live`"),
    ("ID=ubuntu\nID_LIKE=debian", "`linux-image-generic dracut dracut-live`"),
    ('ID=almalinux\nID_LIKE="rhel centos fedora"', "`kernel dracut dracut-live`"),
    ("ID=arch", "`linux dracut`"),
    ("ID=alpine", "`linux-lts dracut`"),
])
def test_missing_parts_are_named_per_family(tmp_path: Path, os_release: str, packages: str) -> None:
    root = make_rootfs(tmp_path / "root", kernels=(), dracut=False)
    (root / "usr/lib/os-release").write_text(os_release + '\nPRETTY_NAME="Some OS"\n')
    verdict = examine(Tree.from_directory(root)).verdict()
    assert verdict == f"Some OS has no kernel (a vmlinuz with its modules in /usr/lib/modules/VERSION); no " \
        f"dracut, which builds the initrd: add {packages} to the image (e.g. in its Containerfile)"


def test_unknown_family_gets_every_familys_names(tmp_path: Path) -> None:
    root = make_rootfs(tmp_path / "root", kernels=())
    (root / "usr/lib/os-release").write_text("ID=gentoo\n")
    assert examine(Tree.from_directory(root)).verdict().endswith(
        "add `linux-image-amd64` (Debian/Ubuntu), `kernel` (Fedora), `linux` (Arch) to the image")


def test_kernel_without_modules_cannot_boot(tmp_path: Path) -> None:
    root = make_rootfs(tmp_path / "root", kernels=("6.12.1",))
    (root / "usr/lib/modules/6.12.1/kernel").rmdir()
    report = examine(Tree.from_directory(root))
    assert report.as_json()["kernels"][0]["modules"] is False and report.missing() == ["kernel"]


def test_no_init_and_initramfs_tools_are_reported(tmp_path: Path) -> None:
    root = make_rootfs(tmp_path / "root", dracut=False, init=False)
    (root / "usr/sbin").mkdir()
    (root / "usr/sbin/mkinitramfs").write_text("")
    report = examine(Tree.from_directory(root))
    assert report.init == "none" and report.initramfs_tools
    assert "(it uses initramfs-tools; dracut replaces it)" in report.verdict()
    assert report.verdict().endswith("add `dracut dracut-live systemd-sysv` to the image (e.g. in its Containerfile)")


def test_installed_layout_does_not_need_the_live_module(tmp_path: Path) -> None:
    report = examine(Tree.from_directory(make_rootfs(tmp_path / "root", live=False)))
    assert report.missing("live") == ["dmsquash-live"] and report.missing("installed") == []


def test_secure_boot_selinux_and_bootc(tmp_path: Path) -> None:
    root = make_rootfs(tmp_path / "root")
    for path in ("usr/lib/shim/shimx64.efi.signed", "usr/lib/grub/x86_64-efi-signed/grubx64.efi.signed"):
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(b"MZ")
    (root / "etc/selinux/targeted/policy").mkdir(parents=True)
    (root / "etc/selinux/config").write_text("SELINUX=enforcing\nSELINUXTYPE=targeted\n")
    assert examine(Tree.from_directory(root)).selinux_policy is None, "no file_contexts: nothing to label from"
    (root / "etc/selinux/targeted/contexts/files").mkdir(parents=True)
    (root / "etc/selinux/targeted/contexts/files/file_contexts").write_text("/.* system_u:object_r:etc_t:s0\n")
    report = examine(Tree.from_directory(root), labels={"containers.bootc": "1"})
    assert (report.signed_loader, report.selinux_policy, report.selinux_mode, report.bootc) == \
        ("debian", "targeted", "enforcing", True)


def test_cli_inspect_directory_tar_and_json(tmp_path: Path) -> None:
    good = make_rootfs(tmp_path / "good")
    result = c2boot("inspect", good)
    assert result.stdout.splitlines()[-1] == "OK: complete machine image: boots as it is, with its own kernel " \
        "6.12.1-amd64, its dracut and its init"
    tar_path = tmp_path / "good.tar"
    tar_path.write_bytes(tar_of(good).getvalue())
    assert json.loads(c2boot("inspect", tar_path, "--json").stdout)["bootable"] is True
    bad = make_rootfs(tmp_path / "bad", live=False)
    result = c2boot("inspect", bad)
    assert result.stdout.splitlines()[-1] == "OK: machine image without a usable initrd maker: boots its own " \
        "kernel 6.12.1-amd64 and its init; the supplied dracut makes the initrd"
    assert "  on its own   to boot without supplied parts, add `dracut-live` to the image" in result.stdout
    assert c2boot("inspect", bad, "--layout", "installed").stdout.splitlines()[-1].startswith("OK: complete")


def test_cli_inspect_rejects_a_file_that_is_not_a_tar(tmp_path: Path) -> None:
    junk = tmp_path / "junk.img"
    junk.write_bytes(b"\0" * 10 + b"not a tar" * 100)
    result = c2boot("inspect", junk, check=False)
    assert result.returncode == 1
    assert result.stderr.strip().startswith(f"c2boot: error: {junk} is not a tar of a root filesystem")


# doctor: each check against a real condition of this host ----------------------------------------------------


def test_doctor_user_without_subuid_ranges_gets_the_usermod_line() -> None:
    check = subordinate_ids("nobody", 65534)  # the real /etc/subuid: nobody never has a range
    assert check.status == "FAIL" and "usermod --add-subuids 100000-165535" in check.detail


def test_doctor_free_space_thresholds(tmp_path: Path) -> None:
    assert free_space("output", tmp_path / "not/yet", warn=1, fail=0).status == "OK"  # counts the existing parent
    assert free_space("output", tmp_path, warn=2**60, fail=0).status == "WARN"
    failed = free_space("output", tmp_path, warn=2**61, fail=2**60)
    assert failed.status == "FAIL" and "free some space" in failed.detail


def test_doctor_without_podman_or_qemu_on_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # a real PATH with nothing on it
    check = podman_version()
    assert check.status == "FAIL" and "podman not found: install podman" in check.detail
    [qemu] = list(boot_tools())
    assert qemu.status == "WARN" and "install qemu-system-x86" in qemu.detail
    ssh, keygen, virsh = hand_over_tools()
    assert ssh.status == keygen.status == virsh.status == "WARN"
    assert "install openssh-client for c2boot ssh" in ssh.detail and "libvirt-clients" in virsh.detail


def test_doctor_cli_exit_status_follows_the_checks(tmp_path: Path) -> None:
    env = {**os.environ, "PATH": str(tmp_path)}
    result = c2boot("doctor", "-o", tmp_path, check=False, env=env)
    assert result.returncode == 1 and result.stdout.splitlines()[0].startswith("FAIL  podman")
