"""Issue 15 end to end: the rootbuilder takes its image from a registry or an OCI archive, with no podman inside,
as a non-root user; the shipped Kubernetes pods run under `podman kube play` (the restricted one with the shipped
seccomp profile) and their disk boots; the layers merged without podman are the root podman itself exports
(whiteouts, opaque directories, hardlinks, owners, xattrs)."""

import json
import re
import subprocess
import tarfile
from pathlib import Path

import pytest
import yaml

from container2boot.layers import write_root_tar
from container2boot.registry import blob, plain_or_gzip
from tests.conftest import EXAMPLE_IMAGE, READY, boot_evidence, registry_digest

pytestmark = pytest.mark.slow

DEPLOY = Path(__file__).parent.parent / "deploy"
SHIPPED_ROOTBUILDER = "registry.example.org/c2boot/rootbuilder:0.1.0"
SHIPPED_MACHINE = "docker://registry.example.org/vms/web:1"


def podman(*args: str | Path) -> str:
    result = subprocess.run(["podman", *map(str, args)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, f"podman {' '.join(map(str, args))} failed:\n{result.stderr}"
    return result.stdout.strip()


@pytest.fixture(scope="module")
def rootbuilder(example_build: Path) -> str:
    """The rootbuilder the example build used, by a name a pod spec can hold."""
    image_id = json.loads((example_build / "manifest.json").read_text())["build"]["rootbuilder"]
    return podman("image", "inspect", "--format", "{{index .RepoTags 0}}", image_id)


@pytest.fixture(scope="module")
def pushed_machine(example_build: Path, local_registry: str) -> str:
    """The example machine in the test registry: its reference there."""
    reference = f"{local_registry}/vms/machine:1"
    podman("push", "--quiet", "--tls-verify=false", EXAMPLE_IMAGE, reference)
    return reference


def play(shipped: str, rootbuilder: str, pushed_machine: str, where: Path, seccomp: Path | None = None) -> Path:
    """`podman kube play` of a shipped pod file with the image references changed (and --no-tls-verify for the test
    registry's plain HTTP), as Kubernetes would run it; its output volume exported to `where`, the pod and the volume
    removed after. Returns the outputs' directory."""
    text = (DEPLOY / shipped).read_text()
    assert SHIPPED_ROOTBUILDER in text and f'"{SHIPPED_MACHINE}"' in text
    pod = where / "pod.yaml"
    pod.write_text(text.replace(SHIPPED_ROOTBUILDER, rootbuilder)
                   .replace(f'"{SHIPPED_MACHINE}"', f'"docker://{pushed_machine}", "--no-tls-verify"'))
    name = yaml.safe_load(text)["metadata"]["name"]
    profiles = ["--seccomp-profile-root", seccomp] if seccomp else []
    try:
        podman("kube", "play", "--network", "host", *profiles, pod)  # the registry is on this host's 127.0.0.1
        status = podman("wait", f"{name}-build")
        logs = subprocess.run(["podman", "logs", f"{name}-build"], capture_output=True, text=True).stderr
        assert status == "0", logs
        podman("volume", "export", "--output", where / "volume.tar", "c2boot-out")
    finally:
        subprocess.run(["podman", "kube", "down", pod], capture_output=True, check=False)
        subprocess.run(["podman", "volume", "rm", "--force", "c2boot-out"], capture_output=True, check=False)
    (where / "volume").mkdir()
    subprocess.run(["tar", "--extract", "--file", where / "volume.tar", "--directory", where / "volume"], check=True)
    out = where / "volume" / "web"
    subprocess.run(["sha256sum", "--check", "--quiet", "SHA256SUMS"], cwd=out, check=True)
    return out


@pytest.fixture(scope="module")
def pod_outputs(tmp_path_factory: pytest.TempPathFactory, rootbuilder: str, pushed_machine: str) -> Path:
    """What deploy/kubernetes/pod.yaml made: all capabilities dropped but SYS_CHROOT, the runtime's seccomp profile,
    non-root, no privilege escalation, the outputs on a claimed volume."""
    return play("kubernetes/pod.yaml", rootbuilder, pushed_machine, tmp_path_factory.mktemp("pod"))


def test_the_shipped_pod_builds_from_the_registry_and_its_disk_boots(pod_outputs: Path, pushed_machine: str) -> None:
    """The manifest names the image by the digest the registry serves."""
    manifest = json.loads((pod_outputs / "manifest.json").read_text())
    repository, _, tag = pushed_machine.partition("/")[2].partition(":")
    assert manifest["source"]["image"] == f"docker://{pushed_machine}"
    assert manifest["source"]["digest"] == registry_digest(pushed_machine.partition("/")[0], repository, tag)
    assert {"fetch", "layers"} <= set(manifest["timings_seconds"])
    boot_evidence(pod_outputs / "disk.img", READY)


def test_the_pods_root_image_keeps_the_images_owners_and_modes(pod_outputs: Path, rootbuilder: str,
                                                               tmp_path: Path) -> None:
    """Built by user 1000 with no capability, which can neither chown nor keep a setuid bit on what it unpacks:
    the root image still holds root's setuid passwd and the shadow group's /etc/shadow, as the image has them."""
    paths = ["usr/bin/passwd", "etc/shadow", "etc/passwd"]
    image = podman("run", "--rm", "--entrypoint", "stat", EXAMPLE_IMAGE, "-c", "%a %u %g",
                   *(f"/{path}" for path in paths)).splitlines()
    with (tmp_path / "root.tar").open("wb") as listing:
        subprocess.run(["podman", "run", "--rm", "-v", f"{pod_outputs / 'esp' / 'container2boot'}:/r:ro",
                        "--entrypoint", "sqfs2tar", rootbuilder, "/r/squashfs.img"], stdout=listing, check=True,
                       stderr=subprocess.DEVNULL)
    with tarfile.open(tmp_path / "root.tar") as tar:
        packed = [tar.getmember(path) for path in paths]
    assert [f"{info.mode:o} {info.uid} {info.gid}" for info in packed] == image


def test_the_restricted_pod_makes_the_same_disk(pod_outputs: Path, rootbuilder: str, pushed_machine: str,
                                                tmp_path: Path) -> None:
    """pod-restricted.yaml: no capability at all, the shipped seccomp profile instead. Its outputs are the other
    pod's, byte for byte (the same image, options and rootbuilder), so that disk's boot stands for both."""
    out = play("kubernetes/pod-restricted.yaml", rootbuilder, pushed_machine, tmp_path,
               seccomp=DEPLOY / "kubernetes" / "seccomp")
    assert (out / "SHA256SUMS").read_text() == (pod_outputs / "SHA256SUMS").read_text()


def test_an_oci_archive_is_assembled_without_podman_inside(rootbuilder: str, tmp_path: Path) -> None:
    """`podman save --format oci-archive`, handed to the rootbuilder as a file: the manifest records the digest
    skopeo reads from the archive, and the image's own run configuration."""
    archive = tmp_path / "in" / "machine.tar"
    archive.parent.mkdir()
    podman("save", "--quiet", "--format", "oci-archive", "--output", archive, EXAMPLE_IMAGE)
    out = tmp_path / "out"
    out.mkdir()
    try:
        podman("run", "--rm", "--user", "1000:1000", "--cap-drop", "all", "--cap-add", "SYS_CHROOT",
               "--security-opt", "no-new-privileges", "-v", f"{archive.parent}:/in:ro", "-v", f"{out}:/out:U",
               "--entrypoint", "c2boot", rootbuilder, "assemble", "oci-archive:/in/machine.tar", "--output",
               "/out/result")
        manifest = json.loads(podman("unshare", "cat", out / "result" / "manifest.json"))
        listing = podman("unshare", "ls", out / "result" / "esp" / "container2boot")
    finally:  # the outputs belong to the container's user 1000: only podman unshare removes them
        subprocess.run(["podman", "unshare", "rm", "-rf", out], capture_output=True, check=False)
    assert manifest["source"]["image"] == "oci-archive:/in/machine.tar"
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", manifest["source"]["digest"])
    assert manifest["source"]["id"] == podman("image", "inspect", "--format", "{{.Id}}", EXAMPLE_IMAGE)
    assert {"vmlinuz", "initrd.img"} <= set(listing.split())


def test_a_missing_image_and_a_plain_http_registry_are_clear_errors(rootbuilder: str, local_registry: str) -> None:
    def assemble(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["podman", "run", "--rm", "--network", "host", "--entrypoint", "c2boot", rootbuilder,
                               "assemble", *args, "--output", "/tmp/out"], capture_output=True, text=True)

    missing = assemble(f"docker://{local_registry}/vms/nothing:1", "--no-tls-verify")
    tls = assemble(f"docker://{local_registry}/vms/machine:1")
    for result in (missing, tls):
        assert result.returncode == 1
        [error] = [line for line in result.stderr.splitlines() if line.startswith("c2boot: error:")]
        assert error.startswith("c2boot: error: cannot fetch docker://") and "--no-tls-verify" in error, error


# Whiteouts (of a directory, of a file), an opaque directory (removed and made again), hardlinks in one layer and to
# a lower layer's file, an owner and a mode a unpack must keep.
ROOT_CHANGES = """set -e
rm -rf /usr/share/doc/bash /etc/motd
rm -rf /etc/apt/apt.conf.d && mkdir /etc/apt/apt.conf.d && touch /etc/apt/apt.conf.d/new
mkdir /srv/links && echo same > /srv/links/a && ln /srv/links/a /srv/links/b
ln /usr/bin/dash /srv/links/dash
chown 1234:5678 /srv/links/a && chmod 4750 /srv/links/a
"""


def root_table(path: Path) -> tuple[dict[str, tuple[object, ...]], list[list[str]]]:
    """Every path of a root tar but /dev's (podman's export leaves its device nodes out) with what unpacking it
    sets, and its hardlink groups."""
    entries: dict[str, tuple[object, ...]] = {}
    links: dict[str, set[str]] = {}
    with tarfile.open(path) as tar:
        for info in tar:
            name = "/".join(part for part in info.name.split("/") if part not in ("", "."))
            if not name or name == "dev" or name.startswith("dev/"):
                continue
            if info.islnk():
                target = "/".join(part for part in info.linkname.split("/") if part not in ("", "."))
                links.setdefault(target, {target}).add(name)
            xattrs = sorted((k, v) for k, v in info.pax_headers.items() if k.startswith("SCHILY.xattr."))
            entries[name] = (info.isdir(), info.isreg() or info.islnk(), info.issym(), info.mode & 0o7777, info.uid,
                             info.gid, info.linkname if info.issym() else "", xattrs, int(info.mtime))
    return entries, sorted(sorted(group) for group in links.values())


def test_merged_layers_are_the_root_podman_exports(example_build: Path, tmp_path: Path) -> None:
    tag = "localhost/container2boot/test-layers:latest"
    (tmp_path / "changes.sh").write_text(ROOT_CHANGES)
    (tmp_path / "Containerfile").write_text(f"FROM {EXAMPLE_IMAGE}\nCOPY changes.sh /tmp/\nRUN sh /tmp/changes.sh\n"
                                            "RUN rm /tmp/changes.sh\n")
    podman("build", "--quiet", "--tag", tag, tmp_path)
    container = podman("create", tag, "/sbin/init")
    try:
        podman("export", "--output", tmp_path / "export.tar", container)
        podman("push", "--quiet", tag, f"dir:{tmp_path / 'layout'}")
    finally:
        subprocess.run(["podman", "rm", container], capture_output=True, check=False)
        subprocess.run(["podman", "rmi", tag], capture_output=True, check=False)
    manifest = json.loads((tmp_path / "layout" / "manifest.json").read_text())
    layers = tuple(plain_or_gzip(blob(tmp_path / "layout", layer["digest"])) for layer in manifest["layers"])
    merged, merged_links = root_table(write_root_tar(layers, tmp_path / "merged.tar"))
    exported, exported_links = root_table(tmp_path / "export.tar")
    assert "usr/share/doc/bash" not in merged and "etc/motd" not in merged
    assert [name for name in merged if name.startswith("etc/apt/apt.conf.d/")] == ["etc/apt/apt.conf.d/new"]
    assert ["srv/links/a", "srv/links/b"] in merged_links and merged["srv/links/a"][3:6] == (0o4750, 1234, 5678)
    assert any("srv/links/dash" in group for group in merged_links) and "tmp/changes.sh" not in merged
    assert set(merged) == set(exported)
    assert {name for name in merged if merged[name] != exported[name]} == set()
    assert merged_links == exported_links
