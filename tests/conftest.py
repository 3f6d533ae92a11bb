"""Shared fixtures. End-to-end tests run the real `c2boot` CLI with rootless podman; they never skip: a missing
tool is a failure, so CI can't pass without booting anything."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import pytest

from container2boot import qemu

C2BOOT = [sys.executable, "-m", "container2boot"]
EXAMPLE_IMAGE = "localhost/container2boot/machine:latest"
# The example machine's own announcement (c2boot-ready.service) and the login prompt, both from the booted system.
READY = r"container2boot: reached multi-user\.target, root filesystem overlay"


def in_either_order(first: str, second: str) -> str:
    """A regex for two console lines that race: the ready line and the serial getty's prompt come in either order
    (seen in CI: "c2boot-demo login: container2boot: reached multi-user.target, ...")."""
    return rf"{first}[\s\S]*{second}|{second}[\s\S]*{first}"


def c2boot(*args: str | Path, check: bool = True, cwd: Path | None = None,
           env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([*C2BOOT, *map(str, args)], capture_output=True, text=True, cwd=cwd,
                            env=env, check=False)
    if check and result.returncode != 0:
        raise AssertionError(f"c2boot {' '.join(map(str, args))} failed ({result.returncode}):\n{result.stderr}")
    return result


def boot_evidence(disk: Path, pattern: str, firmware: str = "uefi", snapshot: bool = True) -> str:
    """Boot `disk` in QEMU and return its serial console; fails unless the booted system printed `pattern`
    (a regex) within 300 s (boot_until boots once more after an emulator fault). With `snapshot` False the guest's
    writes reach `disk`."""
    result = qemu.boot_until(disk, pattern, firmware=firmware, timeout=300, snapshot=snapshot)
    assert result.matched, f"no evidence ({pattern}) under {firmware} after {result.seconds:.0f}s:\n" \
        f"{result.console[-3000:]}"
    return result.console


def collect(stream: IO[bytes], sink: list[bytes]) -> None:
    while chunk := stream.read1(4096):  # type: ignore[attr-defined]
        sink.append(chunk)


class Running:
    """`c2boot run` in the background, its console collected; started again once after a fault of the emulator, as
    `c2boot test` does (qemu.boot_again_after)."""

    def __init__(self, *args: str | Path) -> None:
        self.args = [*C2BOOT, "run", *map(str, args)]
        self.restarted = False
        self.start()

    def start(self) -> None:
        self.process = subprocess.Popen(self.args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE)
        self.console: list[bytes] = []
        threading.Thread(target=collect, args=(self.process.stdout, self.console), daemon=True).start()

    def text(self) -> str:
        return b"".join(self.console).decode(errors="replace").replace("\r", "")

    def wait_for(self, pattern: str, timeout: float = 300) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if match := re.search(pattern, self.text()):
                return match
            if not self.restarted and qemu.boot_again_after(self.text()):
                self.stop()
                self.restarted = True
                self.start()
                deadline = time.monotonic() + timeout
                continue
            assert self.process.poll() is None, f"QEMU ended before {pattern!r}:\n{self.text()[-3000:]}"
            time.sleep(1)
        raise AssertionError(f"no {pattern!r} within {timeout} s:\n{self.text()[-3000:]}")

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=60)


@contextmanager
def derived_image(tag: str, script: str) -> Iterator[str]:
    """The example machine changed by a shell `script` (run in a container, committed as `tag`), removed after."""
    name = tag.rpartition("/")[2].replace(":", "-")
    subprocess.run(["podman", "run", "--name", name, "--entrypoint", "sh", EXAMPLE_IMAGE, "-c", script],
                   check=True, capture_output=True)
    try:
        subprocess.run(["podman", "commit", "--quiet", name, tag], check=True, capture_output=True)
    finally:
        subprocess.run(["podman", "rm", "--force", name], check=True, capture_output=True)
    try:
        yield tag
    finally:
        subprocess.run(["podman", "rmi", "--force", tag], check=False, capture_output=True)


def assert_rebuilt_identically(first: Path, again: Path) -> None:
    """Reproducible outputs: every file in SHA256SUMS (disk.img included) and the manifest but its timings."""
    manifests = [json.loads((out / "manifest.json").read_text()) for out in (first, again)]
    assert manifests[0]["source"]["id"] == manifests[1]["source"]["id"], "the image itself was rebuilt"
    assert (first / "SHA256SUMS").read_text() == (again / "SHA256SUMS").read_text()
    subprocess.run(["sha256sum", "--check", "--quiet", "SHA256SUMS"], cwd=again, check=True)
    for manifest in manifests:
        del manifest["timings_seconds"], manifest["cache"]
    assert manifests[0] == manifests[1]


def require_host_tools(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    assert not missing, f"missing on this host: {missing} (run scripts/setup-host)"


@pytest.fixture(scope="session", autouse=True)
def own_build_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The session's builds share a cache of their own: nothing from earlier runs is reused, nothing is left in
    ~/.cache. Tests that need the stages to run pass --no-cache."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg-cache")))
        yield


@pytest.fixture(scope="session")
def example_build(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """`c2boot build --diskimage` of the bundled example, once per test session."""
    require_host_tools("podman", "qemu-system-x86_64", "sfdisk")
    assert os.geteuid() != 0, "the end-to-end tests run rootless: run them as a normal user (scripts/test does)"
    out = tmp_path_factory.mktemp("example") / "out"
    result = c2boot("build", "--diskimage", "--output", out)
    assert "demo user's password is" in result.stderr
    yield out


@pytest.fixture(scope="session")
def local_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Debian's docker-registry on 127.0.0.1 (a free port, plain HTTP), its storage in a temporary directory,
    stopped afterwards: 'HOST:PORT'."""
    require_host_tools("docker-registry")
    root = tmp_path_factory.mktemp("registry")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    (root / "config.yml").write_text(f"version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {root / 'data'}\n"
                                     f"http:\n  addr: 127.0.0.1:{port}\n")
    with (root / "registry.log").open("w") as log:
        server = subprocess.Popen(["docker-registry", "serve", root / "config.yml"], stdout=log,
                                  stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=2):
                    break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, \
                    f"docker-registry did not start: {(root / 'registry.log').read_text()[-500:]}"
                time.sleep(0.3)
        yield f"127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(timeout=30)


def registry_digest(registry: str, repository: str, tag: str) -> str:
    """The digest the registry serves for REPOSITORY:TAG (its Docker-Content-Digest), as a pull by tag gets it."""
    accept = ", ".join(["application/vnd.oci.image.manifest.v1+json",
                        "application/vnd.docker.distribution.manifest.v2+json"])
    request = urllib.request.Request(f"http://{registry}/v2/{repository}/manifests/{tag}", method="HEAD",
                                     headers={"Accept": accept})
    with urllib.request.urlopen(request, timeout=10) as response:
        return str(response.headers["Docker-Content-Digest"])
