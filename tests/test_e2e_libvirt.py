"""c2boot libvirt, end to end: the example build defined in the user's own qemu:///session (no root), started with
virsh, and judged by the booted system's own ready line on the serial console, which libvirt logs to a file."""

import re
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from container2boot.qemu import boot_again_after, read_console
from tests.conftest import READY, c2boot, require_host_tools

pytestmark = pytest.mark.slow

SESSION = ["virsh", "--connect", "qemu:///session"]
BOOT_TIMEOUT = 300


def virsh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([*SESSION, *args], capture_output=True, text=True, check=False)
    if check and result.returncode != 0:
        raise AssertionError(f"virsh {' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")
    return result


def test_defined_domain_boots_the_example_under_libvirt(example_build: Path, tmp_path: Path) -> None:
    require_host_tools("virsh", "qemu-system-x86_64")
    # The domain writes to its disk in place: give it its own copy, so the session's example stays as built.
    out = tmp_path / "out"
    out.mkdir()
    subprocess.run(["cp", "--sparse=always", example_build / "disk.img", out / "disk.img"], check=True)
    shutil.copy(example_build / "manifest.json", out / "manifest.json")
    name = f"c2boot-e2e-{uuid.uuid4().hex[:8]}"
    console_log = tmp_path / "console.log"
    try:
        defined = c2boot("libvirt", out, "--define", "--name", name, "--console-log", console_log)
        assert f"virsh -c qemu:///session start {name} --console" in defined.stdout
        started = time.monotonic()
        virsh("start", name)
        live = virsh("dumpxml", name).stdout
        # libvirt's own firmware choice for "efi, secure-boot: no": plain OVMF, not the Secure Boot build that its
        # descriptor order would pick first (Debian: OVMF_CODE_4M.fd, not OVMF_CODE_4M.ms.fd).
        loader = re.search(r"<loader [^>]*>[^<]+</loader>", live)
        assert loader is not None and "secure='yes'" not in loader.group(0), live
        assert "<interface type='user'>" in live
        console = ""
        restarted = False
        while time.monotonic() - started < BOOT_TIMEOUT:
            console = read_console(console_log) if console_log.exists() else ""
            if re.search(READY, console):
                break
            if not restarted and boot_again_after(console):  # as c2boot test does; libvirt truncates the log
                virsh("destroy", name, check=False)
                virsh("start", name)
                restarted, started = True, time.monotonic()
                continue
            state = virsh("domstate", name).stdout.strip()
            assert state == "running", f"the domain is {state} before it was ready:\n{console[-3000:]}"
            time.sleep(1)
        seconds = time.monotonic() - started
        assert re.search(READY, console), f"no ready line after {seconds:.0f} s:\n{console[-3000:]}"
        kind = re.search(r"<domain type='(\w+)'", live)
        print(f"libvirt domain type {kind.group(1) if kind else '?'}: ready after {seconds:.0f} s")
    finally:
        virsh("destroy", name, check=False)
        virsh("undefine", "--nvram", name, check=False)
    assert name not in virsh("list", "--all", "--name").stdout.split()
