"""End to end: real rootless podman, dracut, tar2sqfs, systemd-repart and OVMF. Each boot test passes only on
evidence from the booted system's serial console."""

import json
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from container2boot.disk import read_table
from container2boot.podman import external_containers
from tests import conftest
from tests.conftest import C2BOOT, EXAMPLE_IMAGE, READY, boot_evidence, c2boot, derived_image, in_either_order

pytestmark = pytest.mark.slow
ESP_TYPE = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"


def test_example_outputs(example_build: Path) -> None:
    esp = example_build / "esp"
    for path in ("EFI/BOOT/BOOTX64.EFI", "EFI/BOOT/grub.cfg", "container2boot/vmlinuz",
                 "container2boot/initrd.img", "container2boot/squashfs.img"):
        assert (esp / path).is_file(), path
    assert not list(example_build.parent.glob(".c2boot-partial-*")), "staging directory left behind"
    manifest = json.loads((example_build / "manifest.json").read_text())
    assert manifest["source"]["image"] == EXAMPLE_IMAGE and manifest["source"]["digest"].startswith("sha256:")
    assert manifest["os_release"]["ID"] == "debian"
    assert manifest["kernel"]["version"] and "root=live:LABEL=C2BOOT" in manifest["kernel"]["cmdline"]
    assert {a["path"] for a in manifest["artifacts"]} >= {"disk.img", "esp/container2boot/squashfs.img"}
    assert all(len(a["sha256"]) == 64 and a["size"] > 0 for a in manifest["artifacts"])
    assert {"machine", "rootbuilder", "assemble"} <= set(manifest["timings_seconds"])
    assert manifest["cache"] == {"initrd": "built", "outputs": "built"}
    assert manifest["tools"]["systemd-repart"].startswith("systemd 25")
    assert manifest["boot"]["firmware"] == ["uefi"] and manifest["boot"]["partition_table"] == "gpt"
    assert not (esp / "syslinux").exists()


