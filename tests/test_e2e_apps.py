"""Issue 11 end to end: images that are not machine images boot, with real rootless builds and real QEMU boots.
Every verdict comes from the booted system: the app's own output on the console, a page fetched from the app
through a forwarded port, the app's exit status, the init's and the kernel's own lines."""

import json
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import C2BOOT, Running, boot_evidence, c2boot

pytestmark = pytest.mark.slow
DEBIAN = "docker.io/library/debian:trixie"


def build_image(tag: str, context: Path, containerfile: str) -> str:
    (context / "Containerfile").write_text(containerfile)
    subprocess.run(["podman", "build", "--quiet", "--tag", tag, str(context)], check=True, capture_output=True)
    return tag


@pytest.fixture(scope="module")
def busybox(example_build: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A static busybox from the rootbuilder (Debian's busybox-static), for images FROM scratch."""
    rootbuilder = subprocess.run(
        ["podman", "images", "--format", "{{.Repository}}:{{.Tag}}", "localhost/container2boot/rootbuilder"],
        capture_output=True, text=True, check=True).stdout.split()[0]
    path = tmp_path_factory.mktemp("busybox") / "busybox"
    path.write_bytes(subprocess.run(["podman", "run", "--rm", "--entrypoint", "cat", rootbuilder, "/usr/bin/busybox"],
                                    capture_output=True, check=True).stdout)
    path.chmod(0o755)
    return path


@pytest.fixture(scope="module")
def scratch_images(busybox: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """FROM scratch with only a static busybox: a web server as a numeric non-root user (ENV, WORKDIR), and a
    batch job that exits with status 3."""
    context = tmp_path_factory.mktemp("scratch")
    (context / "busybox").write_bytes(busybox.read_bytes())
    (context / "www").mkdir()
    (context / "www/index.html").write_text("served by a FROM scratch image\n")
    (context / "serve").write_text("#!/bin/busybox sh\n"
                                   "echo app: uid=$(/bin/busybox id -u) greeting=$GREETING cwd=$(/bin/busybox pwd)\n"
                                   'exec /bin/busybox httpd -f -p "$1" -h .\n')
    server = build_image("localhost/c2boot-test/scratch-httpd:1", context, """FROM scratch
COPY --chmod=0755 busybox serve /bin/
COPY www /srv/www
ENV GREETING=hello-from-env
WORKDIR /srv/www
USER 1000:1000
ENTRYPOINT ["/bin/serve"]
CMD ["8080"]
""")
    batch = build_image("localhost/c2boot-test/scratch-batch:1", context, """FROM scratch
COPY --chmod=0755 busybox /bin/busybox
CMD ["/bin/busybox", "sh", "-c", "echo batch: working; exit 3"]
""")
    yield server, batch
    subprocess.run(["podman", "rmi", "--force", server, batch], check=False, capture_output=True)


def fetch(url: str, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return str(response.read().decode())
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


def test_a_from_scratch_web_server_runs_as_its_user_under_bios(scratch_images: tuple[str, str],
                                                                tmp_path: Path) -> None:
    """Without the kernel image at hand (it is untagged first), the rootbuilder finds that the image needs it, and
    the host makes it and assembles again."""
    server, _ = scratch_images
    out = tmp_path / "out"
    kernel_images = subprocess.run(["podman", "images", "--format", "{{.Repository}}:{{.Tag}}",
                                    "localhost/container2boot/kernel"], capture_output=True, text=True,
                                   check=True).stdout.split()
    for tag in kernel_images:
        subprocess.run(["podman", "untag", tag], check=True, capture_output=True)
    result = c2boot("build", "--image", server, "--diskimage", "--bios", "--format", "qcow2", "-o", out)
    assert "needs the supplied kernel (or its dracut): preparing the kernel image" in result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["image_kind"] == "app" and manifest["kernel"]["source"] == "supplied"
    assert manifest["plan"]["app"]["command"] == ["/bin/serve", "8080"]
    assert manifest["supplied_kernel"]["package"].startswith("linux-image-")
    disk = out / "disk.img"
    assert disk.stat().st_size < 100 * 1024 * 1024, "a few-MB app makes a disk under 100 MiB"
    running = Running(out, "--firmware", "bios", "--publish", "18080:8080")
    try:
        running.wait_for(r"app: uid=1000 greeting=hello-from-env cwd=/srv/www")
        assert fetch("http://127.0.0.1:18080/index.html") == "served by a FROM scratch image\n"
        assert "SYSLINUX" in running.text()
    finally:
        running.stop()


def test_a_batch_job_powers_off_with_its_status_on_an_installed_disk(scratch_images: tuple[str, str],
                                                                     tmp_path: Path) -> None:
    _, batch = scratch_images
    out = tmp_path / "out"
    c2boot("build", "--image", batch, "--layout", "installed", "-o", out)
    process = subprocess.run([*C2BOOT, "run", str(out)], stdin=subprocess.DEVNULL, capture_output=True,
                             timeout=400, check=False)
    console = process.stdout.decode(errors="replace")
    assert "batch: working" in console and "container2boot: the app exited with status 3" in console, console
    assert process.returncode == 3, process.stderr.decode()
    assert "Kernel panic" not in console and "reboot" not in console.lower().split("batch: working")[1]
    report = json.loads(c2boot("test", out, "--json", check=False).stdout)
    assert not report["ok"] and report["app_exit_status"] == 3


def test_a_debian_application_image_serves_its_page(example_build: Path, tmp_path: Path) -> None:
    """Like the official nginx image: nginx on Debian, no kernel, no init, CMD nginx -g 'daemon off;'."""
    context = tmp_path / "ctx"
    context.mkdir()
    image = build_image("localhost/c2boot-test/nginx:1", context, f"""FROM {DEBIAN}
RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends nginx \\
 && rm -rf /var/lib/apt/lists/* && echo "nginx in a container2boot machine" > /var/www/html/index.html \\
 && ln -sf /dev/stdout /var/log/nginx/access.log && ln -sf /dev/stderr /var/log/nginx/error.log
EXPOSE 80
STOPSIGNAL SIGQUIT
CMD ["nginx", "-g", "daemon off;"]
""")
    try:
        inspected = c2boot("inspect", image)
        assert "OK: application image: will run `nginx -g 'daemon off;'` as root with a supplied kernel" in \
            inspected.stdout
        out = tmp_path / "out"
        c2boot("build", "--image", image, "--diskimage", "-o", out)
        running = Running(out, "--publish", "18081:80")
        try:
            running.wait_for(r"container2boot: starting the app as root: nginx -g 'daemon off;'")
            assert fetch("http://127.0.0.1:18081/") == "nginx in a container2boot machine\n"
            running.wait_for(r'"GET / HTTP/1.1" 200')  # nginx's access log, on the console like container logs
        finally:
            running.stop()
        # The supplied kernel is Debian's signed one, and the rootbuilder's signed shim and GRUB boot it.
        report = json.loads(c2boot("test", out, "--firmware", "secure-boot", "--json").stdout)
        assert report["ok"] and report["app_command"] == "nginx -g 'daemon off;'" and report["app_exit_status"] is None
        assert json.loads((out / "manifest.json").read_text())["boot"]["bootloader"] == "shim+grub (signed, debian)"
    finally:
        subprocess.run(["podman", "rmi", "--force", image], check=False, capture_output=True)


def test_a_userland_without_a_kernel_boots_its_systemd(example_build: Path, tmp_path: Path) -> None:
    """debian:trixie with systemd-sysv but no kernel: the supplied kernel, its modules loadable by the image's own
    udev and kmod."""
    context = tmp_path / "ctx"
    context.mkdir()
    (context / "modules-ok.service").write_text("""[Unit]
Description=Load a module from the supplied kernel
DefaultDependencies=no
After=multi-user.target
[Service]
Type=oneshot
ExecStart=/usr/local/bin/modules-ok
[Install]
WantedBy=multi-user.target
""")
    (context / "modules-ok").write_text("#!/bin/sh\nmodprobe dummy && grep -q '^dummy ' /proc/modules &&\n"
                                        'echo "c2boot-test: module dummy loaded on $(uname -r)" > /dev/console\n')
    image = build_image("localhost/c2boot-test/userland:1", context, f"""FROM {DEBIAN}
RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends systemd-sysv \\
      udev kmod && rm -rf /var/lib/apt/lists/*
COPY --chmod=0755 modules-ok /usr/local/bin/
COPY modules-ok.service /etc/systemd/system/
RUN systemctl enable modules-ok.service
""")
    try:
        out = tmp_path / "out"
        c2boot("build", "--image", image, "--diskimage", "--netboot", "-o", out)
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["image_kind"] == "userland" and manifest["kernel"]["source"] == "supplied"
        console = boot_evidence(out / "disk.img", r"c2boot-test: module dummy loaded on \S+")
        assert f"module dummy loaded on {manifest['kernel']['version']}" in console
        # The supplied dracut's network modules: the same root over HTTP, no disk.
        report = json.loads(c2boot("test", out, "--netboot", "--json").stdout)
        assert report["ok"] and report["boot"] == "network" and report["system_state"] == "running", report
    finally:
        subprocess.run(["podman", "rmi", "--force", image], check=False, capture_output=True)


def test_an_image_with_initramfs_tools_boots_its_own_kernel(example_build: Path, tmp_path: Path) -> None:
    context = tmp_path / "ctx"
    context.mkdir()
    image = build_image("localhost/c2boot-test/initramfs-tools:1", context, f"""FROM {DEBIAN}
RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \\
      linux-image-amd64 initramfs-tools systemd-sysv udev kmod && rm -rf /var/lib/apt/lists/* /boot/initrd.img*
""")
    try:
        inspected = c2boot("inspect", image).stdout
        assert "(initramfs-tools instead)" in inspected and "the supplied dracut makes the initrd" in inspected
        out = tmp_path / "out"
        c2boot("build", "--image", image, "--diskimage", "-o", out, "--cmdline", "systemd.hostname=own-kernel")
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["image_kind"] == "own-kernel" and manifest["kernel"]["source"] == "image"
        report = json.loads(c2boot("test", out, "--json").stdout)
        assert report["ok"] and report["system_state"] == "running", report
    finally:
        subprocess.run(["podman", "rmi", "--force", image], check=False, capture_output=True)


def test_bad_images_fail_before_the_slow_steps(busybox: Path, tmp_path: Path) -> None:
    """Each a one-line error right after the image is inspected; nothing is left behind."""
    from container2boot.podman import external_containers

    context = tmp_path / "ctx"
    context.mkdir()
    (context / "busybox").write_bytes(busybox.read_bytes())
    nothing = build_image("localhost/c2boot-test/nothing-to-run:1", context,
                          "FROM scratch\nCOPY --chmod=0755 busybox /bin/busybox\n")
    (context / "Containerfile").write_text("FROM scratch\nCOPY --chmod=0755 busybox /bin/busybox\n"
                                           "CMD [\"/bin/busybox\", \"true\"]\n")
    subprocess.run(["podman", "build", "--quiet", "--arch", "arm64", "--tag", "localhost/c2boot-test/arm64:1",
                    str(context)], check=True, capture_output=True)
    cases = [
        (["--image", "localhost/c2boot-test/arm64:1"], "is built for aarch64, and container2boot makes x86_64"),
        (["--image", nothing], "nothing to run: "),
        (["--image", nothing, "--cmd", "/bin/busybox true", "--user", "www"], "user 'www' is not in the image"),
    ]
    before = external_containers(check=True)
    try:
        for args, message in cases:
            result = c2boot("build", *args, "-o", tmp_path / "out", check=False)
            errors = [line for line in result.stderr.splitlines() if line.startswith("c2boot: error: ")]
            assert result.returncode == 1 and len(errors) == 1 and message in errors[0], result.stderr
            assert "==> Building the" not in result.stderr and "==> Packing" not in result.stderr
        assert external_containers(check=True) == before and sorted(p.name for p in tmp_path.iterdir()) == ["ctx"]
    finally:
        subprocess.run(["podman", "rmi", "--force", nothing, "localhost/c2boot-test/arm64:1"], check=False,
                       capture_output=True)
