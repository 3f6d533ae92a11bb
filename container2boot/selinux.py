"""SELinux: the root's labels come from the image's own policy, set while the root is packed, with no privileges
and no SELinux on the host.

Every file's label is looked up by libselinux (selabel_lookup_raw, the lookup setfiles and restorecon use) in the
image's own file_contexts, by path and file type. The live root image gets them as PAX `SCHILY.xattr.security.selinux`
records in the tar stream its packer reads (tar2sqfs and mkfs.erofs --tar keep them); an ext4 root partition gets
them afterwards with debugfs' ea_set on the partition inside disk.img. Labels the image carries already are
replaced: the policy is the truth. xfs and btrfs cannot be written that way: their root is marked for the
distribution's relabelling at first boot (/.autorelabel).

The filter the packer reads through (stdin to stdout):

    python3 -m container2boot.selinux FILE_CONTEXTS   (a copy_contexts copy)
"""

import ctypes
import ctypes.util
import os
import posixpath
import re
import shutil
import signal
import stat
import sys
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING

from container2boot.config import SELINUX_SETTINGS
from container2boot.disk import read_table
from container2boot.errors import C2BootError
from container2boot.layers import header, normal
from container2boot.log import logger
from container2boot.run import run
from container2boot.templates import render_to

if TYPE_CHECKING:
    from container2boot.tree import Tree

MODES = ("enforcing", "permissive", "disabled")  # how the system boots; /etc/selinux/config's SELINUX= values
CONFIG = "etc/selinux/config"
AUTORELABEL = ".autorelabel"  # the distribution relabels the root at boot when it exists, then reboots
PAX_LABEL = "SCHILY.xattr.security.selinux"
XATTR = "security.selinux"
# The text sources of the lookup; the compiled .bin files are left out (their regex format is libselinux's own).
CONTEXT_FILES = ("file_contexts", "file_contexts.homedirs", "file_contexts.local", "file_contexts.subs",
                 "file_contexts.subs_dist")
SELABEL_CTX_FILE = 0
SELABEL_OPT_PATH = 3
LS_ENTRY = re.compile(r"^/\d+/([0-7]+)/\d+/\d+/(.*)/\d*/$")  # debugfs' ls -p: /inode/mode/uid/gid/name/size/
TAR_TYPES = {tarfile.DIRTYPE: stat.S_IFDIR, tarfile.SYMTYPE: stat.S_IFLNK, tarfile.CHRTYPE: stat.S_IFCHR,
             tarfile.BLKTYPE: stat.S_IFBLK, tarfile.FIFOTYPE: stat.S_IFIFO}  # anything else: a regular file
LABELLED_ROOTS = ("ext4",)
RESTORECON = ("usr/sbin/restorecon", "sbin/restorecon")
UNIT_DIR = "etc/systemd/system"
LIVE_ROOT_UNIT = "container2boot-selinux-root.service"  # installed root filesystems labelled offline


@dataclass(frozen=True)
class SELinux:
    """How the booted system runs SELinux, and the policy its root is labelled from (None: not labelled)."""

    mode: str  # one of MODES
    policy: str | None
    relabel_at_boot: bool = False  # an installed root that cannot be labelled offline: the system labels it

    @property
    def file_contexts(self) -> str:
        """Where the image keeps the policy's file_contexts (relative)."""
        return f"etc/selinux/{self.policy}/contexts/files/file_contexts"

    @property
    def labels_root(self) -> bool:
        """Whether the build writes the labels (else they are the system's business, or SELinux is off)."""
        return self.policy is not None and not self.relabel_at_boot

    def kernel_arguments(self) -> str:
        """What the kernel needs to start SELinux in the mode (Debian's kernel starts AppArmor unless told), or to
        keep it off (Fedora's kernel starts SELinux unless told). libselinux takes enforcing= over the image's
        /etc/selinux/config when systemd loads the policy."""
        if self.mode == "disabled":
            return "selinux=0"
        return f"security=selinux selinux=1 enforcing={int(self.mode == 'enforcing')}"

    def warnings(self, live_root_format: str | None) -> list[str]:
        """What may not work as asked (`live_root_format`: the live root image's; None: an installed root)."""
        if self.mode == "enforcing" and live_root_format == "erofs":
            return ["an EROFS root with SELinux enforcing: the kernel mounts erofs.img from the file itself, and "
                    "policies older than that refuse its use (Debian trixie's: 15 units failed); --root-format "
                    "squashfs boots enforcing"]
        return []

    def describe(self) -> str:
        labelled = "labelled at first boot" if self.relabel_at_boot else \
            f"labelled from its {self.policy} policy" if self.policy else "not labelled"
        return f"SELinux {self.mode}, root {labelled}"


