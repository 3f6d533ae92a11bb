"""c2boot run / test / build --test / --format / --netboot, end to end: real rootless builds, real QEMU boots, and
every verdict comes from the booted system itself (the report unit, or the example machine's console line)."""

import hashlib
import json
import re
import subprocess
import threading
import time
from pathlib import Path
from typing import IO, Any

import pytest

from tests.conftest import C2BOOT, EXAMPLE_IMAGE, READY, c2boot, require_host_tools

pytestmark = pytest.mark.slow


def boot_report(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def collect(stream: IO[bytes], sink: list[bytes]) -> None:
    while chunk := stream.read1(4096):  # type: ignore[attr-defined]
        sink.append(chunk)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def netboot_build(example_build: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One build with everything this issue adds to `build`: --netboot, two formats, compressed copies, --test."""
    out = tmp_path_factory.mktemp("netboot") / "out"
    result = c2boot("build", "--image", EXAMPLE_IMAGE, "--netboot", "--format", "qcow2", "--format", "vhd",
                    "--compress", "zst", "--test", "-o", out)
    assert "UP: the system reached graphical.target and is running, with no failed units" in result.stdout
    return out


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
        {"format": "raw", "path": "disk.img"}, {"format": "qcow2", "path": "disk.qcow2"},
        {"format": "vhd", "path": "disk.vhd"},
        {"format": "raw", "compression": "zst", "path": "disk.img.zst"},
        {"format": "qcow2", "compression": "zst", "path": "disk.qcow2.zst"},
        {"format": "vhd", "compression": "zst", "path": "disk.vhd.zst"},
    ]
    listed = {a["path"] for a in manifest["artifacts"]}
    assert {"SHA256SUMS", "disk.qcow2", "disk.vhd.zst", "esp/container2boot/squashfs.img"} <= listed
    assert manifest["boot"]["netboot"] is True


def test_the_qcow2_disk_boots_with_secure_boot(netboot_build: Path) -> None:
    report = boot_report(c2boot("test", netboot_build / "disk.qcow2", "--firmware", "secure-boot", "--json"))
    assert report["ok"] and report["firmware"] == "secure-boot" and report["image"].endswith("disk.qcow2")


def test_network_boot_from_a_server_on_127_0_0_1_reaches_multi_user(netboot_build: Path) -> None:
    result = c2boot("test", netboot_build, "--netboot", "--json")
    report = boot_report(result)
    assert report["ok"] and report["boot"] == "network", result.stderr
    assert re.search(r"Serving .*esp/container2boot on 127\.0\.0\.1:\d+", result.stderr)


def test_run_puts_the_console_on_the_terminal_and_quits_on_ctrl_a_x(example_build: Path) -> None:
    before = digest(example_build / "disk.img")
    process = subprocess.Popen([*C2BOOT, "run", str(example_build)], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    console: list[bytes] = []
    threading.Thread(target=collect, args=(process.stdout, console), daemon=True).start()
    try:
        deadline = time.monotonic() + 300
        while not re.search(READY.encode(), b"".join(console)) and time.monotonic() < deadline:
            assert process.poll() is None, b"".join(console)[-2000:]
            time.sleep(1)
        assert re.search(READY.encode(), b"".join(console)), b"".join(console)[-2000:]
        assert process.stdin is not None
        process.stdin.write(b"\x01x")  # QEMU's escape: Ctrl-A X quits
        process.stdin.flush()
        assert process.wait(timeout=30) == 0
    finally:
        process.kill()
    assert digest(example_build / "disk.img") == before
