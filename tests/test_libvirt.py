"""c2boot libvirt without booting: the domain XML for each firmware (checked by the real virt-xml-validate), the
virt-install line (checked by the real virt-install --print-xml), --define in the user's qemu:///session, and the
errors that come before libvirt sees anything."""

import json
import os
import shlex
import subprocess
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest

from container2boot import libvirt
from container2boot.config import Config
from container2boot.errors import C2BootError
from tests.conftest import c2boot, require_host_tools

SESSION = ["virsh", "--connect", "qemu:///session"]


@pytest.fixture(autouse=True)
def _no_kvm_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("C2BOOT_QEMU_ACCEL", "tcg")


def fake_out(tmp_path: Path, boot: dict[str, object] | None = None, name: str = "out") -> Path:
    """An output directory as `c2boot build --diskimage --bios` leaves it (a tiny disk with a boot signature)."""
    out = tmp_path / name
    out.mkdir()
    (out / "disk.img").write_bytes(b"\0" * 510 + b"\x55\xaa" + b"\0" * 3584)
    boot = boot if boot is not None else {"firmware": ["uefi", "bios"], "bootloader": "shim + grub (signed)"}
    (out / "manifest.json").write_text(json.dumps({"boot": boot}))
    return out


def validate(xml: str, tmp_path: Path) -> ET.Element:
    """The XML, after the real virt-xml-validate accepted it as a domain."""
    require_host_tools("virt-xml-validate", "xmllint")
    path = tmp_path / f"domain-{uuid.uuid4().hex}.xml"
    path.write_text(xml)
    result = subprocess.run(["virt-xml-validate", path, "domain"], capture_output=True, text=True, check=False)
    assert result.returncode == 0, f"virt-xml-validate refused it:\n{result.stdout}{result.stderr}\n{xml}"
    return ET.fromstring(xml)


def attrs(root: ET.Element, path: str) -> dict[str, str]:
    """The attributes of the element at `path`, which must exist."""
    element = root.find(path)
    assert element is not None, f"no {path}"
    return dict(element.attrib)


def features(root: ET.Element) -> dict[str, str]:
    return {f.attrib["name"]: f.attrib["enabled"] for f in root.iterfind("os/firmware/feature")}


# The domain XML ------------------------------------------------------------------------------------------------


def test_uefi_asks_libvirt_for_firmware_without_secure_boot(tmp_path: Path) -> None:
    out = fake_out(tmp_path)
    root = validate(libvirt.domain_xml(libvirt.domain(out, Config(memory="3G", cpus=3))), tmp_path)
    assert root.attrib["type"] == "qemu" and root.findtext("name") == "c2boot-out"
    assert attrs(root, "os") == {"firmware": "efi"}
    assert root.find("os/loader") is None  # no file names: libvirt picks from the firmware descriptors
    # Without this, libvirt 9 picks Debian's 40-edk2-x86_64-secure-enrolled.json first, and unsigned GRUB fails.
    assert features(root) == {"secure-boot": "no"}
    assert attrs(root, "os/type")["machine"] == "q35"
    assert attrs(root, "features/smm") == {"state": "on"}
    assert root.findtext("memory") == "3072" and attrs(root, "memory") == {"unit": "MiB"}
    assert root.findtext("vcpu") == "3" and root.find("cpu") is None  # TCG: QEMU's default CPU, as c2boot run
    disk = root.find("devices/disk")
    assert disk is not None and attrs(disk, "source") == {"file": str(out.resolve() / "disk.img")}
    assert attrs(disk, "driver") == {"name": "qemu", "type": "raw"}
    assert attrs(disk, "target") == {"dev": "vda", "bus": "virtio"}
    interface = root.find("devices/interface")
    assert interface is not None and interface.attrib == {"type": "user"}  # no root, no libvirt network
    assert attrs(interface, "model") == {"type": "virtio"}
    assert attrs(root, "devices/serial") == {"type": "pty"}
    assert root.find("devices/serial/log") is None
    assert attrs(root, "devices/console/target") == {"type": "serial", "port": "0"}


def test_secure_boot_asks_for_enrolled_keys_and_smm(tmp_path: Path) -> None:
    out = fake_out(tmp_path)
    root = validate(libvirt.domain_xml(libvirt.domain(out, Config(firmware="secure-boot"))), tmp_path)
    assert attrs(root, "os") == {"firmware": "efi"}
    assert features(root) == {"secure-boot": "yes", "enrolled-keys": "yes"}
    assert attrs(root, "features/smm") == {"state": "on"}
    assert attrs(root, "os/type")["machine"] == "q35"


def test_bios_has_no_firmware_request(tmp_path: Path) -> None:
    out = fake_out(tmp_path)
    root = validate(libvirt.domain_xml(libvirt.domain(out / "disk.img", Config(firmware="bios"))), tmp_path)
    assert attrs(root, "os") == {} and root.find("os/firmware") is None
    assert root.find("features/smm") is None  # SeaBIOS, QEMU's default


