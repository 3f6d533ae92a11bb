"""Issue 15 end to end: the rootbuilder published to a real registry (Debian's docker-registry on 127.0.0.1, plain
HTTP) and pulled back by the digest `c2boot rootbuilder` prints. (The containerDisk push is in test_e2e_run.)"""

import json
import subprocess
from pathlib import Path

import pytest

from container2boot import __version__
from container2boot.podman import VERSION_LABEL
from tests.conftest import c2boot, registry_digest

pytestmark = pytest.mark.slow


def podman(*args: str) -> str:
    return subprocess.run(["podman", *args], capture_output=True, text=True, check=True).stdout.strip()


def test_the_rootbuilder_is_pushed_and_pulled_back_by_its_digest(example_build: Path, local_registry: str) -> None:
    reference = f"{local_registry}/c2boot/rootbuilder:{__version__}"
    result = c2boot("rootbuilder", "--tag", reference, "--push", "--no-tls-verify")
    digest = registry_digest(local_registry, "c2boot/rootbuilder", __version__)
    pulled = f"{local_registry}/c2boot/rootbuilder@{digest}"
    assert result.stdout.strip() == pulled and f"the rootbuilder of container2boot {__version__}" in result.stderr
    local_id = podman("image", "inspect", "--format", "{{.Id}}", reference)
    podman("rmi", reference)  # the pull below must come from the registry
    try:
        podman("pull", "--quiet", "--tls-verify=false", pulled)
        [image] = json.loads(podman("image", "inspect", pulled))
        assert image["Id"] == local_id and image["Labels"][VERSION_LABEL] == __version__
    finally:
        subprocess.run(["podman", "rmi", "--ignore", pulled], capture_output=True, check=False)


def test_push_without_tls_to_a_plain_http_registry_says_what_to_do(example_build: Path, local_registry: str) -> None:
    result = c2boot("rootbuilder", "--tag", f"{local_registry}/c2boot/rootbuilder:tls", "--push", check=False)
    assert result.returncode == 1
    [error] = [line for line in result.stderr.splitlines() if "error" in line]
    assert error.startswith("c2boot: error: podman push failed") and "--no-tls-verify" in error, result.stderr
    subprocess.run(["podman", "rmi", "--ignore", f"{local_registry}/c2boot/rootbuilder:tls"], capture_output=True,
                   check=False)
