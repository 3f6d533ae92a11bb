"""c2boot run / test / build --test / --format / --netboot, end to end: real rootless builds, real QEMU boots, and
every verdict comes from the booted system itself (the report unit, or the example machine's console line)."""

import hashlib
import json
import re
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import EXAMPLE_IMAGE, READY, Running, c2boot, registry_digest, require_host_tools

pytestmark = pytest.mark.slow


def boot_report(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


CONTAINERDISK = "localhost/c2boot-test/containerdisk:latest"


@pytest.fixture(scope="module")
def netboot_build(example_build: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One build with everything `build` adds to the disk: --netboot, two formats, compressed copies, --test, and a
    KubeVirt containerDisk image (removed afterwards)."""
    out = tmp_path_factory.mktemp("netboot") / "out"
    result = c2boot("build", "--image", EXAMPLE_IMAGE, "--netboot", "--format", "vhd", "--containerdisk",
                    CONTAINERDISK, "--compress", "zst", "--test", "-o", out)
    assert "UP: the system reached graphical.target and is running, with no failed units" in result.stdout
    yield out
    subprocess.run(["podman", "rmi", "--ignore", CONTAINERDISK], capture_output=True, check=False)


@pytest.fixture(scope="module")
def containerdisk_qcow2(netboot_build: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, tarfile.TarInfo]:
    """The disk as KubeVirt finds it: /disk/disk.qcow2 of the containerDisk image (podman export of a container
    created from it, never run), with its tar header (owner, mode)."""
    dest = tmp_path_factory.mktemp("containerdisk")
    container = subprocess.run(["podman", "create", CONTAINERDISK, "none"], capture_output=True, text=True,
                               check=True).stdout.strip()
    try:
        export = subprocess.Popen(["podman", "export", container], stdout=subprocess.PIPE)
        assert export.stdout is not None
        with tarfile.open(fileobj=export.stdout, mode="r|") as tar:
            for member in tar:
                if member.name.lstrip("./") == "disk/disk.qcow2":
                    (dest / "disk.qcow2").write_bytes(tar.extractfile(member).read())  # type: ignore[union-attr]
                    header = member
        assert export.wait() == 0
    finally:
        subprocess.run(["podman", "rm", container], capture_output=True, check=False)
    return dest / "disk.qcow2", header


def test_c2boot_test_passes_on_the_example_under_uefi_and_leaves_the_image_alone(example_build: Path) -> None:
    before = digest(example_build / "disk.img")
    report = boot_report(c2boot("test", example_build, "--json"))
    assert report["ok"] and report["boot"] == "disk" and report["firmware"] == "uefi"
    assert report["default_target"] == "graphical.target" and report["system_state"] == "running"
    assert report["failed_units"] == [] and report["reached_default_target"]
    assert {"firmware_and_loader", "kernel", "initrd", "userspace", "total"} <= set(report["seconds"])
    assert digest(example_build / "disk.img") == before


def test_build_test_fails_with_a_useful_report_on_a_broken_kernel_command_line(example_build: Path,
                                                                              tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = c2boot("build", "--image", EXAMPLE_IMAGE, "--cmdline", "init=/no/such/init", "--test", "-o", out,
                    check=False)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "FAILED: the system fell into emergency mode" in result.stdout
    assert "last console lines:" in result.stdout and "Failed to start initrd-switch-root.service" in result.stdout
    assert (out / "disk.img").is_file()  # the build itself succeeded; the outputs stay for debugging
    report = boot_report(c2boot("test", out, "--json", check=False))
    assert not report["ok"] and "emergency mode" in report["problem"] and report["console_tail"]


def test_formats_and_checksums(netboot_build: Path) -> None:
    require_host_tools("qemu-img", "zstd", "sha256sum")
    subprocess.run(["qemu-img", "check", netboot_build / "disk.qcow2"], check=True, capture_output=True)
    subprocess.run(["sha256sum", "--check", "--quiet", "SHA256SUMS"], cwd=netboot_build, check=True)
    subprocess.run(["zstd", "--test", "--quiet", netboot_build / "disk.qcow2.zst"], check=True)
    manifest = json.loads((netboot_build / "manifest.json").read_text())
    assert manifest["disk_images"] == [
        {"format": "raw", "path": "disk.img"}, {"format": "vhd", "path": "disk.vhd"},
        {"format": "qcow2", "path": "disk.qcow2"},  # the one --containerdisk implies
        {"format": "raw", "compression": "zst", "path": "disk.img.zst"},
        {"format": "vhd", "compression": "zst", "path": "disk.vhd.zst"},
        {"format": "qcow2", "compression": "zst", "path": "disk.qcow2.zst"},
    ]
    listed = {a["path"] for a in manifest["artifacts"]}
    assert {"SHA256SUMS", "disk.qcow2", "disk.vhd.zst", "esp/container2boot/squashfs.img"} <= listed
    assert manifest["boot"]["netboot"] is True


def test_the_containerdisk_image_holds_the_qcow2_as_kubevirt_wants_it(
        netboot_build: Path, containerdisk_qcow2: tuple[Path, tarfile.TarInfo]) -> None:
    disk, header = containerdisk_qcow2
    assert (header.uid, header.gid, header.mode & 0o777) == (107, 107, 0o440)
    assert digest(disk) == digest(netboot_build / "disk.qcow2")
    manifest = json.loads((netboot_build / "manifest.json").read_text())
    image_id = subprocess.run(["podman", "image", "inspect", "--format", "{{.Id}}", CONTAINERDISK],
                              capture_output=True, text=True, check=True).stdout.strip()
    assert manifest["containerdisk"] == {"image": CONTAINERDISK, "id": image_id, "disk": "/disk/disk.qcow2"}


def test_the_containerdisk_image_pushes_to_a_registry(netboot_build: Path, local_registry: str) -> None:
    """`podman push`, as the README tells users, to a real registry; pulled back by digest, it is the same image."""
    target = f"{local_registry}/vms/example:1"
    subprocess.run(["podman", "push", "--quiet", "--tls-verify=false", CONTAINERDISK, target], check=True,
                   capture_output=True)
    pulled = f"{local_registry}/vms/example@{registry_digest(local_registry, 'vms/example', '1')}"
    try:
        subprocess.run(["podman", "pull", "--quiet", "--tls-verify=false", pulled], check=True, capture_output=True)
        image_id = subprocess.run(["podman", "image", "inspect", "--format", "{{.Id}}", pulled], capture_output=True,
                                  text=True, check=True).stdout.strip()
        assert image_id == json.loads((netboot_build / "manifest.json").read_text())["containerdisk"]["id"]
    finally:
        subprocess.run(["podman", "rmi", "--ignore", pulled], capture_output=True, check=False)


def test_the_containerdisk_qcow2_boots_with_secure_boot(containerdisk_qcow2: tuple[Path, tarfile.TarInfo]) -> None:
    """The qcow2 taken out of the containerDisk image, booted (the same bytes as OUT/disk.qcow2, checked above)."""
    report = boot_report(c2boot("test", containerdisk_qcow2[0], "--firmware", "secure-boot", "--json"))
    assert report["ok"] and report["firmware"] == "secure-boot" and report["image"].endswith("disk.qcow2")


def test_network_boot_from_a_server_on_127_0_0_1_reaches_multi_user(netboot_build: Path) -> None:
    result = c2boot("test", netboot_build, "--netboot", "--json")
    report = boot_report(result)
    assert report["ok"] and report["boot"] == "network", result.stderr
    assert re.search(r"Serving .*esp/container2boot on 127\.0\.0\.1:\d+", result.stderr)


def test_run_puts_the_console_on_the_terminal_and_quits_on_ctrl_a_x(example_build: Path) -> None:
    before = digest(example_build / "disk.img")
    running = Running(example_build)
    try:
        running.wait_for(READY)
        assert running.process.stdin is not None
        running.process.stdin.write(b"\x01x")  # QEMU's escape: Ctrl-A X quits
        running.process.stdin.flush()
        assert running.process.wait(timeout=30) == 0
    finally:
        running.process.kill()
    assert digest(example_build / "disk.img") == before