def test_kvm_where_it_works_with_the_host_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("C2BOOT_QEMU_ACCEL", "kvm")
    root = validate(libvirt.domain_xml(libvirt.domain(fake_out(tmp_path), Config())), tmp_path)
    assert root.attrib["type"] == "kvm" and attrs(root, "cpu") == {"mode": "host-passthrough"}


def test_values_are_xml_escaped_and_the_console_log_is_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                                ) -> None:
    odd = "it's <a> \"b\" & c"
    out = fake_out(tmp_path, name=odd)
    monkeypatch.chdir(tmp_path)
    config = Config(domain_name=f"web1 {odd}", console_log=Path(f"{odd}.log"))
    root = validate(libvirt.domain_xml(libvirt.domain(out, config)), tmp_path)
    assert root.findtext("name") == f"web1 {odd}"
    assert attrs(root, "devices/disk/source")["file"] == str(out.resolve() / "disk.img")
    assert attrs(root, "devices/serial/log") == {"file": str(tmp_path / f"{odd}.log"),
                                                      "append": "off"}
    assert libvirt.domain(out, Config()).name == f"c2boot-{odd}"


def test_the_validator_really_checks(tmp_path: Path) -> None:
    xml = libvirt.domain_xml(libvirt.domain(fake_out(tmp_path), Config()))
    with pytest.raises(AssertionError, match="refused"):
        validate(xml.replace("<smm state='on'/>", "<smm state='maybe'/>"), tmp_path)


@pytest.mark.parametrize(("name", "magic", "expected"), [
    ("disk.qcow2", b"QFI\xfb" + b"\0" * 1020, "qcow2"),
    ("disk.vhd", b"\0" * 512 + b"conectix" + b"\0" * 504, "vpc"),
    ("disk.vmdk", b"KDMV" + b"\0" * 1020, "vmdk"),
])
def test_the_disk_format_follows_the_file_name(tmp_path: Path, name: str, magic: bytes, expected: str) -> None:
    out = fake_out(tmp_path)
    (out / name).write_bytes(magic)
    root = validate(libvirt.domain_xml(libvirt.domain(out / name, Config())), tmp_path)
    assert attrs(root, "devices/disk/driver")["type"] == expected
    assert attrs(root, "devices/disk/source")["file"] == str(out.resolve() / name)


# Errors before libvirt sees anything ---------------------------------------------------------------------------


def test_errors(tmp_path: Path) -> None:
    out = fake_out(tmp_path, {"firmware": ["uefi"], "bootloader": "grub (unsigned)"})
    with pytest.raises(C2BootError, match="built without --bios"):
        libvirt.domain(out, Config(firmware="bios"))
    with pytest.raises(C2BootError, match="unsigned GRUB"):
        libvirt.domain(out, Config(firmware="secure-boot"))
    (out / "disk.vhdx").write_bytes(b"vhdxfile" + b"\0" * 1016)
    with pytest.raises(C2BootError, match="libvirt cannot use the vhdx disk"):
        libvirt.domain(out / "disk.vhdx", Config())
    for name in ("a/b", "", "two\nlines", "bell\x07"):
        with pytest.raises(C2BootError, match="cannot name a libvirt domain"):
            libvirt.domain(out, Config(domain_name=name))
    quoted = fake_out(tmp_path, name="it's")
    with pytest.raises(C2BootError, match="virt-install cannot take the path"):
        libvirt.virt_install_line(libvirt.domain(quoted, Config(virt_install=True)))
    with pytest.raises(C2BootError, match="its directory does not exist"):
        libvirt.domain(out, Config(console_log=tmp_path / "no" / "console.log"))
    with pytest.raises(C2BootError, match="control characters"):
        libvirt.domain(out, Config(console_log=Path("log\x01")))
    (out / "disk.img").unlink()
    with pytest.raises(C2BootError, match="build with --diskimage"):
        libvirt.domain(out, Config())
    with pytest.raises(C2BootError, match="not found"):
        libvirt.domain(tmp_path / "nothing", Config())
    with pytest.raises(C2BootError, match="choose one"):
        Config(define=True, virt_install=True)


def test_cli_errors_are_one_line(tmp_path: Path) -> None:
    out = fake_out(tmp_path, {"firmware": ["uefi"], "bootloader": "grub (unsigned)"})
    result = c2boot("libvirt", out, "--firmware", "bios", check=False)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.strip().splitlines()[-1].startswith("c2boot: error:")
    assert "rebuild with --bios" in result.stderr
    result = c2boot("libvirt", out, "--define", "--virt-install", check=False)
    assert result.returncode == 1 and "choose one" in result.stderr


# The command line ----------------------------------------------------------------------------------------------


