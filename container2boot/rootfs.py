"""Rootfs inspection: what the machine image contains that booting depends on (os-release, kernel, dracut)."""

import re
from dataclasses import dataclass
from pathlib import Path

from container2boot.errors import C2BootError

# Which package provides a kernel / dracut, by distribution family (os-release ID or ID_LIKE).
KERNEL_PACKAGES = {
    "debian": "linux-image-amd64",
    "ubuntu": "linux-image-generic",
    "fedora": "kernel",
    "rhel": "kernel",
    "arch": "linux",
    "alpine": "linux-lts",
}
DRACUT_PACKAGES = {
    "debian": "dracut dracut-live",
    "ubuntu": "dracut dracut-live",
    "fedora": "dracut dracut-live",
    "rhel": "dracut dracut-live",
    "arch": "dracut",
    "alpine": "dracut",
}


@dataclass(frozen=True)
class Kernel:
    version: str
    image: Path  # the vmlinuz file inside the rootfs


@dataclass(frozen=True)
class RootfsInfo:
    root: Path
    os_release: dict[str, str]
    kernel: Kernel
    dracut_modules: frozenset[str]

    @property
    def pretty_name(self) -> str:
        return self.os_release.get("PRETTY_NAME", self.os_release.get("ID", "unknown OS"))


def version_key(version: str) -> tuple[tuple[int, int | str], ...]:
    """Order kernel versions like `sort -V`: numbers numerically, so 6.10 sorts after 6.9."""
    return tuple((0, int(part)) if part.isdigit() else (1, part) for part in re.findall(r"\d+|[^\d]+", version))


def parse_os_release(text: str) -> dict[str, str]:
    values: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        values[key.strip()] = value
    return values


def read_os_release(root: Path) -> dict[str, str]:
    # /etc/os-release is usually a symlink to ../usr/lib/os-release; read the target inside the rootfs.
    for candidate in ("etc/os-release", "usr/lib/os-release"):
        path = root / candidate
        if path.is_file() and not path.is_symlink():
            return parse_os_release(path.read_text(errors="replace"))
    return {}


def family(os_release: dict[str, str]) -> str:
    """The distribution family we know package names for, from ID then ID_LIKE."""
    ids = [os_release.get("ID", ""), *os_release.get("ID_LIKE", "").split()]
    return next((i for i in ids if i in KERNEL_PACKAGES), "debian" if not any(ids) else ids[0])


def package_hint(packages: dict[str, str], os_release: dict[str, str]) -> str:
    fam = family(os_release)
    if fam in packages:
        return f"add `{packages[fam]}` to the image (e.g. in its Containerfile)"
    return "add " + ", ".join(f"{v} ({k})" for k, v in packages.items()) + " to the image"


def find_kernels(root: Path) -> list[Kernel]:
    """Kernels that have both an image and a modules directory, newest first."""
    kernels: dict[str, Kernel] = {}
    for modules in (root / "usr/lib/modules", root / "lib/modules"):  # the same directory on merged-/usr systems
        if not modules.is_dir():
            continue
        for moddir in modules.iterdir():
            images = (moddir / "vmlinuz", root / "boot" / f"vmlinuz-{moddir.name}")  # Fedora, Debian
            image = next((i for i in images if i.is_file()), None)
            if image is not None and moddir.name not in kernels:
                kernels[moddir.name] = Kernel(moddir.name, image)
    return sorted(kernels.values(), key=lambda k: version_key(k.version), reverse=True)


def find_dracut_modules(root: Path) -> frozenset[str]:
    """Installed dracut module names ('90dmsquash-live' -> 'dmsquash-live'); empty when dracut is missing."""
    if not any((root / d / "dracut").exists() for d in ("usr/bin", "usr/sbin", "bin", "sbin")):
        return frozenset()
    modules_dir = root / "usr/lib/dracut/modules.d"
    if not modules_dir.is_dir():
        return frozenset()
    return frozenset(re.sub(r"^\d+", "", entry.name) for entry in modules_dir.iterdir())


def inspect(root: Path, live: bool = True) -> RootfsInfo:
    """Read what booting needs from the rootfs (a live boot: also dmsquash-live); fail with the package to add
    when something is missing."""
    if not root.is_dir():
        raise C2BootError(f"rootfs {root} is not a directory")
    os_release = read_os_release(root)
    kernels = find_kernels(root)
    name = os_release.get("PRETTY_NAME", "the image")
    if not kernels:
        raise C2BootError(f"{name} has no kernel (no vmlinuz beside /usr/lib/modules/*): "
                          + package_hint(KERNEL_PACKAGES, os_release))
    dracut_modules = find_dracut_modules(root)
    if not dracut_modules:
        raise C2BootError(f"{name} has no dracut, which builds the initrd: "
                          + package_hint(DRACUT_PACKAGES, os_release))
    if live and "dmsquash-live" not in dracut_modules:
        raise C2BootError(f"{name} has dracut but not its dmsquash-live module, which boots the root image: "
                          + package_hint(DRACUT_PACKAGES, os_release))
    return RootfsInfo(root, os_release, kernels[0], dracut_modules)
