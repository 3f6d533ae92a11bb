"""Issue 16 end to end: real signals to real builds and boots (rootless podman, QEMU), real concurrent builds, a real
small filesystem filling up. Each test checks what is left afterwards: containers (buildah's too), podman services,
QEMU processes, staging and temporary directories."""

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from container2boot import podman
from container2boot.podman import external_containers
from tests.conftest import C2BOOT, EXAMPLE_IMAGE, assert_rebuilt_identically, c2boot, derived_image

pytestmark = pytest.mark.slow


def our_processes(marker: str) -> set[int]:
    """This user's processes whose command line contains `marker`."""
    found = set()
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and entry.stat().st_uid == os.getuid() and \
                    marker.encode() in (entry / "cmdline").read_bytes():
                found.add(int(entry.name))
        except OSError:
            continue
    return found


def temporary_directories() -> set[str]:
    return {p.name for p in Path("/tmp").glob("c2boot-*") if p.owner() == Path.home().owner()}


class Leftovers:
    """What exists before a run, to compare with what exists after it."""

    def __init__(self) -> None:
        self.containers = external_containers(check=True)
        self.services = our_processes("c2boot-podman-")
        self.qemus = our_processes("c2boot-qemu-")
        self.directories = temporary_directories()

    def assert_none_new(self, *places: Path) -> None:
        assert external_containers(check=True) == self.containers, "containers left behind"
        assert our_processes("c2boot-podman-") <= self.services, "podman service left running"
        assert our_processes("c2boot-qemu-") <= self.qemus, "QEMU left running"
        assert temporary_directories() <= self.directories, "temporary directories left behind"
        for place in places:
            assert list(place.iterdir()) == [], f"left in {place}: {list(place.iterdir())}"


def start(*args: str | Path) -> subprocess.Popen[str]:
    return subprocess.Popen([*C2BOOT, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(process: subprocess.Popen[str], text: str) -> list[str]:
    """Read stderr until a line starts with `text`; the lines read."""
    assert process.stderr is not None
    lines = []
    for line in process.stderr:
        lines.append(line)
        if line.startswith(text):
            return lines
    raise AssertionError(f"never reached {text!r}:\n{''.join(lines)}")


def gone(pids: set[int], within: float = 20) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if not any(Path(f"/proc/{pid}").exists() for pid in pids):
            return True
        time.sleep(0.2)
    return False


@pytest.fixture
def before() -> Iterator[Leftovers]:
    yield Leftovers()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_a_signal_during_assemble_leaves_nothing(example_build: Path, tmp_path: Path, before: Leftovers,
                                                 signum: int) -> None:
    """`timeout`, a cancelled CI job and a closed terminal stop a build like Ctrl-C does."""
    process = start("build", "--image", EXAMPLE_IMAGE, "--diskimage", "--no-cache", "-o", tmp_path / "out")
    wait_for(process, "==> Building the live initrd")
    time.sleep(2)
    process.send_signal(signum)
    _, rest = process.communicate(timeout=120)
    assert process.returncode == 128 + signum, rest
    assert f"interrupted by {signal.Signals(signum).name}" in rest
    before.assert_none_new(tmp_path)


def test_sigkill_during_assemble_is_cleaned_up_by_the_next_run(example_build: Path, tmp_path: Path,
                                                               before: Leftovers) -> None:
    process = start("build", "--image", EXAMPLE_IMAGE, "--diskimage", "--no-cache", "-o", tmp_path / "out")
    wait_for(process, "==> Building the live initrd")
    services = our_processes("c2boot-podman-") - before.services
    process.kill()
    process.wait()
    assert gone(services), "the podman service outlived c2boot's SIGKILL"
    assert [p.name[:16] for p in tmp_path.iterdir()] == [".c2boot-partial-"]  # only a run of ours may remove it
    result = c2boot("inspect", EXAMPLE_IMAGE)
    assert f"c2boot: removed what an interrupted `c2boot build` (pid {process.pid}) left behind: 1 container, " \
        "3 temporary directories" in result.stderr
    before.assert_none_new(tmp_path)


def test_sigkill_during_an_image_build_is_cleaned_up_by_the_next_run(example_build: Path, tmp_path: Path,
                                                                     before: Leftovers) -> None:
    """podman's working container of a killed build carries no label: the run's record knows when it began."""
    (tmp_path / "ctx").mkdir()
    (tmp_path / "ctx/Containerfile").write_text("FROM docker.io/library/debian:trixie\nRUN sleep 300\n")
    process = start("build", "-f", tmp_path / "ctx/Containerfile", "-o", tmp_path / "out")
    wait_for(process, "    STEP 2/2")
    time.sleep(3)
    process.kill()
    process.wait()
    assert external_containers(check=True) - before.containers, "expected the build's working container"
    result = c2boot("inspect", EXAMPLE_IMAGE)
    assert f"(pid {process.pid}) left behind: 1 container" in result.stderr
    assert gone(our_processes("sleep 300"))
    before.assert_none_new()
    assert [p.name for p in tmp_path.iterdir()] == ["ctx"]


def test_ctrl_c_twice_still_removes_the_container(example_build: Path, tmp_path: Path, before: Leftovers) -> None:
    process = start("build", "--image", EXAMPLE_IMAGE, "--no-cache", "-o", tmp_path / "out")
    wait_for(process, "==> Building the live initrd")
    time.sleep(1)
    process.send_signal(signal.SIGINT)
    time.sleep(0.3)
    process.send_signal(signal.SIGINT)
    _, rest = process.communicate(timeout=120)
    assert process.returncode == 130, rest
    before.assert_none_new(tmp_path)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL])
