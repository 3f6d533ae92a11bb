"""`c2boot libvirt`: a build handed to libvirt, as domain XML, as the equivalent virt-install line, or defined in
the user's own `qemu:///session` (no root, no libvirt network: user-mode networking like `c2boot run`).

The firmware is chosen by libvirt itself from the firmware descriptors OVMF ships (/usr/share/qemu/firmware); we ask
for features (Secure Boot, enrolled keys) rather than naming files, so the XML is not tied to this host's paths.
"""

import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from container2boot import lifecycle, qemu, vm
from container2boot.config import Config
from container2boot.errors import C2BootError
from container2boot.run import failure_message, run
from container2boot.templates import render

SESSION = "qemu:///session"
# Formats of qemu.disk_format() that libvirt 9 can name in <driver type=...> (it has no vhdx).
LIBVIRT_FORMATS = frozenset({"raw", "qcow2", "vmdk", "vdi", "vpc"})
# libvirt picks the first descriptor (by file name) with these features: without "secure-boot: no", plain UEFI would
# get Debian's 40-edk2-x86_64-secure-enrolled.json and an unsigned GRUB would not boot.
FIRMWARE_FEATURES: dict[str, tuple[tuple[str, bool], ...]] = {
    "uefi": (("secure-boot", False),),
    "secure-boot": (("secure-boot", True), ("enrolled-keys", True)),
    "bios": (),
}
XML_INVALID = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")  # not even escaped XML can carry these


@dataclass(frozen=True)
class Domain:
    """What the domain is made of; the disk is used in place (the guest writes to it)."""

    name: str
    disk: Path
    disk_format: str
    firmware: str  # uefi, secure-boot or bios
    memory_mib: int
    cpus: int
    kvm: bool
    console_log: Path | None = None


def domain(target: Path, config: Config) -> Domain:
    """The domain for a build (its output directory or one of its disk images), checked before libvirt sees it."""
    built = vm.locate(target)
    vm.check_firmware(built, config.firmware)
    if built.disk is None:
        raise C2BootError(f"{built.out} has no disk.img: libvirt boots a disk, so build with --diskimage")
    disk_format = qemu.disk_format(built.disk)
    if disk_format not in LIBVIRT_FORMATS:
        raise C2BootError(f"libvirt cannot use the {disk_format} disk {built.disk}: pass disk.img or a qcow2, "
                          "vmdk, vdi or vhd copy of it")
    name = config.domain_name if config.domain_name is not None else f"c2boot-{built.out.resolve().name}"
    if not name.strip() or re.search(r"[\x00-\x1f\x7f/]", name):
        raise C2BootError(f"--name {name!r} cannot name a libvirt domain: use letters, digits, '-', '_' or '.'")
    disk = built.disk.resolve()
    console_log = config.console_log.expanduser().absolute() if config.console_log else None
    for path in (disk, console_log):
        if path is not None and XML_INVALID.search(str(path)):
            raise C2BootError(f"{str(path)!r} contains control characters, which libvirt's XML cannot carry: "
                              "rename it")
    vm.check_console_log(console_log)
    return Domain(name, disk, disk_format, config.firmware, config.memory_mib, config.cpus,
                  kvm=qemu.accelerator().startswith("kvm"), console_log=console_log)


def domain_xml(d: Domain) -> str:
    """The domain XML (valid per `virt-xml-validate FILE domain`)."""
    firmware = {"uefi": "UEFI", "secure-boot": "UEFI with Secure Boot", "bios": "BIOS"}[d.firmware]
    return render("domain.xml.j2", domain=d, domain_type="kvm" if d.kvm else "qemu",
                  description=f"container2boot build {d.disk} ({firmware})",
                  firmware_features=FIRMWARE_FEATURES[d.firmware])


def virt_install_command(d: Domain) -> list[str]:
    """The `virt-install --import` command that defines and starts the same domain."""
    if d.firmware == "bios":
        boot = "hd"
    else:
        features = "".join(f",firmware.feature{i}.name={name},firmware.feature{i}.enabled={'yes' if on else 'no'}"
                           for i, (name, on) in enumerate(FIRMWARE_FEATURES[d.firmware]))
        boot = f"firmware=efi{features},hd"
    serial = "pty" + (f",log.file={_option_value(d.console_log)},log.append=off" if d.console_log else "")
    argv = ["virt-install", "--connect", SESSION, "--import", "--name", d.name,
            "--virt-type", "kvm" if d.kvm else "qemu", "--machine", "q35", "--boot", boot,
            "--memory", str(d.memory_mib), "--vcpus", str(d.cpus),
            "--disk", f"path={_option_value(d.disk)},format={d.disk_format},bus=virtio",
            "--network", "user,model=virtio", "--graphics", "none", "--serial", serial,
            "--console", "pty,target.type=serial", "--osinfo", "detect=on,require=off"]
    argv += ["--features", "smm.state=on"] if d.firmware != "bios" else []
    argv += ["--cpu", "host-passthrough"] if d.kvm else []
    return argv


def _option_value(path: Path) -> str:
    """A path inside virt-install's comma-separated sub-options: a comma needs double quotes around the value; quote
    characters virt-install garbles (virt-install 4.1), so those are refused."""
    text = str(path)
    if '"' in text or "'" in text:
        raise C2BootError(f"virt-install cannot take the path {text!r} (it contains quotes): rename it, or print the "
                          "XML (without --virt-install) and `virsh define` it")
    return f'"{text}"' if "," in text else text


def virt_install_line(d: Domain) -> str:
    return shlex.join(virt_install_command(d))


def existing_domains() -> set[str]:
    """Names of the domains the user's session already has (running or not)."""
    listed = run(["virsh", "--connect", SESSION, "list", "--all", "--name"], capture=True, check=False)
    if listed.returncode != 0:  # the first contact: a failure here is the session itself
        raise C2BootError(failure_message("virsh", listed.returncode, listed.stdout + listed.stderr) +
                          f" (cannot reach your {SESSION}: it needs libvirt's QEMU driver, Debian and Fedora: "
                          "libvirt-daemon-driver-qemu)")
    return {line.strip() for line in listed.stdout.splitlines() if line.strip()}


def define(d: Domain) -> None:
    """Define the domain in the user's qemu:///session; an existing domain of that name is never replaced."""
    if not os.access(d.disk, os.R_OK | os.W_OK):
        raise C2BootError(f"you cannot write to {d.disk}, and the domain boots it in place: make it yours (or give "
                          "the domain a copy), then define it again")
    if d.name in existing_domains():
        raise C2BootError(f"a domain named {d.name!r} already exists in {SESSION}: choose another --name, or remove "
                          f"it first with `virsh -c {SESSION} undefine --nvram {shlex.quote(d.name)}`")
    with lifecycle.temporary_directory("c2boot-libvirt-") as tmp:
        xml = tmp / "domain.xml"
        xml.write_text(domain_xml(d))
        run(["virsh", "--connect", SESSION, "define", xml])


def next_steps(d: Domain) -> str:
    """What to type after --define: start, console, stop, remove."""
    virsh, name = f"virsh -c {SESSION}", shlex.quote(d.name)
    return "\n".join([
        f"Defined {d.name} in {SESSION}; it boots {d.disk} in place (the guest writes to it).",
        f"  {virsh} start {name} --console    # start it with its serial console here (Ctrl-] leaves)",
        f"  {virsh} console {name}            # the console of the running domain",
        f"  {virsh} shutdown {name}           # ask it to power off (destroy: pull the plug)",
        f"  {virsh} undefine --nvram {name}   # remove the domain (the disk stays)",
    ])
