"""The one way container2boot runs an external tool, and the one place that knows which versions it needs."""

import re
import shlex
import shutil
import subprocess
from collections import deque
from collections.abc import Mapping, Sequence
from functools import cache
from pathlib import Path

from container2boot.errors import C2BootError
from container2boot.log import logger, tool_line

# Oldest versions that do what we ask of them. systemd-repart gained --offline (building without loop devices,
# as a normal user) in 254.
MIN_VERSIONS: Mapping[str, tuple[int, ...]] = {
    "systemd-repart": (254,),
    "podman": (4, 3),
}

# What provides each tool, for the "install it" hint.
PACKAGES: Mapping[str, str] = {
    "systemd-repart": "systemd-repart (Debian trixie or newer) / systemd-repart (Fedora)",
    "tar2sqfs": "squashfs-tools-ng",
    "mkfs.erofs": "erofs-utils",
    "grub-mkimage": "grub-efi-amd64-bin (Debian) / grub2-tools (Fedora)",
    "mcopy": "mtools",
    "mformat": "mtools",
    "mkfs.vfat": "dosfstools",
    "mkfs.ext4": "e2fsprogs",
    "mkfs.xfs": "xfsprogs",
    "mkfs.btrfs": "btrfs-progs",
    "unshare": "util-linux",
    "podman": "podman",
    "mmdebstrap": "mmdebstrap",
    "qemu-system-x86_64": "qemu-system-x86",
    "tar": "tar",
    "syslinux": "syslinux (Debian, Fedora)",
    "sfdisk": "fdisk (Debian) / util-linux (Fedora)",
    "qemu-img": "qemu-utils (Debian) / qemu-img (Fedora)",
    "xz": "xz-utils",
    "zstd": "zstd",
    "gzip": "gzip",
    "mdir": "mtools",
    "openssl": "openssl",
    "ssh": "openssh-client",
    "ssh-keygen": "openssh-client",
    "skopeo": "skopeo",
    "virsh": "libvirt-clients (Debian) / libvirt-client (Fedora)",
}

# dracut's live module (dmsquash-live) changed how it is asked for a tmpfs overlay. dracut-ng (100 and newer) takes
# an image with /usr at its top as an overlayfs root by itself, and wants rd.live.overlay.readonly so that it does
# not wait for a persistent overlay. dracut 059 (Debian 12) uses overlayfs only when asked, and reads
# rd.live.overlay.readonly as a persistent overlay's mode: without one, its sysroot.mount fails ("overlayfs:
# failed to resolve '/run/overlayfs'") and the boot ends in the emergency shell. Asked with
# rd.live.overlay.overlayfs=1, 059's first sysroot.mount still fails the same way (its overlay directories are made
# by a mount hook that runs after it: a dracut 059 bug), and that hook then mounts the root: the boot goes on.
DRACUT_NG = (100,)

ERROR_TAIL_LINES = 20  # shown with --verbose when a tool fails


def require_tool(name: str) -> str:
    """Path of `name`, or an error that says which package to install."""
    path = shutil.which(name)
    if path is None:
        package = PACKAGES.get(name, name)
        raise C2BootError(f"{name} not found: install {package} (or run inside the rootbuilder container)")
    return path


def run(
    argv: Sequence[str | Path],
    *,
    stdin: int | None = None,
    input: str | None = None,
    stdout: int | None = None,
    capture: bool = False,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    name: str | None = None,
    check: bool = True,
    interactive: bool = False,
    follow: bool = False,
) -> subprocess.CompletedProcess[str]:
    """Run a tool, log its command line, and turn a failure into an error naming the tool and its last output.

    Output is captured (and shown only on failure, or with --verbose) unless `stdout` redirects it;
    `capture` keeps stdout in the result for the caller; `input` is text fed to the tool's stdin; `name` is what
    errors call the tool when argv[0] is only a wrapper around it; with `check` False the caller judges the exit
    status; `interactive` gives the tool this terminal (stdin, stdout and stderr), as `c2boot ssh` does;
    `follow` shows each line the tool writes beside the running stage as it comes (a long tool: dracut, repart).
    """
    args = [str(a) for a in argv]
    tool = name or Path(args[0]).name
    require_tool(args[0])
    logger.debug("$ %s", shlex.join(args))
    if interactive:
        try:
            return subprocess.run(args, env=None if env is None else dict(env), cwd=cwd, check=False, text=True)
        except OSError as e:
            raise C2BootError(f"{tool} could not be started: {e}") from e
    if follow:
        assert not capture and input is None and stdout is None, "a followed tool's output is its progress"
        result = _followed(args, tool, stdin=stdin, env=env, cwd=cwd)
    else:
        result = _captured(args, tool, stdin=stdin, input=input, stdout=subprocess.PIPE if capture or stdout is None
                           else stdout, env=env, cwd=cwd)
    if check and result.returncode != 0:
        raise C2BootError(failure_message(tool, result.returncode, (result.stdout or "") + (result.stderr or "")))
    if not capture and result.stdout and not follow:
        logger.debug("%s", result.stdout.rstrip())
    return result