def test_stopping_c2boot_test_stops_qemu(example_build: Path, before: Leftovers, signum: int) -> None:
    process = start("test", example_build)
    deadline = time.monotonic() + 60
    while not (our_processes("c2boot-qemu-") - before.qemus) and time.monotonic() < deadline:
        time.sleep(0.5)
    qemus = our_processes("c2boot-qemu-") - before.qemus
    assert qemus, "QEMU never started"
    time.sleep(3)
    process.send_signal(signum)
    process.communicate(timeout=60)
    assert gone(qemus), f"QEMU outlived c2boot's {signal.Signals(signum).name}"
    if signum == signal.SIGKILL:
        cleaned = c2boot("inspect", EXAMPLE_IMAGE).stderr
        assert f"`c2boot test` (pid {process.pid}) left behind: " in cleaned and "temporary director" in cleaned
    before.assert_none_new()


def test_a_second_build_into_the_same_output_fails_at_once(example_build: Path, tmp_path: Path) -> None:
    """Also: the first build, of the example with the example build's settings, gives the same bytes (in a whole
    run the kernel image is here by now, and offered to the assemble container: unused, it changes nothing)."""
    out = tmp_path / "out"
    first = start("build", "--image", EXAMPLE_IMAGE, "--diskimage", "--no-cache", "-o", out)
    wait_for(first, "==> ")
    began = time.monotonic()
    second = c2boot("build", "--image", EXAMPLE_IMAGE, "--bios", "-o", out, check=False)
    assert time.monotonic() - began < 15
    assert second.returncode == 1
    assert second.stderr.strip().splitlines()[-1] == \
        f"c2boot: error: another c2boot (pid {first.pid}) is writing to {out}: wait until it is done, or choose " \
        "another --output"
    _, rest = first.communicate(timeout=600)
    assert first.returncode == 0, rest
    assert (out / "esp/container2boot/squashfs.img").is_file() and not (out / "esp/syslinux").exists()
    assert_rebuilt_identically(example_build, out)



def test_three_concurrent_builds_of_two_images_all_succeed(example_build: Path, tmp_path: Path,
                                                           before: Leftovers) -> None:
    """As on a shared CI runner: the same user builds at once the example from the cache (reading it while the others
    store), the example again with other settings, and another image; all share the rootbuilder and the cache, each
    gets its own complete outputs (checked against their SHA256SUMS), and nothing is left behind."""
    with derived_image("localhost/c2boot-test/concurrent:1", "echo concurrent > /etc/c2boot-concurrent") as other:
        builds = {
            "cached": start("build", "--image", EXAMPLE_IMAGE, "--diskimage", "-o", tmp_path / "cached"),
            "bios": start("build", "--image", EXAMPLE_IMAGE, "--bios", "--no-cache", "-o", tmp_path / "bios"),
            "other": start("build", "--image", other, "--diskimage", "--root-format", "erofs", "-o",
                           tmp_path / "other"),
        }
        for name, process in builds.items():
            _, stderr = process.communicate(timeout=900)
            assert process.returncode == 0, f"{name}: {stderr}"
            subprocess.run(["sha256sum", "--check", "--quiet", "SHA256SUMS"], cwd=tmp_path / name, check=True)
    assert_rebuilt_identically(example_build, tmp_path / "cached")
    assert (tmp_path / "bios/esp/syslinux").is_dir() and (tmp_path / "other/esp/container2boot/erofs.img").is_file()
    before.assert_none_new()


