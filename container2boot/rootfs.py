"""Rootfs inspection: what a machine image contains that booting depends on, and what to add when something is
missing, by distribution family. The same checks serve `c2boot inspect`, the check `c2boot build` makes before
any slow step, and the assemble stage."""

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from container2boot.bootloader import SIGNED_LOADERS
from container2boot.errors import C2BootError
from container2boot.selinux import image_mode
from container2boot.tree import DPKG_STATUS, Tree

FAMILIES = {"debian": "Debian/Ubuntu", "ubuntu": "Debian/Ubuntu", "fedora": "Fedora", "rhel": "RHEL/Alma/Rocky",
            "arch": "Arch", "alpine": "Alpine"}
# What provides each need, by distribution family (os-release ID or ID_LIKE).
PACKAGES: dict[str, dict[str, str]] = {
    "kernel": {"debian": "linux-image-amd64", "ubuntu": "linux-image-generic", "fedora": "kernel",
               "rhel": "kernel", "arch": "linux", "alpine": "linux-lts"},
    "dracut": {"debian": "dracut", "ubuntu": "dracut", "fedora": "dracut", "rhel": "dracut", "arch": "dracut",
               "alpine": "dracut"},
    "dmsquash-live": {"debian": "dracut-live", "ubuntu": "dracut-live", "fedora": "dracut-live",
                      "rhel": "dracut-live", "arch": "dracut", "alpine": "dracut"},
    "livenet": {"debian": "dracut-network curl", "ubuntu": "dracut-network curl", "fedora": "dracut-live "
                "dracut-network curl", "rhel": "dracut-live dracut-network curl", "arch": "dracut curl",
                "alpine": "dracut curl"},
    "init": {"debian": "systemd-sysv", "ubuntu": "systemd-sysv", "fedora": "systemd", "rhel": "systemd",
             "arch": "systemd", "alpine": "openrc"},
}
PROBLEMS = {  # "IMAGE has ..."
    "kernel": "no kernel (a vmlinuz with its modules in /usr/lib/modules/VERSION)",
    "dracut": "no dracut, which builds the initrd",
    "dmsquash-live": "dracut but not its dmsquash-live module, which boots the live root image",
    "init": "no init system (/sbin/init)",
    "livenet": "no network boot support (dracut's livenet and network modules, and curl)",
}
NETWORK_MODULES = ("network", "network-legacy", "network-manager", "systemd-networkd")
ELF_MACHINES = {0x3E: "x86_64", 0xB7: "aarch64", 0x03: "i386", 0x28: "arm", 0xF3: "riscv64", 0x15: "ppc64",
                0x16: "s390x"}
SELINUX_TYPE = re.compile(r"^SELINUXTYPE=(\S+)", re.MULTILINE)
SSHD = ("usr/sbin/sshd", "sbin/sshd")
# A DHCP client, or a network manager with one built in: dhclient, dhcpcd, busybox's udhcpc, systemd-networkd,
# NetworkManager. Without one a machine gets no address on a cloud's network.
DHCP_CLIENTS = ("usr/sbin/dhclient", "sbin/dhclient", "usr/sbin/dhcpcd", "sbin/dhcpcd", "usr/bin/dhcpcd",
                "usr/sbin/udhcpc", "sbin/udhcpc", "usr/bin/udhcpc", "bin/udhcpc", "usr/lib/systemd/systemd-networkd",
                "usr/sbin/NetworkManager")
CLOUD_CONFIG = "etc/cloud/cloud.cfg"
CLOUD_CONFIG_DIR = "etc/cloud/cloud.cfg.d"
# datasource_list as a flow list ([A, B]) or a block list (lines of "- A"), at the top level of a cloud-init config.
DATASOURCE_LIST = re.compile(r"^datasource_list[ \t]*:[ \t]*(?:\[(?P<flow>[^\]]*)\]|(?P<block>(?:\n[ \t]*-[^\n]*)+))",
                             re.MULTILINE)
