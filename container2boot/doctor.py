"""`c2boot doctor`: everything build, run and test need from the host, checked for real where that is cheap (a
container is started, a guest is run under KVM), each with the fix when it fails.

A FAIL stops builds; a WARN costs speed or a feature (booting in QEMU) but a build still works.
"""

import getpass
import json
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from container2boot.errors import C2BootError
from container2boot.run import PACKAGES, check_version

GiB = 1024**3
SPACE_WARN = 10 * GiB  # a build needs about 1 GiB of images and outputs; a few builds and their caches more
SPACE_FAIL = 2 * GiB
CONTAINER_TIMEOUT = 120
# What a failed `podman run` says on hosts we know, and what fixes it (containers.conf settings).
RUN_FAILURES = (
    ("cgroups in hybrid mode", 'crun cannot run containers on this host\'s hybrid cgroups: install runc and set '
     '[engine] runtime = "runc" in containers.conf'),
    ("/dev/net/tun", 'rootless networking (slirp4netns) cannot open /dev/net/tun: set [containers] netns = "host" in '
     "~/.config/containers/containers.conf"),
    ("slirp4netns", 'rootless networking (slirp4netns) fails: set [containers] netns = "host" in '
     "~/.config/containers/containers.conf"),
    ("setrlimit", 'podman cannot raise resource limits here: set [containers] default_ulimits = '
     '["nofile=20000:20000", "nproc=32768:32768"] in containers.conf'),
)


@dataclass(frozen=True)
class Check:
    status: str  # OK, WARN or FAIL
    name: str
    detail: str

    def line(self) -> str:
        return f"{self.status:<4}  {self.name:<18} {self.detail}"


def ok(name: str, detail: str) -> Check:
    return Check("OK", name, detail)


def podman_version() -> Check:
    try:
        found = check_version("podman")
    except C2BootError as e:
        return Check("FAIL", "podman", str(e))
    return ok("podman", ".".join(map(str, found)))


def subordinate_ids(user: str, uid: int) -> Check:
    from container2boot.podman import check_subordinate_ids

    if uid == 0:
        return ok("subuid/subgid", "root: rootful podman needs no ranges")
    try:
        check_subordinate_ids(user, uid)
    except C2BootError as e:
        return Check("FAIL", "subuid/subgid", str(e))
    return ok("subuid/subgid", f"ranges for {user} in /etc/subuid and /etc/subgid")


def podman_info() -> dict[str, object]:
    out = subprocess.run(["podman", "info", "--format", "json"], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["no output"])[-1]
        raise C2BootError(f"podman info fails, so podman cannot run here: {last}")
    info: dict[str, object] = json.loads(out.stdout)
    return info


def storage_driver(info: dict[str, object]) -> Check:
    store = info.get("store")
    driver = store.get("graphDriverName") if isinstance(store, dict) else None
    if driver == "overlay":
        return ok("storage driver", "overlay")
    return Check("WARN", "storage driver", f"{driver}: builds are slow and large; set driver = \"overlay\" in "
                 "storage.conf, then `podman system reset`")


def container_runs(env: dict[str, str] | None = None) -> Check:
    """Start a container with podman's default settings from any local image; the runtime, the network and the
    limits all have to work for that."""
    images = subprocess.run(["podman", "images", "--quiet"], capture_output=True, text=True, check=False,
                            env=env).stdout.split()
    if not images:
        return Check("WARN", "containers", "no local image to start a test container from; the first "
                     "`c2boot build` will show whether containers start")
    result = subprocess.run(["podman", "run", "--rm", "--entrypoint", "true", images[0]], capture_output=True,
                            text=True, check=False, env=env, timeout=CONTAINER_TIMEOUT)
    if result.returncode == 0 or "executable file" in result.stderr:  # the image lacks `true`: it still started
        return ok("containers", "a test container starts")
    for symptom, fix in RUN_FAILURES:
        if symptom in result.stderr:
            return Check("FAIL", "containers", fix)
    last = (result.stderr.strip().splitlines() or ["no output"])[-1]
    return Check("FAIL", "containers", f"a test container does not start: {last}")


def free_space(name: str, path: Path, warn: int = SPACE_WARN, fail: int = SPACE_FAIL) -> Check:
    existing = next(p for p in (path, *path.absolute().parents) if p.exists())
    free = shutil.disk_usage(existing).free
    detail = f"{free / GiB:.1f} GiB free in {existing}"
    if free < fail:
        return Check("FAIL", name, f"{detail}: free some space (a build needs about {fail / GiB:.0f} GiB)")
    return Check("WARN", name, f"{detail}: may fill up after a few builds") if free < warn else ok(name, detail)


def api_socket() -> Check:
    from container2boot.podman import socket_candidates

    for url in socket_candidates():
        if Path(url.removeprefix("unix://")).is_socket():
            return ok("podman API", f"socket {url}")
    return ok("podman API", "no socket running: builds start a private `podman system service`")


def boot_tools() -> Iterator[Check]:
    from container2boot.qemu import find_ovmf, kvm_usable

    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        yield Check("WARN", "qemu", f"not found: install {PACKAGES['qemu-system-x86_64']} to boot what you build")
        return
    yield ok("qemu", qemu)
    try:
        code, _ = find_ovmf()
        yield ok("OVMF (UEFI)", str(code))
    except C2BootError as e:
        yield Check("WARN", "OVMF (UEFI)", str(e))
        return
    seabios = Path("/usr/share/seabios/bios-256k.bin")
    yield ok("SeaBIOS", str(seabios)) if seabios.is_file() else Check(
        "WARN", "SeaBIOS", "not found: install seabios to boot --bios disks in QEMU")
    usable, why = kvm_usable()
    yield ok("KVM", why) if usable else Check("WARN", "KVM", f"{why}; QEMU uses software emulation (slower)")


HAND_OVER_TOOLS = (("ssh", "ssh", "c2boot ssh"), ("ssh-keygen", "ssh-keygen", "c2boot ssh's throw-away key"),
                   ("virsh", "virsh", "c2boot libvirt --define"))


def hand_over_tools() -> Iterator[Check]:
    """What `c2boot ssh` and `c2boot libvirt --define` run; missing ones cost only those commands."""
    for name, tool, needed_by in HAND_OVER_TOOLS:
        path = shutil.which(tool)
        yield ok(name, path) if path else Check("WARN", name, f"not found: install {PACKAGES[tool]} for {needed_by}")


def run_checks(output: Path) -> list[Check]:
    """All checks, in the order a build meets them; later checks that need podman are skipped when it is missing."""
    checks = [podman_version()]
    user, uid = getpass.getuser(), os.geteuid()
    checks.append(subordinate_ids(user, uid))
    steps: list[Callable[[], Check]] = []
    if checks[0].status != "FAIL":
        try:
            info = podman_info()
        except C2BootError as e:
            checks.append(Check("FAIL", "podman info", str(e)))
        else:
            store = info.get("store")
            graph_root = Path(str(store.get("graphRoot", "/") if isinstance(store, dict) else "/"))
            steps += [lambda: storage_driver(info), container_runs, api_socket,
                      lambda: free_space("image storage", graph_root)]
    steps.append(lambda: free_space("output", output))
    checks += [step() for step in steps]
    checks += boot_tools()
    checks += hand_over_tools()
    return checks