# A full disk ---------------------------------------------------------------------------------------------------


def rootbuilder() -> str:
    return subprocess.run(
        ["podman", "images", "--format", "{{.Repository}}:{{.Tag}}", "localhost/container2boot/rootbuilder"],
        capture_output=True, text=True, check=True).stdout.split()[0]


def assemble_on_tmpfs(size: str, name: str) -> subprocess.Popen[str]:
    """The rootbuilder alone (the CI form) writing to a real small filesystem: a tmpfs of `size` at /out."""
    return subprocess.Popen(
        ["podman", "run", "--rm", "--name", name, f"--mount=type=image,source={EXAMPLE_IMAGE},target=/rootfs",
         "--mount", f"type=tmpfs,destination=/out,tmpfs-size={size}", rootbuilder(), "--diskimage"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_outputs_that_cannot_fit_are_refused_before_the_slow_steps(example_build: Path) -> None:
    process = assemble_on_tmpfs("100m", "c2boot-test-small-out")
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 1
    errors = [line for line in output.splitlines() if line.startswith("c2boot: error: ")]
    assert len(errors) == 1 and errors[0].startswith("c2boot: error: no space left on tmpfs (/out), need about ")
    assert "==> Building the live initrd" not in output


def test_a_disk_that_fills_up_during_the_build_is_named(example_build: Path) -> None:
    """Something else fills the filesystem while the root image is packed: tar2sqfs fails with "I/O error", and
    the user reads that the disk is full, once."""
    name = "c2boot-test-filling-out"
    process = assemble_on_tmpfs("700m", name)
    assert process.stdout is not None
    lines = []
    for line in process.stdout:
        lines.append(line)
        if line.startswith("==> Packing the root image"):
            subprocess.run(["podman", "exec", name, "sh", "-c", "dd if=/dev/zero of=/out/filler bs=1M || true"],
                           capture_output=True, check=True)
    process.wait(timeout=300)
    output = "".join(lines)
    assert process.returncode == 1, output
    errors = [line for line in output.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, output
    assert errors[0].startswith("c2boot: error: no space left on tmpfs (/out), need about ")
    assert errors[0].endswith("free some space or choose another --output")


def test_errors_from_inside_the_rootbuilder_are_printed_once(example_build: Path, tmp_path: Path) -> None:
    result = c2boot("build", "--image", EXAMPLE_IMAGE, "--layout", "installed", "--size", "100M", "-o",
                    tmp_path / "out", check=False)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith("c2boot: error: --size 100M is smaller than"), result.stderr


def test_a_new_tool_image_removes_the_one_it_supersedes(example_build: Path, tmp_path: Path) -> None:
    """Each container2boot version builds its own rootbuilder (and kernel image) tag; the old one of the same base
    goes when the new one is built, another base's stays. Real podman, a one-line image."""
    repository = "localhost/c2boot-test/tool"
    (tmp_path / "Containerfile").write_text("FROM docker.io/library/debian:trixie\nLABEL purpose=test\n")
    try:
        with podman.session() as session:
            for tag, base in [("other", "base-b"), ("old", "base-a"), ("new", "base-a")]:
                session.build_tool_image(tmp_path, tmp_path / "Containerfile", f"{repository}:{tag}", base)
            tags = {t for image in session.client.images.list(filters={"reference": repository}) for t in image.tags}
        assert tags == {f"{repository}:other", f"{repository}:new"}
    finally:
        subprocess.run(["podman", "rmi", "--ignore", f"{repository}:other", f"{repository}:old",
                        f"{repository}:new"], capture_output=True, check=False)