YAML_COMMENT = re.compile(r"(^|\s)#.*$", re.MULTILINE)
# systemd's private library carries its version in its name: libsystemd-shared-257.so (Debian: in the multiarch
# directory), libsystemd-shared-256.11-1.fc41.so (Fedora: in lib64).
SYSTEMD_SHARED = re.compile(r"libsystemd-shared-(\d+)([.~-][^/]*)?\.so")
SYSTEMD_LIBRARY_DIRS = ("usr/lib/systemd", "usr/lib64/systemd")
MULTIARCH = re.compile(r"[a-z0-9_]+-linux-[a-z0-9_]+")
DPKG_FIELD = re.compile(r"^([\w-]+): *(.*)$", re.MULTILINE)
DPKG_VERSION = re.compile(r"(?:\d+:)?(\d+)")  # an epoch, then the upstream version's first number


@dataclass(frozen=True)
class Kernel:
    version: str
    image: str | None  # the vmlinuz file's path inside the rootfs; None: there is none for these modules
    has_modules: bool

    @property
    def complete(self) -> bool:
        """Only a kernel image with its modules can boot: the initrd needs the modules of exactly that kernel."""
        return self.image is not None and self.has_modules

    @property
    def problem(self) -> str | None:
        if self.image is None:
            return "no vmlinuz"
        return None if self.has_modules else "no modules"


