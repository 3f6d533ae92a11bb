"""Booting a built disk in QEMU: the firmware files, KVM or software emulation, and one QEMU command line for
`c2boot run`, `c2boot test` and the boot tests, which watch the serial console for evidence that an image boots.

QEMU is a long-running process watched while it runs, so it is started here rather than through run().
"""

import base64
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from container2boot import lifecycle
from container2boot.errors import C2BootError
from container2boot.log import logger
from container2boot.run import require_tool

OVMF_PAIRS = (  # (code, vars template), first match wins
    ("/usr/share/OVMF/OVMF_CODE_4M.fd", "/usr/share/OVMF/OVMF_VARS_4M.fd"),
    ("/usr/share/OVMF/OVMF_CODE.fd", "/usr/share/OVMF/OVMF_VARS.fd"),
    ("/usr/share/edk2/ovmf/OVMF_CODE.fd", "/usr/share/edk2/ovmf/OVMF_VARS.fd"),
)
# Secure Boot: firmware built with it, and variables with Microsoft's keys enrolled (which sign the distributions'
# shims). Needs a q35 machine with SMM.
SECURE_BOOT_PAIRS = (
    ("/usr/share/OVMF/OVMF_CODE_4M.secboot.fd", "/usr/share/OVMF/OVMF_VARS_4M.ms.fd"),
    ("/usr/share/OVMF/OVMF_CODE.secboot.fd", "/usr/share/OVMF/OVMF_VARS.ms.fd"),
    ("/usr/share/edk2/ovmf/OVMF_CODE.secboot.fd", "/usr/share/edk2/ovmf/OVMF_VARS.secboot.fd"),
)
DISK_FORMATS = {".qcow2": "qcow2", ".vmdk": "vmdk", ".vdi": "vdi", ".vhdx": "vhdx", ".vhd": "vpc"}  # else raw
GUEST_HOST_ADDRESS = "10.0.2.2"  # the host's 127.0.0.1 as QEMU's user network shows it to the guest
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][A-Z0-9]|\r")
# The kernel trapped on a breakpoint in its own code: what its text patching (static keys, alternatives) puts there
# for a moment and never runs once patched ("Oops: int3: 0000 [#1] ..."; kernels before 6.9 lack "Oops: ").
PATCHED_CODE_TRAP = re.compile(r"^.*\bint3: 0000 \[#\d+\].*$", re.MULTILINE)
PANIC_ENDED = "---[ end Kernel panic"  # the kernel's last words: nothing more comes


@dataclass(frozen=True)
class BootResult:
    matched: bool
    seconds: float
    console: str  # the serial console output, escape sequences removed


def find_ovmf(secure_boot: bool = False) -> tuple[Path, Path]:
    """The UEFI firmware code and the variables template to copy (the guest writes its variables)."""
    for code, variables in SECURE_BOOT_PAIRS if secure_boot else OVMF_PAIRS:
        if Path(code).is_file() and Path(variables).is_file():
            return Path(code), Path(variables)
    kind = "with Secure Boot (OVMF_CODE*.secboot.fd and Microsoft-key variables)" if secure_boot else "for QEMU"
    raise C2BootError(f"OVMF (UEFI firmware {kind}) not found: install ovmf (Debian) / edk2-ovmf (Fedora)")


KVM_PROBE_SECONDS = 20
KVM_FAILURES = ("KVM internal error", "emulation failure", "failed to initialize kvm", "Could not access KVM")