def test_the_same_build_again_copies_the_outputs_from_the_cache(example_build: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = c2boot("build", "--image", EXAMPLE_IMAGE, "--diskimage", "-o", out)
    assert "its outputs are reused" in result.stderr and "Assembling" not in result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["cache"] == {"outputs": "reused"} and "assemble_stages" not in manifest["timings_seconds"]
    assert (out / "SHA256SUMS").read_text() == (example_build / "SHA256SUMS").read_text()
    subprocess.run(["sha256sum", "--check", "--quiet", "SHA256SUMS"], cwd=out, check=True)
    assert f"{EXAMPLE_IMAGE} --diskimage" in c2boot("cache", "list").stdout


def test_a_changed_file_that_the_initrd_holds_makes_the_initrd_again(example_build: Path, tmp_path: Path) -> None:
    """dracut takes every /usr/lib/modprobe.d file: a new one means a new initrd. (test_e2e_bios shows the
    reuse.)"""
    out = tmp_path / "out"
    with derived_image("localhost/c2boot-test/modprobe:1", "echo 'options loop max_loop=8' > "
                       "/usr/lib/modprobe.d/c2boot-test.conf") as image:
        c2boot("build", "--image", image, "-o", out)
    assert json.loads((out / "manifest.json").read_text())["cache"] == {"initrd": "built", "outputs": "built"}
    initrd = "esp/container2boot/initrd.img"
    assert (out / initrd).read_bytes() != (example_build / initrd).read_bytes()


def test_example_disk_layout(example_build: Path) -> None:
    """Read back from disk.img: one GPT ESP named C2BOOT, sized to its content with modest headroom."""
    table = read_table(example_build / "disk.img")
    assert table.label == "gpt"
    [esp] = table.partitions
    assert esp.name == "C2BOOT" and esp.type.upper() == ESP_TYPE and esp.attrs == ""
    content = sum(f.stat().st_size for f in (example_build / "esp").rglob("*") if f.is_file())
    assert content < esp.size_bytes < content * 1.15 + 16 * 2**20


def test_example_boots_under_uefi(example_build: Path) -> None:
    console = boot_evidence(example_build / "disk.img", in_either_order(READY, "login:"))
    assert "c2boot-demo login:" in console


def test_build_from_existing_image_with_an_erofs_root_boots(example_build: Path, tmp_path: Path) -> None:
    """--image: an existing local image; --root-format erofs: the root image is EROFS, mounted by the booted kernel
    (its message on the console), and `c2boot verify` rebuilds it with the same bytes; --cmdline reaches the booted
    kernel (it sets the hostname)."""
    out = tmp_path / "out"
    settings = ("--image", EXAMPLE_IMAGE, "--root-format", "erofs", "--cmdline", "systemd.hostname=from-image",
                "--diskimage")
    c2boot("build", *settings, "-o", out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"]["image"] == EXAMPLE_IMAGE
    assert manifest["kernel"]["cmdline"].endswith("systemd.hostname=from-image")
    assert "rd.live.squashimg=erofs.img" in manifest["kernel"]["cmdline"]
    assert manifest["boot"]["root"] == "erofs.img (erofs, zstd) with a tmpfs overlay"
    with (out / "esp/container2boot/erofs.img").open("rb") as image:
        assert image.read(1028)[1024:] == bytes.fromhex("e2e1f5e0")  # EROFS's magic number
    assert not (out / "esp/container2boot/squashfs.img").exists()
    console = boot_evidence(out / "disk.img", r"from-image login:")
    assert "root filesystem overlay" in console
    assert re.search(r"erofs: \(device loop\d+\): mounted with root inode", console), console[-3000:]
    again = tmp_path / "again"
    verified = c2boot("verify", out, "-o", again)  # builds it again as the manifest says, and compares
    assert re.search(r"is reproducible: its \d+ files and manifest.json are identical", verified.stderr)
    conftest.assert_rebuilt_identically(out, again)
    manifest = json.loads((again / "manifest.json").read_text())
    manifest["source"]["id"] = "0" * 64
    (again / "manifest.json").write_text(json.dumps(manifest))
    refused = c2boot("verify", again, check=False)  # the recorded image is not the one its name gives: no build
    assert refused.returncode == 1 and "which the outputs were built from" in refused.stderr.splitlines()[-1]


def test_esp_only_build_without_diskimage(example_build: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    c2boot("build", "--image", EXAMPLE_IMAGE, "-o", out)
    assert (out / "esp/container2boot/squashfs.img").is_file() and not (out / "disk.img").exists()


def test_missing_image_fails_cleanly(example_build: Path, tmp_path: Path) -> None:
    before = external_containers(check=True)
    result = c2boot("build", "--image", "localhost/no/such-image:1", "-o", tmp_path / "out", check=False)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("c2boot: error: image localhost/no/such-image:1 not found")
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []
    assert external_containers(check=True) == before


def test_pull_policies_reach_podman(example_build: Path, tmp_path: Path) -> None:
    """--pull as podman build has it. never: the image here is used (the outputs come from the cache); always: a
    registry must answer, for --image and for the Containerfile's FROM (none answers for localhost/ here)."""
    reused = c2boot("build", "--image", EXAMPLE_IMAGE, "--pull", "never", "--diskimage", "-o", tmp_path / "never")
    assert "its outputs are reused" in reused.stderr
    context = tmp_path / "context"
    context.mkdir()
    (context / "Containerfile").write_text(f"FROM {EXAMPLE_IMAGE}\nRUN touch /etc/pulled\n")
    for args, error in (
            (("--image", EXAMPLE_IMAGE, "--pull", "always"),
             f"pulling {EXAMPLE_IMAGE} failed (--pull always): initializing source docker://{EXAMPLE_IMAGE}"),
            (("--pull", "always", "-t", "localhost/c2boot-test/pulled:1", context),
             "building localhost/c2boot-test/pulled:1 failed: creating build container: initializing source"),
            (("--image", "docker.io/library/c2boot-absent:1", "--pull", "never"),
             "image docker.io/library/c2boot-absent:1 is not here (--pull never)")):
        result = c2boot("build", *args, "-o", tmp_path / "out", check=False)
        assert result.returncode == 1 and result.stderr.strip().splitlines()[-1].startswith(f"c2boot: error: {error}")
        assert not (tmp_path / "out").exists()


def test_an_app_command_the_image_lacks_fails_before_the_slow_steps(example_build: Path, tmp_path: Path) -> None:
    before = external_containers(check=True)
    result = c2boot("build", "--image", "docker.io/library/debian:trixie", "--cmd", "/no/such/program", "-o",
                    tmp_path / "out", check=False)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("c2boot: error: the app's command '/no/such/program' is not in the image")
    assert list(tmp_path.iterdir()) == []
    assert external_containers(check=True) == before


def test_ctrl_c_during_assemble_leaves_nothing(example_build: Path, tmp_path: Path) -> None:
    before = external_containers(check=True)
    out = tmp_path / "out"
    process = subprocess.Popen([*C2BOOT, "build", "--image", EXAMPLE_IMAGE, "--no-cache", "-o", str(out)],
                               stderr=subprocess.PIPE, text=True)
    assert process.stderr is not None
    for line in process.stderr:
        if line.startswith("==> Building the live initrd"):
            break
    else:
        raise AssertionError("the build never reached the initrd stage")
    time.sleep(2)
    process.send_signal(signal.SIGINT)
    rest = process.stderr.read()
    assert process.wait(timeout=120) == 130, rest
    assert "interrupted" in rest
    assert list(tmp_path.iterdir()) == []
    assert external_containers(check=True) == before


def test_existing_output_is_not_clobbered(example_build: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    result = c2boot("build", "--image", EXAMPLE_IMAGE, "-o", out, check=False)
    assert result.returncode == 1 and "--force" in result.stderr
    assert [p.name for p in out.iterdir()] == ["precious.txt"]


def test_rootbuilder_alone_produces_outputs(example_build: Path, tmp_path: Path) -> None:
    """The CI form: `podman run` of the rootbuilder with the machine image mounted at /rootfs."""
    rootbuilder = subprocess.run(
        ["podman", "images", "--format", "{{.Repository}}:{{.Tag}}", "localhost/container2boot/rootbuilder"],
        capture_output=True, text=True, check=True).stdout.split()[0]
    out = tmp_path / "out"
    out.mkdir()
    subprocess.run(["podman", "run", "--rm", f"--mount=type=image,source={EXAMPLE_IMAGE},target=/rootfs",
                    "-v", f"{out}:/out:rw", rootbuilder, "--diskimage"], check=True, capture_output=True)
    assert (out / "disk.img").is_file() and (out / "manifest.json").is_file()
    assert (out / "esp/container2boot/initrd.img").stat().st_uid == (tmp_path.stat().st_uid)