@dataclass(frozen=True)
class Report:
    """What an image holds that booting depends on; `missing()` says what stops it from booting."""

    os_release: dict[str, str]
    architecture: str | None
    kernels: list[Kernel]  # newest first
    init: str  # systemd, openrc, sysvinit or none
    dracut_version: str | None  # None: no dracut
    dracut_modules: frozenset[str]
    initramfs_tools: bool
    signed_loader: str | None  # the vendor of a signed shim + GRUB: Secure Boot possible
    selinux_policy: str | None
    size_bytes: int
    labels: dict[str, str] = field(default_factory=dict)
    selinux_mode: str | None = None  # SELINUX= of /etc/selinux/config: enforcing, permissive or disabled
    curl: bool = False  # dracut's livenet downloads the root image with it
    passwd: str = ""  # /etc/passwd and /etc/group: the app's user is looked up there
    group: str = ""
    sshd: bool = False
    cloud_init: bool = False
    cloud_datasources: tuple[str, ...] | None = None  # cloud-init's datasource_list; None: it tries all it knows
    dhcp_client: bool = False
    systemd_version: int | None = None  # of the systemd that boots; None: the init is not systemd
    tree: Tree = field(default_factory=lambda: Tree({}, {}), compare=False, repr=False)

    @property
    def name(self) -> str:
        return self.os_release.get("PRETTY_NAME", self.os_release.get("ID", "the image"))

    @property
    def family(self) -> str:
        """The distribution family we know package names for, from ID then ID_LIKE."""
        ids = [self.os_release.get("ID", ""), *self.os_release.get("ID_LIKE", "").split()]
        return next((i for i in ids if i in FAMILIES), ids[0] or "unknown")

    @property
    def kernel(self) -> Kernel | None:
        """The kernel a build boots: the newest complete one."""
        return next((k for k in self.kernels if k.complete), None)

    @property
    def bootc(self) -> bool:
        return self.labels.get("containers.bootc") == "1"

    @property
    def netboot_ready(self) -> bool:
        return ("livenet" in self.dracut_modules and self.curl
                and any(m in self.dracut_modules for m in NETWORK_MODULES))

    def initrd_ready(self, layout: str, netboot: bool) -> bool:
        """Whether the image's own dracut can make the initrd `layout` (and a network boot) needs."""
        live_ready = layout != "live" or "dmsquash-live" in self.dracut_modules
        return self.dracut_version is not None and live_ready and (self.netboot_ready or not netboot)

    @property
    def kernel_image_path(self) -> Path:
        """Where the chosen kernel's vmlinuz is, for a tree read from a directory."""
        assert self.kernel is not None and self.kernel.image is not None
        return self.tree.real_path(self.kernel.image)

    def missing(self, layout: str = "live", netboot: bool = False) -> list[str]:
        """The needs (keys of PACKAGES) this image lacks for `layout` (and for booting over the network)."""
        needs = []
        if self.kernel is None:
            needs.append("kernel")
        if self.dracut_version is None:
            needs.append("dracut")
        if layout == "live" and "dmsquash-live" not in self.dracut_modules:
            needs.append("dmsquash-live")
        if self.init == "none":
            needs.append("init")
        if netboot and not self.netboot_ready:
            needs.append("livenet")
        return needs

    def packages(self, needs: list[str]) -> str:
        """'add `pkg pkg` to the image' for this family, or every family's names when the family is unknown."""
        if self.family in FAMILIES:
            names = dict.fromkeys(PACKAGES[n][self.family] for n in needs)  # ordered, without repeats
            return f"add `{' '.join(names)}` to the image (e.g. in its Containerfile)"
        by_family = {f: " ".join(dict.fromkeys(PACKAGES[n][f] for n in needs)) for f in ("debian", "fedora", "arch")}
        return "add " + ", ".join(f"`{p}` ({FAMILIES[f]})" for f, p in by_family.items()) + " to the image"

    def verdict(self, layout: str = "live", netboot: bool = False) -> str:
        needs = self.missing(layout, netboot)
        if not needs:
            return f"{self.name} can boot ({layout} layout{', and over the network' if netboot else ''}) as it is"
        shown = [n for n in needs if not (n == "dmsquash-live" and "dracut" in needs)]  # no dracut says it all
        problems = "; ".join(PROBLEMS[n] for n in shown)
        note = " (it uses initramfs-tools; dracut replaces it)" if self.initramfs_tools and "dracut" in needs else ""
        return f"{self.name} has {problems}{note}: {self.packages(needs)}"

    def as_json(self, layout: str = "live") -> dict[str, Any]:
        needs = self.missing(layout)
        return {
            "os_release": self.os_release,
            "family": FAMILIES.get(self.family, self.family),
            "architecture": self.architecture,
            "kernels": [{"version": k.version, "image": k.image and "/" + k.image, "modules": k.has_modules,
                         "complete": k.complete, "chosen": k == self.kernel} for k in self.kernels],
            "init": self.init,
            "dracut": {"version": self.dracut_version, "live_modules": sorted(
                m for m in self.dracut_modules if m in ("dmsquash-live", "livenet", "overlayfs"))},
            "netboot": self.netboot_ready,
            "initramfs_tools": self.initramfs_tools,
            "secure_boot_loader": self.signed_loader,
            "selinux_policy": self.selinux_policy,
            "selinux_mode": self.selinux_mode,
            "bootc": self.bootc,
            "sshd": self.sshd,
            "cloud_init": self.cloud_init,
            "cloud_datasources": None if self.cloud_datasources is None else list(self.cloud_datasources),
            "dhcp_client": self.dhcp_client,
            "systemd_version": self.systemd_version,
            "size_bytes": self.size_bytes,
            "layout": layout,
            "missing": [{"what": n, "package": PACKAGES[n].get(self.family)} for n in needs],  # to boot on its own
        }


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


def is_kernel_image(tree: Tree, path: str) -> bool:
    """A Linux kernel file: x86's boot protocol magic where the header was read; else any non-empty file (other
    architectures, or a tree whose headers were not captured)."""
    entry = tree.entry(path)
    if entry is None or entry.kind != "file" or entry.size == 0:
        return False
    header = tree.read(path)
    return header is None or len(header) < 0x206 or header[0x202:0x206] == b"HdrS" or header[:2] == b"MZ"