def image_mode(config_text: str) -> str | None:
    """SELINUX= of the image's /etc/selinux/config, when it names a mode."""
    for line in config_text.splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "SELINUX" and value.strip().strip("\"'").lower() in MODES:
            return value.strip().strip("\"'").lower()
    return None


def decide(setting: str, policy: str | None, mode: str | None, name: str, *, boots_own_init: bool = True,
           installed_fstype: str | None = None) -> SELinux | None:
    """What the build does with SELinux: `setting` is --selinux; `policy` and `mode` what the image's
    /etc/selinux/config says (`policy` only when its file_contexts is there); `installed_fstype` the root
    partition's type (None: the live root image). None: nothing to do (auto, and no policy)."""
    assert setting in SELINUX_SETTINGS
    if setting == "off":
        return SELinux("disabled", None)
    if policy is None or not boots_own_init:
        if setting == "auto":
            return None
        why = "has no SELinux policy (/etc/selinux/config naming a policy with a file_contexts)" if policy is None \
            else "is run as an application image, whose init loads no policy"
        fix = "install one (Debian: selinux-basics selinux-policy-default; Fedora: selinux-policy-targeted)" \
            if policy is None else "drop --app"
        raise C2BootError(f"--selinux {setting}: {name} {why}: {fix}, or use --selinux auto or off")
    unlabelled = installed_fstype is not None and installed_fstype not in LABELLED_ROOTS
    if mode == "disabled" and setting != "auto":
        raise C2BootError(f"--selinux {setting}: {name}'s /etc/selinux/config says SELINUX=disabled, and then no "
                          "policy is loaded whatever the kernel is told: set SELINUX=enforcing or permissive in the "
                          "image, or use --selinux auto or off")
    if unlabelled and setting != "auto":
        raise C2BootError(f"--selinux {setting}: a {installed_fstype} root partition cannot be labelled without "
                          f"privileges: use --rootfs-type {' or '.join(LABELLED_ROOTS)}, or --selinux auto (the "
                          "system labels it at first boot, then reboots) or --selinux off")
    return SELinux(mode or "permissive" if setting == "auto" else setting, policy, relabel_at_boot=unlabelled)


def copy_contexts(tree: "Tree", selinux: SELinux, dest: Path) -> Path:
    """The image's file_contexts and its companions (home directories, local changes, path substitutions), copied
    from the directory `tree` to the new directory `dest` for the lookup; returns the file_contexts' copy."""
    dest.mkdir(parents=True)
    directory = posixpath.dirname(selinux.file_contexts)
    for name in CONTEXT_FILES:
        if tree.is_file(f"{directory}/{name}"):
            shutil.copyfile(tree.real_path(f"{directory}/{name}"), dest / name)
    return dest / "file_contexts"