@cache
def kvm_usable() -> tuple[bool, str]:
    """Whether KVM really runs a guest here, and why not. A /dev/kvm node proves nothing: on some hosts (nested or
    software KVM) it exists and every guest dies with "KVM internal error". So boot OVMF under KVM for a moment:
    firmware output on the serial port means KVM works."""
    if not os.path.exists("/dev/kvm"):
        return False, "no /dev/kvm (no hardware virtualization, or the kvm module is not loaded)"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False, "/dev/kvm is not accessible to this user: add the user to the kvm group"
    code, _ = find_ovmf()
    with lifecycle.temporary_directory("c2boot-kvm-") as tmp:
        serial, stderr = tmp / "serial.log", tmp / "stderr.log"
        serial.touch()
        with stderr.open("w") as errors_file:
            process = lifecycle.start_process(
                [require_tool("qemu-system-x86_64"), "-machine", "q35", "-accel", "kvm", "-m", "256", "-nodefaults",
                 "-display", "none", "-monitor", "none", "-no-reboot", "-serial", f"file:{serial}",
                 "-drive", f"if=pflash,format=raw,readonly=on,file={code}"],
                on_our_death=signal.SIGKILL, stdout=subprocess.DEVNULL, stderr=errors_file)
        try:
            deadline = time.monotonic() + KVM_PROBE_SECONDS
            while (time.monotonic() < deadline and process.poll() is None and serial.stat().st_size == 0
                   and not any(f in stderr.read_text(errors="replace") for f in KVM_FAILURES)):
                time.sleep(0.2)
            booted = serial.stat().st_size > 0
        finally:
            lifecycle.stop_process(process)
        errors = stderr.read_text(errors="replace")
    failure = next((line for line in errors.splitlines() if any(f in line for f in KVM_FAILURES)), None)
    if failure or not booted:
        return False, f"/dev/kvm exists but cannot run a guest here ({failure or 'no firmware output'})"
    return True, "KVM runs guests"


def accelerator() -> str:
    """KVM where it really runs guests, else software emulation (TCG); C2BOOT_QEMU_ACCEL overrides both."""
    if forced := os.environ.get("C2BOOT_QEMU_ACCEL"):
        return forced
    usable, why = kvm_usable()
    if usable:
        return "kvm"
    _tell_once(f"    {why}: using software emulation (TCG), which is slower")
    return "tcg,thread=multi"


@cache
def _tell_once(message: str) -> None:
    logger.info("%s", message)


@dataclass(frozen=True)
class VirtualMachine:
    """What to boot and how. With `kernel` set, QEMU starts it directly (no firmware boot loader)."""

    disk: Path | None
    firmware: str = "uefi"  # uefi, secure-boot or bios
    memory_mib: int = 2048
    cpus: int = 2
    kernel: Path | None = None
    initrd: Path | None = None
    append: str = ""
    ssh_port: int | None = None
    ports: tuple[tuple[int, int], ...] = ()  # (host port on 127.0.0.1, guest port), TCP
    snapshot: bool = True  # False: the guest writes to `disk`
    reboot: bool = False  # False: a reboot ends QEMU, as a test wants
    serial: Sequence[str] = ()  # -serial backends, the console first; none: the console on stdio
    credentials: Mapping[str, bytes] = field(default_factory=dict)  # systemd credentials, via SMBIOS type 11
    seed: Path | None = None  # a cloud-init NoCloud seed volume, attached read-only


CONCATENATED_CREDENTIALS = ("tmpfiles.extra", "sysusers.extra", "ssh.authorized_keys.root")  # lines add up


def merge_credentials(*sets: Mapping[str, bytes]) -> dict[str, bytes]:
    """Credentials from several sources: the line-based ones are joined, for the others the last source wins."""
    merged: dict[str, bytes] = {}
    for credentials in sets:
        for name, value in credentials.items():
            if name in CONCATENATED_CREDENTIALS and name in merged:
                merged[name] = merged[name].rstrip(b"\n") + b"\n" + value
            else:
                merged[name] = value
    return merged


def smbios_string(name: str, value: bytes) -> bytes:
    """A credential as systemd reads it from an SMBIOS type 11 (OEM strings) entry."""
    return f"io.systemd.credential.binary:{name}=".encode() + base64.b64encode(value)


def smbios_size(credentials: Mapping[str, bytes]) -> int:
    """Bytes of the one type 11 entry QEMU makes of all the credentials: a 5-byte header, each string with its NUL,
    and the NUL that ends the set."""
    return 5 + sum(len(smbios_string(name, value)) + 1 for name, value in credentials.items()) + 1