def find_kernels(tree: Tree) -> list[Kernel]:
    """Every kernel version the image has a trace of (Fedora: vmlinuz in the modules directory, Debian:
    /boot/vmlinuz-VERSION), newest first; only those with both an image and modules are complete."""
    kernels: dict[str, Kernel] = {}
    for version in tree.listdir("usr/lib/modules"):
        moddir = f"usr/lib/modules/{version}"
        image = next((i for i in (f"{moddir}/vmlinuz", f"boot/vmlinuz-{version}") if is_kernel_image(tree, i)),
                     None)
        modules = tree.is_file(f"{moddir}/modules.dep") or tree.is_dir(f"{moddir}/kernel")
        kernels[version] = Kernel(version, image and (tree.resolve(image) or image), modules)
    for name in tree.listdir("boot"):
        version = name.removeprefix("vmlinuz-")
        if name.startswith("vmlinuz-") and version not in kernels and is_kernel_image(tree, f"boot/{name}"):
            kernels[version] = Kernel(version, f"boot/{name}", False)
    return sorted(kernels.values(), key=lambda k: version_key(k.version), reverse=True)


def find_init(tree: Tree) -> str:
    if tree.is_file("usr/lib/systemd/systemd"):
        return "systemd"
    if tree.is_file("sbin/openrc-init") or tree.is_file("sbin/openrc"):
        return "openrc"
    return "sysvinit" if tree.is_file("sbin/init") else "none"


def find_dracut(tree: Tree) -> tuple[str | None, frozenset[str]]:
    """dracut's version ('unknown' when it does not say) and module names ('90dmsquash-live' -> 'dmsquash-live')."""
    if not any(tree.is_file(f"{d}/dracut") for d in ("usr/bin", "usr/sbin", "bin", "sbin")):
        return None, frozenset()
    version = "unknown"
    for line in (tree.read_text("usr/lib/dracut/dracut-version.sh") or "").splitlines():
        if line.startswith("DRACUT_VERSION="):
            version = line.partition("=")[2].strip("\"'")
    modules = frozenset(re.sub(r"^\d+", "", name) for name in tree.listdir("usr/lib/dracut/modules.d"))
    return version, modules


def find_architecture(tree: Tree) -> str | None:
    """From the ELF header of the init or the shell."""
    for binary in ("usr/lib/systemd/systemd", "sbin/init", "bin/sh", "usr/bin/sh"):
        header = tree.read(binary)
        if header and header[:4] == b"\x7fELF" and len(header) >= 20:
            machine = int.from_bytes(header[18:20], "little" if header[5] == 1 else "big")
            return ELF_MACHINES.get(machine, f"ELF machine {machine:#x}")
    return None


def find_selinux_policy(tree: Tree) -> str | None:
    """The SELINUXTYPE= of /etc/selinux/config, when that policy is there with the file_contexts it labels by."""
    match = SELINUX_TYPE.search(tree.read_text("etc/selinux/config") or "")
    if match and tree.is_dir(f"etc/selinux/{match.group(1)}/policy") \
            and tree.is_file(f"etc/selinux/{match.group(1)}/contexts/files/file_contexts"):
        return match.group(1)
    return None


def find_cloud_init(tree: Tree) -> bool:
    """Its command, or its Python package (cloudinit) where a distribution or pip put it."""
    if tree.is_file("usr/bin/cloud-init"):
        return True
    packages = [f"{lib}/{python}/{where}" for lib in ("usr/lib", "usr/local/lib") for python in tree.listdir(lib)
                if python.startswith("python3") for where in ("dist-packages", "site-packages")]
    return any(tree.is_dir(f"{directory}/cloudinit") for directory in packages)


def parse_datasource_list(text: str) -> tuple[str, ...] | None:
    """The datasource_list one cloud-init config file sets, or None when it sets none."""
    match = DATASOURCE_LIST.search(YAML_COMMENT.sub("", text))
    if match is None:
        return None
    return tuple(re.findall(r"\w+", match.group("flow") or match.group("block") or ""))


def find_cloud_datasources(tree: Tree) -> tuple[str, ...] | None:
    """The datasources cloud-init may use: it merges cloud.cfg and then cloud.cfg.d/*.cfg in name order, so the last
    file that sets datasource_list decides. None: no file restricts them."""
    files = [CLOUD_CONFIG, *(f"{CLOUD_CONFIG_DIR}/{name}" for name in tree.listdir(CLOUD_CONFIG_DIR)
                             if name.endswith(".cfg"))]
    found = None
    for path in files:
        if (listed := parse_datasource_list(tree.read_text(path) or "")) is not None:
            found = listed
    return found


