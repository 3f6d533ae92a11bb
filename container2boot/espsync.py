"""`c2boot esp sync`: put the ESP tree on a USB stick, like rsync: copy what is new or changed, leave the rest.

The target is a mounted FAT filesystem (the stick as the desktop mounted it), or a FAT filesystem that is not
mounted: an image file or a partition's device node the user may write, which mtools writes without a mount.
Anything else is refused, and so is the host's own ESP: overwriting its boot loader would break this machine.
"""

import hashlib
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from container2boot import lifecycle
from container2boot.bootloader import ESP_LABEL
from container2boot.errors import C2BootError
from container2boot.log import StageTimer, logger
from container2boot.run import failure_message, run

FAT_TYPES = ("vfat", "msdos")
HOST_ESP_MOUNTS = ("/boot/efi", "/efi", "/boot")
MTIME_WINDOW = 2  # FAT keeps modification times in 2-second steps
CHUNK = 4 * 1024 * 1024


@dataclass(frozen=True)
class Mount:
    point: Path
    fstype: str
    source: str


@dataclass
class SyncPlan:
    """What a sync does: files to copy (new or changed), unchanged ones, and files to delete (with --delete)."""

    copy: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    delete: list[str] = field(default_factory=list)
    copy_bytes: int = 0


def parse_mountinfo(text: str) -> list[Mount]:
    """/proc/self/mountinfo lines: field 5 is the mount point, after ' - ' come the type and the source."""
    mounts = []
    for line in text.splitlines():
        before, sep, after = line.partition(" - ")
        fields, tail = before.split(), after.split()
        if sep and len(fields) >= 5 and len(tail) >= 2:
            point = fields[4].encode().decode("unicode_escape")  # \040 for a space
            mounts.append(Mount(Path(point), tail[0], tail[1]))
    return mounts


def mount_of(path: Path, mounts: list[Mount]) -> Mount:
    """The mount that holds `path`: the longest mount point above it (the last one mounted wins)."""
    real = path.resolve()
    best: Mount | None = None
    for mount in mounts:
        inside = real == mount.point or mount.point in real.parents
        if inside and (best is None or len(mount.point.parts) >= len(best.point.parts)):
            best = mount
    if best is None:
        raise C2BootError(f"cannot tell which filesystem holds {path}")
    return best


def host_esp_sources(mounts: list[Mount]) -> set[str]:
    return {m.source for m in mounts if str(m.point) in HOST_ESP_MOUNTS and m.fstype in FAT_TYPES}


def device_label(device: str) -> str | None:
    """The filesystem label udev knows for `device`, from /dev/disk/by-label (no privileges needed)."""
    by_label = Path("/dev/disk/by-label")
    if not by_label.is_dir():
        return None
    for link in by_label.iterdir():
        if link.resolve() == Path(device).resolve():
            return link.name.encode().decode("unicode_escape")  # udev escapes spaces as \x20
    return None


def fat_label(path: Path) -> str | None:
    """The volume label in a FAT boot sector; None when `path` does not start with a FAT filesystem."""
    try:
        with path.open("rb") as f:
            sector = f.read(512)
    except OSError as e:
        raise C2BootError(f"cannot read {path}: {e.strerror}") from None
    if len(sector) < 512 or sector[510:512] != b"\x55\xaa":
        return None
    if sector[82:87] == b"FAT32":
        return sector[71:82].decode("ascii", "replace").strip()
    if sector[54:57] == b"FAT":
        return sector[43:54].decode("ascii", "replace").strip()
    return None


