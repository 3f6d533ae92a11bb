"""End to end, inspect and doctor with real rootless podman: images are read through podman's export stream,
never built, mounted or started."""

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from container2boot.podman import external_containers
from tests.conftest import EXAMPLE_IMAGE, c2boot, derived_image

pytestmark = pytest.mark.slow
BASE_IMAGE = "docker.io/library/debian:trixie"  # present after the example build (pulled or bootstrapped)
NO_DRACUT_IMAGE = "localhost/container2boot-tests/no-dracut:latest"


@pytest.fixture(scope="module")
def no_dracut_image(example_build: Path) -> Iterator[str]:
    """The example machine with dracut removed: a kernel but nothing to build an initrd with."""
    with derived_image(NO_DRACUT_IMAGE, "rm -rf /usr/bin/dracut /usr/lib/dracut") as image:
        yield image


def test_inspect_example_image_is_bootable(example_build: Path) -> None:
    before = external_containers(check=True)
    data = json.loads(c2boot("inspect", EXAMPLE_IMAGE, "--json").stdout)
    assert data["bootable"] and data["architecture"] == "x86_64" and data["init"] == "systemd"
    assert data["kernels"][0]["modules"] and data["kernels"][0]["image"].startswith("/boot/vmlinuz-")
    assert "dmsquash-live" in data["dracut"]["live_modules"] and data["family"] == "Debian/Ubuntu"
    assert data["size_bytes"] > 100_000_000
    assert external_containers(check=True) == before  # the export container is gone


def test_inspect_base_image_is_an_application_image(example_build: Path) -> None:
    result = c2boot("inspect", BASE_IMAGE, "--cmd", "bash")
    lines = result.stdout.splitlines()
    assert lines[-1] == "OK: application image: will run `bash` as root with a supplied kernel"
    assert lines[-2].endswith("to boot without supplied parts, add `linux-image-amd64 dracut dracut-live "
                              "systemd-sysv` to the image (e.g. in its Containerfile)")


def test_inspect_image_without_dracut(no_dracut_image: str) -> None:
    result = c2boot("inspect", no_dracut_image)
    last = result.stdout.splitlines()[-1]
    assert last.startswith("OK: machine image without a usable initrd maker: boots its own kernel ")
    assert last.endswith("and its init; the supplied dracut makes the initrd")
    assert "add `dracut dracut-live` to the image" in result.stdout


def test_inspect_exported_tar_matches_the_image(example_build: Path, tmp_path: Path) -> None:
    container = subprocess.run(["podman", "create", EXAMPLE_IMAGE, "true"], capture_output=True, text=True,
                               check=True).stdout.strip()
    try:
        subprocess.run(["podman", "export", "--output", tmp_path / "rootfs.tar", container], check=True)
    finally:
        subprocess.run(["podman", "rm", container], check=True, capture_output=True)
    from_tar = json.loads(c2boot("inspect", tmp_path / "rootfs.tar", "--json").stdout)
    from_image = json.loads(c2boot("inspect", EXAMPLE_IMAGE, "--json").stdout)
    assert from_tar == from_image


def test_build_stops_before_the_slow_steps_on_app_options_for_a_machine(no_dracut_image: str,
                                                                        tmp_path: Path) -> None:
    """Checked where the rootbuilder mounts the image, before the kernel image, the initrd or the root image."""
    result = c2boot("build", "--image", no_dracut_image, "--cmd", "/bin/true", "-o", tmp_path / "out", check=False)
    assert result.returncode == 1
    assert "add --app to run the command instead of the init" in result.stderr.splitlines()[-1]
    for slow in ("==> Preparing the kernel image", "==> Building the", "==> Packing"):
        assert slow not in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_doctor_passes_on_this_host(example_build: Path) -> None:
    result = c2boot("doctor", check=False)
    assert result.returncode == 0, result.stdout
    assert "OK    containers         a test container starts" in result.stdout


def test_doctor_reports_a_broken_network_set_up_with_its_fix(example_build: Path, tmp_path: Path) -> None:
    """podman's defaults (slirp4netns networking), as on a host without our containers.conf: whatever `podman run`
    does with them here, doctor must say the same, with the fix when it fails."""
    conf = tmp_path / "containers.conf"
    conf.write_text('[engine]\nruntime = "runc"\n')
    env = {**os.environ, "CONTAINERS_CONF": str(conf)}
    plain = subprocess.run(["podman", "run", "--rm", "--entrypoint", "true", EXAMPLE_IMAGE], capture_output=True,
                           text=True, env=env, check=False)
    result = c2boot("doctor", check=False, env=env)
    line = next(ln for ln in result.stdout.splitlines() if " containers " in ln)
    if plain.returncode == 0:
        assert line.startswith("OK") and result.returncode == 0
    else:
        assert line.startswith("FAIL") and result.returncode == 1
        assert 'netns = "host"' in line, (line, plain.stderr)