def _captured(args: list[str], tool: str, *, stdin: int | None, input: str | None, stdout: int,
              env: Mapping[str, str] | None, cwd: Path | None) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            args,
            stdin=stdin,
            input=input,
            stdout=stdout,
            stderr=subprocess.PIPE,
            text=True,
            errors="surrogateescape",  # file names are bytes: a listing of them must not fail on a non-UTF-8 one
            env=None if env is None else dict(env),
            cwd=cwd,
            check=False,
        )
    except OSError as e:
        raise C2BootError(f"{tool} could not be started: {e}") from e


def _followed(args: list[str], tool: str, *, stdin: int | None, env: Mapping[str, str] | None,
              cwd: Path | None) -> subprocess.CompletedProcess[str]:
    """Run with stdout and stderr as one stream, each line shown as it comes (log.tool_line), the last ones kept
    for the error message."""
    try:
        process = subprocess.Popen(args, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   errors="surrogateescape", env=None if env is None else dict(env), cwd=cwd)
    except OSError as e:
        raise C2BootError(f"{tool} could not be started: {e}") from e
    tail: deque[str] = deque(maxlen=ERROR_TAIL_LINES)
    with process:  # closes the pipe and waits for the tool, however this ends
        assert process.stdout is not None
        try:
            for line in process.stdout:
                tail.append(line)
                tool_line(line)
        except BaseException:  # Ctrl-C, a signal: the tool goes with us
            process.kill()
            raise
    return subprocess.CompletedProcess(args, process.returncode, "".join(tail), "")


def failure_message(tool: str, returncode: int, output: str) -> str:
    """'TOOL failed (exit N): its last line', the one-line error; its last lines are shown with --verbose."""
    lines = [line.strip() for line in output.strip().splitlines() if line.strip()]
    for line in lines[-ERROR_TAIL_LINES:]:
        logger.debug("    %s: %s", tool, line)
    hint = ": free some space, then try again" if "No space left on device" in output else ""
    return f"{tool} failed (exit {returncode}): {(lines or ['no output'])[-1][:300]}{hint}"


def parse_version(text: str) -> tuple[int, ...]:
    """First dotted number in a tool's --version output: 'systemd 257 (257.9-1)' -> (257,)."""
    match = re.search(r"(?<![\w.])(\d+(?:\.\d+)*)", text)
    if match is None:
        raise C2BootError(f"cannot read a version number from {text.strip()[:80]!r}")
    return tuple(int(part) for part in match.group(1).split("."))


def version_line(name: str) -> str:
    """First line of `name --version`; fails like run() when the tool is missing or cannot report it."""
    result = run([require_tool(name), "--version"], capture=True)
    lines = (result.stdout or result.stderr).strip().splitlines()
    return lines[0] if lines else ""


@cache
def tool_version_line(name: str) -> str | None:
    """For the manifest: the version line, or None when the tool is missing or will not say."""
    try:
        return version_line(name) or None
    except C2BootError:
        return None


def tool_version(name: str) -> tuple[int, ...]:
    """The version of `name`; a tool that cannot even report it fails with its own message."""
    return parse_version(version_line(name))


def dracut_at_least(dracut_version: str | None, needed: tuple[int, ...]) -> bool:
    """Whether a dracut is `needed` or newer; an unknown version is taken as a current one."""
    try:
        return parse_version(dracut_version or "") >= needed
    except C2BootError:
        return True


def dracut_live_overlay_args(dracut_version: str | None) -> str:
    """The kernel arguments for a tmpfs overlay over the live root with the dracut that made the initrd: dracut-ng
    (100 and newer) takes them differently."""
    return "rd.live.overlay.readonly" if dracut_at_least(dracut_version, DRACUT_NG) else "rd.live.overlay.overlayfs=1"


def check_version(name: str, version: tuple[int, ...] | None = None) -> tuple[int, ...]:
    """Fail unless `name` is at least MIN_VERSIONS[name]; returns the version found."""
    found = tool_version(name) if version is None else version
    needed = MIN_VERSIONS[name]
    if found < needed:
        raise C2BootError(
            f"{name} {'.'.join(map(str, found))} is too old, container2boot needs {'.'.join(map(str, needed))} "
            f"or newer: run `c2boot build` (it uses the rootbuilder container) or upgrade {PACKAGES.get(name, name)}"
        )
    return found