def disk_format(disk: Path) -> str:
    return DISK_FORMATS.get(disk.suffix, "raw")


# Where each format says what it is: (offset from the start, or from the end when negative; the bytes there).
DISK_MAGIC: dict[str, tuple[tuple[int, bytes], ...]] = {
    "raw": ((510, b"\x55\xaa"),),  # a partition table's (MBR or GPT's protective MBR) boot signature
    "qcow2": ((0, b"QFI\xfb"),),
    "vmdk": ((0, b"KDMV"), (0, b"# Disk DescriptorFile")),
    "vdi": ((64, b"\x7f\x10\xda\xbe"),),
    "vhdx": ((0, b"vhdxfile"),),
    "vpc": ((-512, b"conectix"), (0, b"conectix")),
}


def check_disk_image(disk: Path) -> None:
    """Refuse a file that is not a bootable disk in the format its name says, before QEMU sits in the firmware's
    boot menu forever."""
    kind = disk_format(disk)
    try:
        with disk.open("rb") as f:
            size = f.seek(0, os.SEEK_END)
            found = []
            for offset, magic in DISK_MAGIC[kind]:
                start = offset if offset >= 0 else size + offset
                f.seek(max(start, 0))
                found.append(start >= 0 and f.read(len(magic)) == magic)
    except OSError as e:
        raise C2BootError(f"cannot read {disk}: {e.strerror}") from None
    if not any(found):
        what = "a disk with a partition table" if kind == "raw" else f"a {kind} disk image"
        raise C2BootError(f"{disk} is not {what}: pass the output directory of `c2boot build` or one of its disk "
                          "images (disk.img, disk.qcow2, ...)")


def qemu_command(vm: VirtualMachine, scratch: Path) -> list[str]:
    """The QEMU command line for `vm`; `scratch` receives the writable copy of the UEFI variables."""
    machine = "q35,smm=on" if vm.firmware == "secure-boot" else "q35"
    argv = [require_tool("qemu-system-x86_64"), "-machine", machine, "-accel", accelerator(),
            "-smp", str(vm.cpus), "-m", str(vm.memory_mib), "-display", "none"]
    argv += ["-monitor", "none"] if vm.serial else []
    argv += ["-no-reboot"] if not vm.reboot else []
    for backend in vm.serial or ["mon:stdio"]:
        argv += ["-serial", backend]
    if vm.disk is not None:
        # snapshot=on: the built image is never written to; the guest's writes go to a temporary overlay, which QEMU
        # unlinks as soon as it is open, so even a SIGKILL leaves nothing behind.
        argv += ["-drive", f"file={vm.disk},format={disk_format(vm.disk)},if=virtio,"
                           f"snapshot={'on' if vm.snapshot else 'off'}"]
    if vm.seed is not None:
        argv += ["-drive", f"file={vm.seed},format=raw,if=virtio,readonly=on"]
    ports = ((vm.ssh_port, 22),) if vm.ssh_port else ()
    forward = "".join(f",hostfwd=tcp:127.0.0.1:{host}-:{guest}" for host, guest in (*ports, *vm.ports))
    argv += ["-nic", f"user,model=virtio-net-pci{forward}"]
    if vm.kernel is not None:
        argv += ["-kernel", str(vm.kernel), "-append", vm.append]
        argv += ["-initrd", str(vm.initrd)] if vm.initrd else []
    for index, (name, value) in enumerate(vm.credentials.items()):
        # A file each, so that commas and long values need no escaping on QEMU's command line.
        credential = scratch / f"credential-{index}"
        credential.write_bytes(smbios_string(name, value))
        argv += ["-smbios", f"type=11,path={credential}"]
    if vm.firmware in ("uefi", "secure-boot"):
        code, variables = find_ovmf(secure_boot=vm.firmware == "secure-boot")
        writable_vars = scratch / "OVMF_VARS.fd"
        shutil.copyfile(variables, writable_vars)
        writable_vars.chmod(0o644)
        argv += ["-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={code}",
                 "-drive", f"if=pflash,format=raw,unit=1,file={writable_vars}"]
        if vm.firmware == "secure-boot":
            argv += ["-global", "driver=cfi.pflash01,property=secure,value=on"]
    elif vm.firmware != "bios":  # bios: SeaBIOS, QEMU's default
        raise C2BootError(f"unknown firmware {vm.firmware!r}: use uefi, secure-boot or bios")
    return argv


