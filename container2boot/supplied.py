"""What a build adds to the image's root, as a separate tree copied in after the image's files: the supplied
kernel's modules for a userland without a kernel, and for an application image container2boot's init under
/container2boot. (The login files of accounts.py go into the same tree; the image's files they replace are left
out of the root, never overwritten in the image.)

The init is glue around static programs from Debian's packages, so that it depends on nothing in the image (an
image FROM scratch has no shell, no libc, no passwd): busybox (its shell runs the init script; mount, ip, udhcpc,
poweroff), tini (a subreaper that forwards signals to the app and reaps its orphans) and gosu (switches to the
app's user). They come from the system that runs the assemble stage: the rootbuilder.
"""

import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path

from container2boot.errors import C2BootError
from container2boot.plan import App
from container2boot.rootfs import dpkg_stanzas
from container2boot.templates import render_to
from container2boot.tree import DPKG_STATUS, Tree

APP_DIR = "container2boot"  # /container2boot in the booted root: everything the app mode adds
INIT = f"/{APP_DIR}/init"
STATIC_PROGRAMS = {  # name in /container2boot/bin -> where Debian's package puts it
    "busybox": ("/usr/bin/busybox", "/bin/busybox"),
    "tini": ("/usr/bin/tini-static", "/usr/bin/tini"),
    "gosu": ("/usr/sbin/gosu", "/usr/bin/gosu"),
}
PACKAGES = "busybox-static tini gosu"
STOP_GRACE_SECONDS = 10  # after the stop signal, before SIGKILL (podman stop's default)
APPLETS = ("cat", "dd", "echo", "env", "grep", "hostname", "ip", "kill", "ln", "mkdir", "mount", "poweroff",
           "printf", "sed", "sh", "sleep", "sync", "udhcpc")  # what the init and its udhcpc hook call


@dataclass(frozen=True)
class Supplied:
    """The tree of files the build adds to the root, and the image's paths it replaces or resets (left out)."""

    tree: Path
    left_out: tuple[str, ...] = ()


def modules_dir(tree: Tree) -> str:
    """Where kernel modules go in this image: /usr/lib/modules when /lib is (a link to) usr/lib, else /lib/modules
    (an image without /lib gets one)."""
    resolved = tree.resolve("lib")
    return f"{resolved}/modules" if resolved else "lib/modules"


def add_modules(supplied: Path, kernel_modules: Path, image: Tree) -> str:
    """Copy the supplied kernel's modules directory into the supplied tree; returns their path in the root."""
    target = f"{modules_dir(image)}/{kernel_modules.name}"
    if image.entry(target) is not None:
        raise C2BootError(f"the image already has /{target}: pass --supplied-kernel only for images without that "
                          "kernel's modules")
    shutil.copytree(kernel_modules, supplied / target, symlinks=True)
    return "/" + target


def package_version(root: Path, kernel_version: str) -> str | None:
    """The Debian package version of the kernel image in `root` (its dpkg status), for the manifest."""
    try:
        status = (root / DPKG_STATUS).read_text(errors="replace")
    except OSError:
        return None
    for fields in dpkg_stanzas(status):
        if fields.get("Package", "").startswith(f"linux-image-{kernel_version}"):
            return f"{fields['Package']} {fields.get('Version', '')}".strip()
    return None


def static_program(name: str) -> Path:
    for candidate in STATIC_PROGRAMS[name]:
        if Path(candidate).is_file():
            return Path(candidate)
    raise C2BootError(f"{name} (static) not found: install {PACKAGES} or run inside the rootbuilder container")


def add_app_runtime(supplied: Path, app: App, hostname: str) -> None:
    """/container2boot: the init, its static programs, and the app's configuration as a shell file."""
    base = supplied / APP_DIR
    (base / "bin").mkdir(parents=True)
    for name in STATIC_PROGRAMS:
        shutil.copy2(static_program(name), base / "bin" / name)
        (base / "bin" / name).chmod(0o755)
    for applet in APPLETS:
        (base / "bin" / applet).symlink_to("busybox")
    render_to(base / "init", "app-init.sh.j2", app_dir=f"/{APP_DIR}", grace=STOP_GRACE_SECONDS).chmod(0o755)
    render_to(base / "udhcpc.script", "udhcpc.script.j2", app_dir=f"/{APP_DIR}").chmod(0o755)
    render_to(base / "app.conf", "app.conf.j2", command=" ".join(shlex.quote(a) for a in app.command),
              command_text=shlex.quote(app.shell_command), env=[shlex.quote(e) for e in app.env],
              workdir=shlex.quote(app.workdir), user=shlex.quote(app.user),
              stop_signal=app.stop_signal.removeprefix("SIG"), hostname=shlex.quote(hostname),
              home=shlex.quote(app.home))


def add_os_release(supplied: Path, image: Tree, hostname: str) -> bool:
    """systemd in the initrd refuses to switch to a root without an os-release file ("does not seem to be an OS
    tree"): an image that has none (FROM scratch, distroless) gets /usr/lib/os-release naming it. True if added."""
    if image.is_file("etc/os-release") or image.is_file("usr/lib/os-release"):
        return False
    render_to(supplied / "usr/lib/os-release", "os-release.j2", app=hostname)
    return True


MOUNT_POINTS = ("proc", "sys", "dev", "run", "tmp", "etc", "usr")  # usr: dracut's live module looks for it


def add_mount_points(supplied: Path, image: Tree) -> list[str]:
    """Empty directories for what the init mounts (and /usr, which dracut's live module takes as the sign of a
    root filesystem), where the image has none; returns those added."""
    added = [name for name in MOUNT_POINTS if image.entry(name) is None]
    for name in added:
        (supplied / name).mkdir(mode=0o1777 if name == "tmp" else 0o755, exist_ok=True)
        (supplied / name).chmod(0o1777 if name == "tmp" else 0o755)
    return added