class Labels:
    """Labels by path and file type from a file_contexts, through libselinux (which needs no SELinux on the
    host: the lookup only matches the policy's path expressions)."""

    def __init__(self, file_contexts: Path) -> None:
        name = ctypes.util.find_library("selinux") or "libselinux.so.1"
        try:
            self._lib = ctypes.CDLL(name, use_errno=True)
        except OSError as e:
            raise C2BootError(f"libselinux is not installed here ({e}): install libselinux1 (Debian) or "
                              "libselinux (Fedora), or use --selinux off") from None
        self._lib.selabel_open.restype = ctypes.c_void_p
        self._lib.selabel_open.argtypes = [ctypes.c_uint, ctypes.c_void_p, ctypes.c_uint]
        self._lib.selabel_lookup_raw.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_char_p), ctypes.c_char_p,
                                                 ctypes.c_int]
        self._lib.selabel_close.argtypes = [ctypes.c_void_p]
        self._lib.freecon.argtypes = [ctypes.c_char_p]

        class Option(ctypes.Structure):
            _fields_ = [("type", ctypes.c_int), ("value", ctypes.c_char_p)]

        options = (Option * 1)(Option(SELABEL_OPT_PATH, os.fsencode(file_contexts)))
        self._handle = self._lib.selabel_open(SELABEL_CTX_FILE, options, 1)
        if not self._handle:
            raise C2BootError(f"libselinux could not read the image's {file_contexts.name} "
                              f"({os.strerror(ctypes.get_errno())}): check the image's SELinux policy, or use "
                              "--selinux off")

    def lookup(self, path: str, file_type: int) -> str | None:
        """The label of the absolute `path` with `file_type` (stat.S_IF*), None where the policy gives none
        (<<none>>: /proc, /sys, /tmp's contents)."""
        label = ctypes.c_char_p()
        if self._lib.selabel_lookup_raw(self._handle, ctypes.byref(label), os.fsencode(path), file_type) != 0:
            error = ctypes.get_errno()
            if error == 2:  # ENOENT: no label for it
                return None
            raise C2BootError(f"libselinux could not look up the label of {path}: {os.strerror(error)}")
        value = label.value
        self._lib.freecon(label)
        return value.decode() if value else None

    def close(self) -> None:
        if self._handle:
            self._lib.selabel_close(self._handle)
            self._handle = None


@contextmanager
def labels(file_contexts: Path) -> Iterator[Labels]:
    found = Labels(file_contexts)
    try:
        yield found
    finally:
        found.close()


def label_tar(source: IO[bytes], dest: IO[bytes], found: Labels) -> None:
    """Copy the tar stream `source` to `dest` with every member's label set from the policy (replacing any it
    had; a member the policy gives no label keeps none)."""
    with tarfile.open(fileobj=source, mode="r|") as tar, \
            tarfile.open(fileobj=dest, mode="w|", format=tarfile.PAX_FORMAT) as out:
        for info in tar:
            # header(): a sparse file's records go (tarfile reads it whole); a hard link's inode is its target's
            copy = header(info, info.name)
            headers = {k: v for k, v in copy.pax_headers.items() if k != PAX_LABEL}
            label = None if info.islnk() else found.lookup("/" + normal(info.name),
                                                             TAR_TYPES.get(info.type, stat.S_IFREG))
            if label is not None:
                headers[PAX_LABEL] = label
            copy.pax_headers = headers
            out.addfile(copy, tar.extractfile(info) if info.isreg() else None)


def filter_command(contexts: Path) -> list[str]:
    """The filter between the tar producer and the packer (see the module's docstring); `contexts` is
    copy_contexts'."""
    return [sys.executable, "-m", "container2boot.selinux", str(contexts)]


def add_files(tree: Path, image: "Tree", security: SELinux, *, live: bool) -> list[str]:
    """What the build adds to the root (into `tree`) for SELinux; returns the image's paths to leave out: an
    /.autorelabel the image carries when the build labels the root (a live root would relabel and reboot at every
    boot)."""
    if security.relabel_at_boot:
        (tree / AUTORELABEL).touch()
        return []
    if not security.labels_root:
        return []
    if live:
        add_root_relabel(tree, image)
    return [AUTORELABEL] if image.entry(AUTORELABEL) else []