@contextmanager
def started(vm: VirtualMachine) -> Iterator[subprocess.Popen[str]]:
    """QEMU running `vm` in the background; stopped on leaving."""
    with lifecycle.temporary_directory("c2boot-qemu-") as scratch:
        process = lifecycle.start_process(qemu_command(vm, scratch), on_our_death=signal.SIGKILL,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            yield process
        finally:
            lifecycle.stop_process(process)


def read_console(path: Path) -> str:
    return ANSI_ESCAPE.sub("", path.read_text(errors="replace"))


def emulator_fault(console: str) -> str | None:
    """The console line of a fault of the emulator rather than of the image, if the console shows one. QEMU 7.2's
    multi-threaded TCG now and then lets one virtual CPU run a stale copy of kernel code that another has just
    patched, and the kernel traps on the int3 its patching had put there for a moment (seen in sched_clock_cpu
    about 2.5 s in, before /init; about one boot in 200 here). KVM and real CPUs keep the copies coherent."""
    trap = PATCHED_CODE_TRAP.search(console)
    return trap.group(0).strip() if trap else None


def boot_again_after(console: str) -> str | None:
    """The emulator's fault that ended a failed boot under TCG, logged, as a reason to boot once more."""
    fault = emulator_fault(console)
    if fault is not None and accelerator().startswith("tcg"):
        logger.warning("    the kernel trapped on code it had just patched, a known fault of QEMU's multi-threaded "
                       "TCG, not of the image: booting again\n      %s", fault)
        return fault
    return None


def boot_until(disk: Path, pattern: str, *, firmware: str = "uefi", timeout: float = 300,
               snapshot: bool = True) -> BootResult:
    """Boot `disk` until the console shows a line matching `pattern` (regex), or `timeout` seconds pass; once more
    after an emulator fault. With `snapshot` False the guest writes to `disk` (QEMU is stopped like a power cut,
    after a match)."""
    wanted = re.compile(pattern, re.MULTILINE)
    result = _boot_until(disk, wanted, firmware, timeout, snapshot)
    if not result.matched and boot_again_after(result.console):
        result = _boot_until(disk, wanted, firmware, timeout, snapshot)
    return result


def _boot_until(disk: Path, wanted: re.Pattern[str], firmware: str, timeout: float, snapshot: bool) -> BootResult:
    with lifecycle.temporary_directory("c2boot-console-") as tmp:
        console_log = tmp / "console.log"
        console_log.touch()
        vm = VirtualMachine(disk, firmware=firmware, snapshot=snapshot, serial=[f"file:{console_log}"])
        with started(vm) as process:
            start = time.monotonic()
            console = ""
            while time.monotonic() - start < timeout:
                console = read_console(console_log)
                if wanted.search(console):
                    return BootResult(True, time.monotonic() - start, console)
                if PANIC_ENDED in console:
                    return BootResult(False, time.monotonic() - start, console)
                if process.poll() is not None:
                    error = process.stderr.read() if process.stderr else ""
                    return BootResult(False, time.monotonic() - start, console + f"\n[qemu exited: {error}]")
                time.sleep(1)
            return BootResult(False, time.monotonic() - start, console)


def run_interactive(vm: VirtualMachine) -> int:
    """Boot `vm` with its serial console on this terminal until the guest powers off or the user quits."""
    with lifecycle.temporary_directory("c2boot-qemu-") as tmp:
        process = lifecycle.start_process(qemu_command(vm, tmp), on_our_death=signal.SIGKILL)
        try:
            return process.wait()
        finally:
            lifecycle.stop_process(process)