def test_cli_prints_only_the_xml_on_stdout(tmp_path: Path) -> None:
    out = fake_out(tmp_path)
    result = c2boot("libvirt", out, "--name", "x1", "--memory", "1G", "--cpus", "1", "--console-log",
                    tmp_path / "c.log")
    root = validate(result.stdout, tmp_path)
    assert root.findtext("name") == "x1" and root.findtext("memory") == "1024" and root.findtext("vcpu") == "1"
    assert attrs(root, "devices/serial/log")["file"] == str(tmp_path / "c.log")
    assert "c2boot libvirt out --define --name web1" in c2boot("libvirt", "--help").stdout


@pytest.mark.parametrize("firmware", ["uefi", "secure-boot", "bios"])
def test_virt_install_line_makes_the_same_domain(tmp_path: Path, firmware: str) -> None:
    require_host_tools("virt-install")
    out = fake_out(tmp_path, name="my, out")  # a space for the shell, a comma for virt-install's sub-options
    line = c2boot("libvirt", out, "--virt-install", "--firmware", firmware, "--name", "vi-test",
                  "--console-log", tmp_path / "console log").stdout.strip()
    argv = shlex.split(line)
    assert argv[:4] == ["virt-install", "--connect", "qemu:///session", "--import"]
    assert f'path="{out.resolve() / "disk.img"}",format=raw,bus=virtio' in argv
    # --print-xml: virt-install only writes the XML (it asks the session for capabilities, defines nothing).
    result = subprocess.run([*argv, "--print-xml"], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    root = validate(result.stdout, tmp_path)
    ours = ET.fromstring(libvirt.domain_xml(libvirt.domain(out, Config(firmware=firmware, domain_name="vi-test"))))
    assert root.findtext("name") == "vi-test" and root.attrib["type"] == "qemu"
    assert attrs(root, "os") == attrs(ours, "os") and features(root) == features(ours)
    assert (root.find("features/smm") is None) == (firmware == "bios")
    assert attrs(root, "devices/disk/source")["file"] == str(out.resolve() / "disk.img")
    assert attrs(root, "devices/interface")["type"] == "user"
    assert attrs(root, "devices/interface/model")["type"] == "virtio"
    assert attrs(root, "devices/serial/log")["file"] == str(tmp_path / "console log")


# --define in the user's own session ----------------------------------------------------------------------------


@pytest.fixture
def domain_name() -> Iterator[str]:
    """A name no other test uses; whatever has that name is removed afterwards."""
    require_host_tools("virsh")
    name = f"c2boot-unit-{uuid.uuid4().hex[:8]}"
    try:
        yield name
    finally:
        subprocess.run([*SESSION, "undefine", "--nvram", name], capture_output=True, check=False)


def test_define_puts_it_in_the_session_and_refuses_an_existing_name(tmp_path: Path, domain_name: str) -> None:
    out = fake_out(tmp_path)
    result = c2boot("libvirt", out, "--define", "--name", domain_name, "--firmware", "secure-boot")
    assert f"virsh -c qemu:///session start {domain_name} --console" in result.stdout
    assert f"virsh -c qemu:///session undefine --nvram {domain_name}" in result.stdout
    defined = subprocess.run([*SESSION, "dumpxml", "--inactive", domain_name], capture_output=True, text=True,
                             check=True).stdout
    root = ET.fromstring(defined)
    assert features(root) == {"secure-boot": "yes", "enrolled-keys": "yes"}
    assert attrs(root, "devices/disk/source")["file"] == str(out.resolve() / "disk.img")
    again = c2boot("libvirt", out, "--define", "--name", domain_name, check=False)
    assert again.returncode == 1
    assert f"a domain named '{domain_name}' already exists in qemu:///session" in again.stderr
    assert f"undefine --nvram {domain_name}" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1


def test_an_unreachable_session_names_the_package(tmp_path: Path) -> None:
    require_host_tools("virsh")
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    # No session daemon behind this runtime directory, and none that libvirt could start.
    env = {**os.environ, "XDG_RUNTIME_DIR": str(runtime), "LIBVIRTD_PATH": "/nonexistent/libvirtd"}
    result = c2boot("libvirt", fake_out(tmp_path), "--define", env=env, check=False)
    assert result.returncode == 1 and result.stdout == ""
    assert "cannot reach your qemu:///session" in result.stderr and "libvirt-daemon-driver-qemu" in result.stderr


def test_define_refuses_a_disk_it_cannot_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    domain = libvirt.domain(fake_out(tmp_path), Config(define=True))
    monkeypatch.setattr("container2boot.libvirt.os.access", lambda path, mode: False)  # a 0444 disk, for a normal user
    with pytest.raises(C2BootError, match=r"you cannot write to .*disk\.img, and the domain boots it in place"):
        libvirt.define(domain)
