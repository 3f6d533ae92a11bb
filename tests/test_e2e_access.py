"""End to end on a second Debian release: a Debian 12 (bookworm: systemd 252, dracut 059) machine image with sshd
and cloud-init, bootstrapped with mmdebstrap, built live and installed; getting in with keys given at build time
and at boot, a user with a password, a hostname, cloud-init user-data, and `c2boot test` on systemd 252. Every
verdict comes from the booted system (over SSH, or its report port)."""

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import c2boot, require_host_tools

IMAGE = "localhost/c2boot-test/bookworm:1"
CONTAINERFILE = """FROM docker.io/library/debian:bookworm
ARG GIVEN
RUN apt-get update \\
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \\
      linux-image-amd64 systemd-sysv udev kmod dracut dracut-live openssh-server cloud-init \\
      ifupdown isc-dhcp-client iproute2 login passwd procps \\
 && rm -f /boot/initrd.img* && apt-get clean && rm -rf /var/lib/apt/lists/*
RUN printf 'auto lo\\niface lo inet loopback\\nallow-hotplug enp0s2\\niface enp0s2 inet dhcp\\n' \\
      > /etc/network/interfaces.d/c2boot \
 && echo "$GIVEN" > /etc/c2boot-build-arg
"""
PASSWORD = "correct horse 42"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bookworm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """`c2boot build CONTEXT` of the bookworm machine (its base bootstrapped when no registry has it), named with -t
    and given a --build-arg, as podman build would; a disk with nothing added: no key, no user, no hostname."""
    require_host_tools("podman", "qemu-system-x86_64", "ssh", "ssh-keygen", "openssl", "debugfs", "sfdisk")
    context = tmp_path_factory.mktemp("bookworm")
    (context / "Containerfile").write_text(CONTAINERFILE)
    out = context / "out"
    c2boot("build", "-t", IMAGE, "--build-arg", "GIVEN=from --build-arg", "--diskimage", "-o", out, context)
    yield out
    subprocess.run(["podman", "rmi", "--force", IMAGE], check=False, capture_output=True)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("keys")
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "alice@test", "-f", directory / "alice"],
                   check=True)
    (directory / "password").write_text(PASSWORD + "\n")
    return directory


def image_file(path: str) -> str:
    return subprocess.run(["podman", "run", "--rm", "--entrypoint", "cat", IMAGE, path], check=True,
                          capture_output=True, text=True).stdout


def test_the_context_tag_and_build_arg_work_as_in_podman_build(bookworm: Path) -> None:
    assert image_file("/etc/c2boot-build-arg") == "from --build-arg\n"
    assert json.loads((bookworm / "manifest.json").read_text())["source"]["image"] == IMAGE


def test_bookworm_live_boots_and_its_systemd_252_reports(bookworm: Path) -> None:
    manifest = json.loads((bookworm / "manifest.json").read_text())
    assert manifest["image"]["systemd_version"] == 252 and manifest["tools"]["dracut (image)"].startswith("059")
    assert "rd.live.overlay.overlayfs=1" in manifest["kernel"]["cmdline"]  # dracut 059's way to a tmpfs overlay
    report = json.loads(c2boot("test", bookworm, "--json").stdout)
    assert report["ok"] and report["verdict_kind"] == "report", report
    assert report["system_state"] == "running" and report["reached_default_target"]


def test_boot_time_key_and_cloud_init_on_a_build_without_keys(bookworm: Path, keys: Path, tmp_path: Path) -> None:
    user_data = tmp_path / "user-data.yaml"
    user_data.write_text("#cloud-config\nwrite_files:\n  - path: /var/tmp/from-cloud-init\n"
                         "    content: |\n      written by cloud-init\n")
    result = c2boot("ssh", bookworm, "--ssh-key", keys / "alice.pub", "--identity", keys / "alice",
                    "--cloud-init", user_data, "--",
                    "sh", "-c", "cloud-init status --wait >/dev/null; cat /var/tmp/from-cloud-init; whoami")
    assert result.stdout.splitlines()[-2:] == ["written by cloud-init", "root"]


def test_build_time_access_on_an_installed_disk(bookworm: Path, keys: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = c2boot("build", "--image", IMAGE, "--layout", "installed", "-o", out, "--hostname", "web1",
                    "--user", "alice", "--groups", "sudo,adm", "--ssh-key", keys / "alice.pub",
                    "--password-secret", f"id=pw,src={keys / 'password'}")
    assert "reset so that every machine is unique: /etc/machine-id, 6 SSH host key files" in result.stderr
    manifest = (out / "manifest.json").read_text()
    assert PASSWORD not in manifest and "$6$" not in manifest
    assert json.loads(manifest)["plan"]["access"]["user"]["name"] == "alice"

    alice = c2boot("ssh", out, "--login", "alice", "--identity", keys / "alice", "--",
                   "sh", "-c", "cat /etc/hostname; id -nG; cat /etc/machine-id /etc/ssh/ssh_host_ed25519_key.pub")
    hostname, groups, machine_id, host_key = alice.stdout.splitlines()[-4:]
    assert hostname == "web1" and groups.split() == ["alice", "adm", "sudo"]
    assert machine_id != image_file("/etc/machine-id").strip()  # every machine is its own
    assert host_key.split()[1] != image_file("/etc/ssh/ssh_host_ed25519_key.pub").split()[1]

    # The password hash, read from the root partition of the disk itself (debugfs reads ext4 without mounting).
    hashed = root_file(out / "disk.img", "/etc/shadow", tmp_path).split("alice:", 1)[1].split(":")[0]
    salt = hashed.split("$")[2]
    expected = subprocess.run(["openssl", "passwd", "-6", "-salt", salt, "-stdin"], input=PASSWORD, check=True,
                              capture_output=True, text=True).stdout.strip()
    assert hashed == expected


def root_file(disk: Path, path: str, scratch: Path) -> str:
    """A file of an installed disk's root partition (its second), copied out with dd and read with debugfs."""
    table = json.loads(subprocess.run(["sfdisk", "--json", disk], check=True, capture_output=True,
                                      text=True).stdout)["partitiontable"]
    root = table["partitions"][1]
    sector = table.get("sectorsize", 512)
    partition = scratch / "root.ext4"
    subprocess.run(["dd", f"if={disk}", f"of={partition}", "bs=4M", "iflag=skip_bytes,count_bytes",
                    f"skip={root['start'] * sector}", f"count={root['size'] * sector}", "conv=sparse",
                    "status=none"], check=True)
    return subprocess.run(["debugfs", "-R", f"cat {path}", partition], check=True, capture_output=True,
                          text=True).stdout


def test_ssh_tells_an_image_without_sshd_up_front(example_build: Path) -> None:
    result = c2boot("ssh", example_build, "--", "true", check=False)
    assert result.returncode == 1
    assert "was built from an image without an SSH server: add openssh-server" in result.stderr