def source_files(esp: Path) -> dict[str, Path]:
    """The ESP tree's files by relative path ('EFI/BOOT/BOOTX64.EFI')."""
    if not (esp / "EFI").is_dir():
        raise C2BootError(f"{esp} is not an ESP tree (no EFI directory): pass the output directory of "
                          "`c2boot build`")
    return {str(p.relative_to(esp)): p for p in sorted(esp.rglob("*")) if p.is_file()}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class DirectoryTarget:
    """A mounted FAT filesystem (or a directory in one)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def describe(self) -> str:
        return str(self.root)

    def files(self) -> set[str]:
        """Relative paths, in lower case: FAT ignores case."""
        return {str(p.relative_to(self.root)).lower() for p in self.root.rglob("*") if p.is_file()}

    def unchanged(self, name: str, source: Path) -> bool:
        """rsync's quick check: same size and same modification time (within FAT's 2 seconds)."""
        target = self.root / name
        try:
            found = target.stat()
        except FileNotFoundError:
            return False
        wanted = source.stat()
        return found.st_size == wanted.st_size and abs(found.st_mtime - wanted.st_mtime) <= MTIME_WINDOW

    def check_space(self, plan: "SyncPlan") -> None:
        """Fail before writing when the new files do not fit (the files they replace count as free)."""
        stats = os.statvfs(self.root)
        free = stats.f_bavail * stats.f_frsize
        replaced = sum((self.root / n).stat().st_size for n in plan.copy if (self.root / n).is_file())
        if plan.copy_bytes > free + replaced:
            raise C2BootError(f"{self.root} has {free / 1e6:.0f} MB free, the ESP needs {plan.copy_bytes / 1e6:.0f} "
                              "MB: use a bigger partition (1 GB is plenty) or delete files from it")

    def copy(self, name: str, source: Path, progress: Callable[[int], None]) -> None:
        """Write to a temporary name, flush to the device, then rename: a pulled stick keeps the old file."""
        target = self.root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.c2boot-partial")
        with source.open("rb") as src, partial.open("wb") as dst:
            while chunk := src.read(CHUNK):
                dst.write(chunk)
                progress(len(chunk))
            dst.flush()
            os.fsync(dst.fileno())
        mtime = source.stat().st_mtime
        os.utime(partial, (mtime, mtime))
        partial.replace(target)

    def delete(self, name: str) -> None:
        (self.root / name).unlink()


class FatImageTarget:
    """An unmounted FAT filesystem (image file or device node), written with mtools."""

    def __init__(self, image: Path) -> None:
        self.image = image
        self.env = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}  # images need not have a floppy's geometry
        listing = run(["mdir", "-i", image, "-/", "-b", "::"], env=self.env, capture=True, check=False)
        if listing.returncode != 0 and "not found" not in listing.stderr:  # an empty filesystem is "not found"
            raise C2BootError(failure_message("mdir", listing.returncode, listing.stderr))
        names = [line.strip().removeprefix("::/").lower() for line in listing.stdout.splitlines() if line.strip()]
        self._existing = {n for n in names if not n.endswith("/")}
        self._directories = {n for n in names if n.endswith("/")}

    def describe(self) -> str:
        return f"the FAT filesystem in {self.image}"

    def _mtools(self, *argv: str | Path) -> str:
        return run([argv[0], "-i", self.image, *argv[1:]], env=self.env, capture=True).stdout

    def files(self) -> set[str]:
        return set(self._existing)

    def unchanged(self, name: str, source: Path) -> bool:
        """mtools shows times to the minute only, so compare the content itself."""
        if name.lower() not in self._existing:
            return False
        with lifecycle.temporary_directory("c2boot-sync-") as tmp:
            copy = tmp / "file"
            self._mtools("mcopy", "-n", f"::/{name}", copy)
            return copy.stat().st_size == source.stat().st_size and _sha256(copy) == _sha256(source)

    def check_space(self, plan: "SyncPlan") -> None:
        """mcopy reports a full filesystem itself."""

    def copy(self, name: str, source: Path, progress: Callable[[int], None]) -> None:
        parts = Path(name).parts
        for depth in range(1, len(parts)):
            directory = "/".join(parts[:depth])
            if directory.lower() + "/" not in self._directories:
                self._mtools("mmd", f"::/{directory}")
                self._directories.add(directory.lower() + "/")
        self._mtools("mcopy", "-o", "-m", source, f"::/{name}")
        progress(source.stat().st_size)

    def delete(self, name: str) -> None:
        self._mtools("mdel", f"::/{name}")


Target = DirectoryTarget | FatImageTarget


def open_target(target: Path, mountinfo: str | None = None) -> tuple[Target, str | None]:
    """The target to write, and its filesystem label when known; refuses anything but a FAT filesystem that is
    not the host's own ESP."""
    mounts = parse_mountinfo(mountinfo if mountinfo is not None else Path("/proc/self/mountinfo").read_text())
    if target.is_dir():
        mount = mount_of(target, mounts)
        if mount.fstype not in FAT_TYPES:
            raise C2BootError(f"{target} is on a {mount.fstype} filesystem ({mount.point}), not a mounted FAT one: "
                              "pass the mount point of the USB stick's FAT partition (e.g. /media/$USER/C2BOOT)")
        if mount.source in host_esp_sources(mounts):  # the ESP mounted there, or the same device elsewhere
            raise C2BootError(f"{target} is this host's own EFI System Partition ({mount.point}): refusing to "
                              "overwrite its boot loader; pass the USB stick's mount point")
        if not os.access(target, os.W_OK):
            raise C2BootError(f"{target} is not writable by you: mount the stick as your user (the desktop does) "
                              "or choose a directory you can write")
        return DirectoryTarget(target), device_label(mount.source)
    if not target.exists():
        raise C2BootError(f"{target} does not exist: pass the mounted USB stick's directory, or a FAT image file")
    if not (target.is_file() or stat.S_ISBLK(target.stat().st_mode)):
        raise C2BootError(f"{target} is neither a directory, a FAT image file nor a partition device: pass the "
                          "mounted USB stick's directory, or a FAT image file")
    busy = next((m for m in mounts if Path(m.source) == target.resolve()), None)
    if busy is not None:
        raise C2BootError(f"{target} is mounted at {busy.point}: pass that directory instead of the device")
    if stat.S_ISBLK(target.stat().st_mode) and target.resolve() in {Path(s).resolve()
                                                                     for s in host_esp_sources(mounts)}:
        raise C2BootError(f"{target} is this host's own EFI System Partition: refusing to overwrite it")
    label = fat_label(target)
    if label is None:
        raise C2BootError(f"{target} is not a FAT filesystem: format the stick's partition as FAT32 labelled "
                          f"{ESP_LABEL} (see the README), or pass its mount point")
    if not os.access(target, os.W_OK):
        raise C2BootError(f"{target} is not writable by you (for a device node: add yourself to its group, "
                          "e.g. disk, or mount it and pass the mount point)")
    return FatImageTarget(target), label


