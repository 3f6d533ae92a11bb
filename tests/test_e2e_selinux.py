"""SELinux end to end: a Debian trixie machine with the reference policy, labelled without privileges, boots
enforcing, live and installed (ext4); with --selinux off it boots with SELinux disabled. The verdicts come from the
booted systems: the boot test's report (the kernel's mode, the system state, the AVC denials) and a unit of the
image that prints getenforce and /etc/shadow's label on the console."""

import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from container2boot.disk import read_table
from tests.conftest import c2boot, derived_image

pytestmark = pytest.mark.slow

EVIDENCE_UNIT = """[Unit]
Description=Say what SELinux does (container2boot's test)
After=local-fs.target
[Service]
Type=oneshot
ExecStart=/bin/sh -c 'echo "selinux-evidence: $(getenforce) shadow=$(stat -c %%C /etc/shadow)"'
StandardOutput=journal+console
[Install]
WantedBy=multi-user.target
"""
SCRIPT = f"""set -e
apt-get update -q
DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends selinux-basics selinux-policy-default \\
  auditd
apt-get clean
rm -rf /var/lib/apt/lists/*
sed -i 's/^SELINUX=.*/SELINUX=enforcing/' /etc/selinux/config
cat > /etc/systemd/system/selinux-evidence.service <<'UNIT'
{EVIDENCE_UNIT}UNIT
systemctl enable selinux-evidence.service
"""
SHADOW = "system_u:object_r:shadow_t:s0"


@pytest.fixture(scope="module")
def selinux_image(example_build: Path) -> Iterator[str]:
    """The example machine with Debian's SELinux policy, set to enforcing in its /etc/selinux/config."""
    with derived_image("localhost/c2boot-test/selinux:1", SCRIPT) as tag:
        yield tag


def boot_test(out: Path) -> tuple[dict[str, object], str]:
    """`c2boot test` of a build: its JSON report and the whole console."""
    console = out.parent / f"{out.name}-console.log"
    result = c2boot("test", out, "--json", "--console-log", console, check=False)
    report = json.loads(result.stdout)
    assert result.returncode == 0 and report["ok"], f"{report['verdict']}\n{console.read_text()[-3000:]}"
    return report, console.read_text(errors="replace")


def evidence(console: str) -> str:
    found = re.search(r"selinux-evidence: (\S+) shadow=(\S*)", console)
    assert found, f"the image's evidence unit said nothing:\n{console[-3000:]}"
    return f"{found.group(1)} {found.group(2)}"


def test_live_root_is_labelled_and_boots_enforcing(selinux_image: str, tmp_path: Path) -> None:
    out = tmp_path / "live"
    c2boot("build", "--image", selinux_image, "--diskimage", "--output", out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["selinux"] == {"mode": "enforcing", "policy": "default", "labelled": "by container2boot"}
    assert "security=selinux selinux=1 enforcing=1" in manifest["kernel"]["cmdline"]
    squashfs = out / "esp/container2boot/squashfs.img"
    for path, label in (("/etc/shadow", SHADOW), ("/", "system_u:object_r:root_t:s0"),
                        ("/usr/bin/passwd", "system_u:object_r:passwd_exec_t:s0")):
        read = subprocess.run(["rdsquashfs", "-x", path, squashfs], capture_output=True, text=True, check=True)
        assert f"security.selinux={label}" in read.stdout.splitlines()
    report, console = boot_test(out)
    assert (report["selinux"], report["system_state"]) == ("enforcing", "running")
    assert evidence(console) == f"Enforcing {SHADOW}"
    examples, count = report["avc_examples"], report["avc_denials"]
    assert isinstance(examples, list) and isinstance(count, int) and len(examples) <= count


def test_installed_ext4_root_is_labelled_and_boots_enforcing(selinux_image: str, tmp_path: Path) -> None:
    out = tmp_path / "installed"
    c2boot("build", "--image", selinux_image, "--layout", "installed", "--output", out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["selinux"]["labelled"] == "by container2boot"
    root = next(p for p in read_table(out / "disk.img").partitions if p.name == "container2boot-root")
    labels = subprocess.run(["debugfs", "-R", "ea_get /etc/shadow security.selinux",
                             f"{out / 'disk.img'}?offset={root.start_bytes}"], capture_output=True, text=True,
                            check=True)
    assert SHADOW in labels.stdout
    c2boot("verify", out)  # the labels are written the same way every time: the disk is rebuilt bit for bit
    report, console = boot_test(out)
    assert (report["selinux"], report["system_state"]) == ("enforcing", "running")
    assert evidence(console) == f"Enforcing {SHADOW}"


def test_selinux_off_boots_with_selinux_disabled(selinux_image: str, tmp_path: Path) -> None:
    out = tmp_path / "off"
    c2boot("build", "--image", selinux_image, "--selinux", "off", "--diskimage", "--output", out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["selinux"] == {"mode": "disabled", "policy": None, "labelled": None}
    assert "selinux=0" in manifest["kernel"]["cmdline"].split()
    report, console = boot_test(out)
    assert (report["selinux"], report["avc_denials"]) == ("off", 0)
    assert evidence(console).startswith("Disabled ")