def add_root_relabel(tree: Path, image: "Tree") -> None:
    """The unit that labels the live root's top directory once the policy is loaded (see its template), into the
    tree of files the build adds; nothing when the image has no restorecon."""
    restorecon = next((f"/{path}" for path in RESTORECON if image.is_file(path)), None)
    if restorecon is None:
        logger.warning("    warning: the image has no restorecon (policycoreutils): the live root's top directory "
                       "stays unlabelled, and confined services may be refused")
        return
    render_to(tree / UNIT_DIR / LIVE_ROOT_UNIT, "selinux-live-root.service.j2", restorecon=restorecon)
    wants = tree / UNIT_DIR / "sysinit.target.wants"
    wants.mkdir(exist_ok=True)
    (wants / LIVE_ROOT_UNIT).symlink_to(f"../{LIVE_ROOT_UNIT}")


def quoted(path: str) -> str:
    """A path as debugfs' command parser reads it ("" is a quote)."""
    return '"' + path.replace('"', '""') + '"'


def ext4_types(device: str, scratch: Path) -> dict[str, int]:
    """Every path of the ext4 file system `device` (debugfs' FILE?offset=N) with its file type, read from the file
    system itself (what systemd-repart copied, whatever it left out), a directory level per debugfs run. A name
    with a line break is not listed (debugfs' script could not name it)."""
    types = {"/": stat.S_IFDIR}
    level = ["/"]
    commands = scratch / "selinux-list.debugfs"
    while level:
        commands.write_text("".join(f"ls -p {quoted(d)}\n" for d in level), errors="surrogateescape")
        listing = run(["debugfs", "-f", commands, device], capture=True).stdout
        directories, below = iter(level), []
        directory = ""
        for line in listing.splitlines():
            if line.startswith("debugfs: ls -p "):
                directory = next(directories).rstrip("/")
            elif entry := LS_ENTRY.match(line):
                name, mode = entry.group(2), int(entry.group(1), 8)
                if name in ("", ".", "..") or not stat.S_IFMT(mode):
                    continue  # an empty slot (lost+found has them), or the directory itself
                types[f"{directory}/{name}"] = stat.S_IFMT(mode)
                if stat.S_ISDIR(mode):
                    below.append(f"{directory}/{name}")
        level = below
    commands.unlink()
    return types


def debugfs_script(types: dict[str, int], found: Labels) -> str:
    """debugfs commands setting each path's label (quoted as debugfs' parser reads: "" is a quote)."""
    lines = []
    for path in sorted(types):
        label = found.lookup(path, types[path])
        if label is not None:
            lines.append(f"ea_set {quoted(path)} {XATTR} {label}\n")
    return "".join(lines)


def label_partition(image: Path, offset: int, contexts: Path, scratch: Path) -> int:
    """Label every file of the ext4 file system at byte `offset` of `image` (no mount, no privileges: debugfs
    writes the xattrs). Returns how many files got a label."""
    device = f"{image}?offset={offset}"
    types = ext4_types(device, scratch)
    with labels(contexts) as found:
        script = debugfs_script(types, found)
    commands = scratch / "selinux-labels.debugfs"
    commands.write_text(script, errors="surrogateescape")
    result = run(["debugfs", "-w", "-f", commands, device], capture=True)
    # debugfs goes on after a failed command and exits 0: its complaints (all it writes to stderr but its banner)
    # are the only sign
    problems = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("debugfs ")]
    if problems:
        raise C2BootError(f"debugfs could not label {len(problems)} file(s) of the root partition: {problems[0]}")
    commands.unlink()
    return script.count("\n")


def label_root_partition(disk: Path, partuuid: str, contexts: Path, scratch: Path) -> None:
    """Label the root partition (GPT partition UUID `partuuid`) of `disk` as systemd-repart filled it."""
    partition = next((p for p in read_table(disk).partitions if p.uuid.lower() == partuuid.lower()), None)
    assert partition is not None, "systemd-repart wrote the root partition with this UUID"
    count = label_partition(disk, partition.start_bytes, contexts, scratch)
    logger.info("    %d files labelled", count)


def main() -> None:
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # a packer that failed ends this quietly, as it would tar
    try:
        with labels(Path(sys.argv[1])) as found:
            label_tar(sys.stdin.buffer, sys.stdout.buffer, found)
    except C2BootError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