def find_systemd_version(tree: Tree, init: str) -> int | None:
    """The booted systemd's version, from its private library's name; else from the systemd package in dpkg's
    status (the library's name was not always versioned)."""
    if init != "systemd":
        return None
    multiarch = [f"usr/lib/{name}/systemd" for name in tree.listdir("usr/lib") if MULTIARCH.fullmatch(name)]
    for directory in (*SYSTEMD_LIBRARY_DIRS, *multiarch):
        for name in tree.listdir(directory):
            if match := SYSTEMD_SHARED.fullmatch(name):
                return int(match.group(1))
    return dpkg_major_version(tree, "systemd")


def dpkg_stanzas(status: str) -> Iterator[dict[str, str]]:
    """The packages of a dpkg status file, each as its fields (Package, Status, Version...)."""
    for stanza in status.split("\n\n"):
        yield dict(DPKG_FIELD.findall(stanza))


def dpkg_major_version(tree: Tree, package: str) -> int | None:
    """The upstream major version of an installed Debian package (252 for 252.39-1~deb12u1)."""
    for fields in dpkg_stanzas(tree.read_text(DPKG_STATUS) or ""):
        if fields.get("Package") == package and fields.get("Status", "").endswith(" installed"):
            version = DPKG_VERSION.match(fields.get("Version", ""))
            return int(version.group(1)) if version else None
    return None


def kernel_config(root: Path, version: str) -> str | None:
    """The configuration the kernel `version` was built with, where a directory tree keeps it (Debian and Ubuntu in
    /boot, Fedora and Arch beside the modules); None when it keeps none."""
    for path in (root / "boot" / f"config-{version}", root / "usr/lib/modules" / version / "config"):
        if path.is_file():
            return path.read_text(errors="replace")
    return None


def examine(tree: Tree, labels: dict[str, str] | None = None, architecture: str | None = None) -> Report:
    """Everything `c2boot inspect` reports about a tree; `labels` and `architecture` come from the image's
    metadata when there is an image."""
    dracut_version, dracut_modules = find_dracut(tree)
    init = find_init(tree)
    signed = next((s.vendor for s in SIGNED_LOADERS if tree.is_file(s.shim) and tree.is_file(s.grub)), None)
    return Report(
        os_release=parse_os_release(tree.read_text("etc/os-release") or tree.read_text("usr/lib/os-release") or ""),
        architecture=find_architecture(tree) or architecture,
        kernels=find_kernels(tree),
        init=init,
        dracut_version=dracut_version,
        dracut_modules=dracut_modules,
        initramfs_tools=tree.is_file("usr/sbin/mkinitramfs") or tree.is_file("sbin/mkinitramfs"),
        signed_loader=signed,
        selinux_policy=find_selinux_policy(tree),
        selinux_mode=image_mode(tree.read_text("etc/selinux/config") or ""),
        size_bytes=tree.size_bytes(),
        labels=dict(labels or {}),
        curl=any(tree.is_file(f"{d}/curl") for d in ("usr/bin", "bin")),
        passwd=tree.read_text("etc/passwd") or "",
        group=tree.read_text("etc/group") or "",
        sshd=any(tree.is_file(path) for path in SSHD),
        cloud_init=find_cloud_init(tree),
        cloud_datasources=find_cloud_datasources(tree),
        dhcp_client=any(tree.is_file(path) for path in DHCP_CLIENTS),
        systemd_version=find_systemd_version(tree, init),
        tree=tree,
    )


def examine_directory(root: Path) -> Report:
    """The report of a rootfs directory (the assemble stage's view of the image, or of the kernel image)."""
    if not root.is_dir():
        raise C2BootError(f"rootfs {root} is not a directory")
    return examine(Tree.from_directory(root))