def plan_sync(files: dict[str, Path], target: Target, delete: bool) -> SyncPlan:
    plan = SyncPlan()
    for name, source in files.items():
        if target.unchanged(name, source):
            plan.unchanged.append(name)
        else:
            plan.copy.append(name)
            plan.copy_bytes += source.stat().st_size
    if delete:
        wanted = {n.lower() for n in files}
        managed = {str(Path(n).parent).lower() for n in files}
        plan.delete = sorted(n for n in target.files() if n not in wanted and str(Path(n).parent) in managed
                             and not Path(n).name.endswith(".c2boot-partial"))
    return plan


def sync(out: Path, target: Path, *, dry_run: bool = False, delete: bool = False,
         mountinfo: str | None = None) -> SyncPlan:
    """Copy OUT/esp's new and changed files to `target` (with `delete`, also remove files the ESP tree does not
    have, in the directories it writes)."""
    esp = out / "esp" if (out / "esp").is_dir() else out
    files = source_files(esp)
    destination, label = open_target(target, mountinfo)
    if label is not None and label.upper() != ESP_LABEL:
        logger.warning("warning: %s is labelled %r, not %s: the boot loader and the initrd find the ESP by that "
                       "label, so it will not boot; relabel it (e.g. `fatlabel /dev/sdX1 %s` while unmounted)",
                       destination.describe(), label, ESP_LABEL, ESP_LABEL)
    plan = plan_sync(files, destination, delete)
    verb = "would " if dry_run else ""
    for name in plan.copy:
        logger.info("  %scopy   %s (%.1f MB)", verb, name, files[name].stat().st_size / 1e6)
    for name in plan.delete:
        logger.info("  %sdelete %s", verb, name)
    if not dry_run:
        destination.check_space(plan)
        if plan.copy:
            with StageTimer().stage("copy", f"Copying {len(plan.copy)} file(s) to {destination.describe()}") as \
                    progress:
                progress.size(plan.copy_bytes)
                for name in plan.copy:
                    destination.copy(name, files[name], progress.advance)
        for name in plan.delete:
            destination.delete(name)
        if isinstance(destination, DirectoryTarget):
            os.sync()
    logger.info("==> %s %d file(s) (%.0f MB), %d unchanged%s, to %s", "Would copy" if dry_run else "Copied",
                len(plan.copy), plan.copy_bytes / 1e6, len(plan.unchanged),
                f", {len(plan.delete)} {'to delete' if dry_run else 'deleted'}" if delete else "",
                destination.describe())
    return plan
