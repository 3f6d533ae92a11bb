"""Booting a built disk in QEMU and watching its serial console: the evidence that an image boots.

QEMU is a long-running process watched while it runs, so it is started here rather than through run().
"""

import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from container2boot.errors import C2BootError
from container2boot.log import logger
from container2boot.run import require_tool

OVMF_PAIRS = (  # (code, vars template), first match wins
    ("/usr/share/OVMF/OVMF_CODE_4M.fd", "/usr/share/OVMF/OVMF_VARS_4M.fd"),
    ("/usr/share/OVMF/OVMF_CODE.fd", "/usr/share/OVMF/OVMF_VARS.fd"),
    ("/usr/share/edk2/ovmf/OVMF_CODE.fd", "/usr/share/edk2/ovmf/OVMF_VARS.fd"),
)
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][A-Z0-9]|\r")


@dataclass(frozen=True)
class BootResult:
    matched: bool
    seconds: float
    console: str  # the serial console output, escape sequences removed


def find_ovmf() -> tuple[Path, Path]:
    for code, variables in OVMF_PAIRS:
        if Path(code).is_file() and Path(variables).is_file():
            return Path(code), Path(variables)
    raise C2BootError("OVMF (UEFI firmware for QEMU) not found: install ovmf (Debian) / edk2-ovmf (Fedora)")


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
    with tempfile.TemporaryDirectory(prefix="c2boot-kvm-") as tmp:
        serial, stderr = Path(tmp) / "serial.log", Path(tmp) / "stderr.log"
        serial.touch()
        with stderr.open("w") as errors_file:
            process = subprocess.Popen(
                [require_tool("qemu-system-x86_64"), "-machine", "q35", "-accel", "kvm", "-m", "256", "-nodefaults",
                 "-display", "none", "-monitor", "none", "-no-reboot", "-serial", f"file:{serial}",
                 "-drive", f"if=pflash,format=raw,readonly=on,file={code}"],
                stdout=subprocess.DEVNULL, stderr=errors_file)
        try:
            deadline = time.monotonic() + KVM_PROBE_SECONDS
            while (time.monotonic() < deadline and process.poll() is None and serial.stat().st_size == 0
                   and not any(f in stderr.read_text(errors="replace") for f in KVM_FAILURES)):
                time.sleep(0.2)
            booted = serial.stat().st_size > 0
        finally:
            process.terminate()
            process.wait(timeout=10)
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
    logger.info("    %s: using software emulation (TCG), which is slower", why)
    return "tcg,thread=multi"


def qemu_command(disk: Path, firmware: str, scratch: Path, console_log: Path, snapshot: bool = True) -> list[str]:
    argv = [
        require_tool("qemu-system-x86_64"), "-machine", "q35", "-accel", accelerator(), "-smp", "2", "-m", "2048",
        "-display", "none", "-monitor", "none", "-no-reboot", "-serial", f"file:{console_log}",
        # snapshot=on: the built image is never written to (off only for a disk that should keep the changes).
        "-drive", f"file={disk},format=raw,if=virtio,snapshot={'on' if snapshot else 'off'}",
    ]
    if firmware == "uefi":
        code, variables = find_ovmf()
        writable_vars = scratch / "OVMF_VARS.fd"
        shutil.copyfile(variables, writable_vars)
        argv += ["-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={code}",
                 "-drive", f"if=pflash,format=raw,unit=1,file={writable_vars}"]
    elif firmware != "bios":  # bios: SeaBIOS, QEMU's default
        raise C2BootError(f"unknown firmware {firmware!r}: use uefi or bios")
    return argv


def boot_until(disk: Path, pattern: str, *, firmware: str = "uefi", timeout: float = 300,
               snapshot: bool = True) -> BootResult:
    """Boot `disk` until the console shows a line matching `pattern` (regex), or `timeout` seconds pass.
    With `snapshot` False the guest writes to `disk` (QEMU is stopped like a power cut, after a match)."""
    wanted = re.compile(pattern, re.MULTILINE)
    with tempfile.TemporaryDirectory(prefix="c2boot-qemu-") as tmp:
        scratch = Path(tmp)
        console_log = scratch / "console.log"
        console_log.touch()
        process = subprocess.Popen(qemu_command(disk, firmware, scratch, console_log, snapshot),
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        start = time.monotonic()
        console = ""
        try:
            while time.monotonic() - start < timeout:
                console = ANSI_ESCAPE.sub("", console_log.read_text(errors="replace"))
                if wanted.search(console):
                    return BootResult(True, time.monotonic() - start, console)
                if process.poll() is not None:
                    error = process.stderr.read() if process.stderr else ""
                    return BootResult(False, time.monotonic() - start, console + f"\n[qemu exited: {error}]")
                time.sleep(1)
            return BootResult(False, time.monotonic() - start, console)
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
