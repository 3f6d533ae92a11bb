"""Settings: one table drives the CLI options, the config file, the defaults and the help text.

The CLI (or a program using the Python API) turns the table into one immutable `Config`; every stage reads from it
and nothing writes back to it.
"""

import dataclasses
import re
import tomllib
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from container2boot import cmdline
from container2boot.errors import C2BootError

COMPRESSIONS = ("zstd", "xz", "gzip", "lz4", "lzo")
ROOT_FORMATS = ("squashfs", "erofs")
PULL_POLICIES = ("missing", "always", "newer", "never")
PARTITION_TABLES = ("gpt", "mbr")
LAYOUTS = ("live", "installed")
ROOTFS_TYPES = ("ext4", "xfs", "btrfs")
DISK_FORMATS = ("raw", "qcow2", "vmdk", "vdi", "vhdx", "vhd")
DISK_COMPRESSIONS = ("zst", "xz")
FIRMWARES = ("uefi", "bios", "secure-boot")
CLOUDS = ("digitalocean", "openstack", "gce", "azure")
SELINUX_SETTINGS = ("auto", "off", "permissive", "enforcing")
SIZE_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
MIN_MEMORY_MIB = 128
DEFAULT_BASE_IMAGE = "docker.io/library/debian:trixie"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
HOSTNAME_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
HOSTNAME = re.compile(rf"(?=.{{1,64}}$){HOSTNAME_LABEL}(\.{HOSTNAME_LABEL})*")  # systemd takes up to 64
_PATH_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
# An image name as podman tags it: [REGISTRY[:PORT]/]PATH[:TAG] (the distribution reference grammar, digests aside)
IMAGE_REFERENCE = re.compile(rf"(?:[A-Za-z0-9.-]+(?::\d+)?/)?{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*"
                             r"(?::\w[\w.-]{0,127})?")

Command = Literal["build", "assemble", "inspect", "run", "test", "serve", "sync", "ssh", "libvirt", "cache", "verify",
                  "rootbuilder"]


@dataclass(frozen=True)
class Setting:
    """One user-facing setting: its CLI flags, config-file key, type, default and help."""

    name: str
    kind: type
    default: Any
    help: str
    flags: tuple[str, ...]
    commands: frozenset[Command]
    repeatable: bool = False
    choices: tuple[str, ...] = ()
    metavar: str | None = None
    panel: str = "Output"

    @property
    def key(self) -> str:
        """The config-file key: the long flag without dashes."""
        return self.flags[0].removeprefix("--")


BOTH: frozenset[Command] = frozenset({"build", "assemble"})
BUILD: frozenset[Command] = frozenset({"build"})
ALL: frozenset[Command] = frozenset({"build", "assemble", "inspect", "run", "test", "serve", "sync", "ssh", "libvirt",
                                     "cache", "verify", "rootbuilder"})
ROOTBUILDER: frozenset[Command] = frozenset({"rootbuilder"})
ASSEMBLE: frozenset[Command] = frozenset({"assemble"})
REGISTRY: frozenset[Command] = frozenset({"rootbuilder", "assemble"})  # they talk to a registry themselves
BUILDS_ROOTBUILDER: frozenset[Command] = frozenset({"build", "rootbuilder"})
MAKING: frozenset[Command] = frozenset({"build", "assemble", "inspect"})
BOOTING: frozenset[Command] = frozenset({"build", "run", "test", "ssh", "libvirt"})  # build boots with --test
VM: frozenset[Command] = frozenset({"run", "test", "ssh"})
ACCESS: frozenset[Command] = frozenset({"build", "assemble", "run", "test", "ssh"})  # at build time, or at boot
SSH: frozenset[Command] = frozenset({"ssh"})
LIBVIRT: frozenset[Command] = frozenset({"libvirt"})

SETTINGS: tuple[Setting, ...] = (
    Setting("output", Path, Path("out"), "Directory to write esp/, disk.img and manifest.json into.",
            ("--output", "-o"), BOTH, metavar="DIR"),
    Setting("diskimage", bool, False, "Also write disk.img: a GPT disk with the ESP, made by systemd-repart.",
            ("--diskimage",), BOTH),
    Setting("bios", bool, False, "Also boot with legacy BIOS (SeaBIOS, older machines): syslinux on the ESP and BIOS "
            "boot code in disk.img. The disk still boots with UEFI.", ("--bios",), BOTH, panel="Boot"),
    Setting("table", str, "gpt", "Partition table of disk.img. gpt: for UEFI, and for BIOS too with --bios. mbr: "
            "for BIOS machines that cannot read GPT; needs --bios.", ("--table",), BOTH,
            choices=PARTITION_TABLES, panel="Boot"),
    Setting("layout", str, "live", "live: the root is a read-only image (squashfs or EROFS) with a tmpfs overlay, "
            "changes are lost at reboot. installed: disk.img gets a writable root partition holding the image's "
            "filesystem, like a normal installation (implies --diskimage).", ("--layout",), MAKING, choices=LAYOUTS,
            panel="Boot"),
    Setting("size", str, None, "Size of disk.img for --layout installed, e.g. 4G or 1500M; the root partition "
            "fills it (default: the content plus room).", ("--size",), BOTH, metavar="SIZE", panel="Boot"),
    Setting("rootfs_type", str, "ext4", "Filesystem of the root partition for --layout installed.",
            ("--rootfs-type",), BOTH, choices=ROOTFS_TYPES, panel="Boot"),
    Setting("force", bool, False, "Replace the outputs in an existing, non-empty output directory.",
            ("--force",), BOTH),
    Setting("root_format", str, "squashfs", "File system of the live root image: squashfs (squashfs.img, the "
            "smallest) or erofs (erofs.img: packed 4-5 times faster, about a fifth bigger; the image's kernel "
            "must read EROFS and its dracut be 103 or newer).", ("--root-format",), BOTH, choices=ROOT_FORMATS,
            panel="Boot"),
    Setting("compression", str, "zstd", "Compression of the root image (squashfs.img or erofs.img; EROFS has no "
            "lzo).",
            ("--compression",), BOTH, choices=COMPRESSIONS, panel="Boot"),
    Setting("cmdline", str, "", "Extra kernel arguments, appended to the defaults (live root, serial console).",
            ("--cmdline",), BOTH, metavar="ARGS", panel="Boot"),
    Setting("selinux", str, "auto", "SELinux: auto labels every file of the root from the image's own policy "
            "(its /etc/selinux/config and file_contexts) when it has one, and boots in the mode that config says; "
            "enforcing or permissive label it and boot so; off boots with SELinux disabled (selinux=0).",
            ("--selinux",), BOTH, choices=SELINUX_SETTINGS, panel="Boot"),
    Setting("netboot", bool, False, "Let the machine also boot over the network: dracut's livenet module fetches "
            "the root image over HTTP (serve it with `c2boot serve`). The image needs dracut-network and curl.",
            ("--netboot",), BOTH, panel="Boot"),
    Setting("formats", str, (), "Also convert disk.img to this format with qemu-img (raw, qcow2, vmdk, vdi, vhdx, "
            "vhd: a fixed VHD as Azure wants it); implies --diskimage. Repeatable.", ("--format",), BOTH,
            repeatable=True, metavar="|".join(DISK_FORMATS)),
    Setting("containerdisk", str, None, "Also make a KubeVirt containerDisk: the image NAME in podman's storage "
            "holding disk.qcow2 at /disk/ (owned by 107:107), ready for `podman push`; implies --format qcow2.",
            ("--containerdisk",), BUILD, metavar="NAME"),
    Setting("compress", str, None, "Also write a compressed copy (.zst or .xz) of each disk image, for download; "
            "the uncompressed ones stay for `c2boot run`.", ("--compress",), BOTH, choices=DISK_COMPRESSIONS),
    Setting("test", bool, False, "After building, boot disk.img headless and check that the system comes up, as "
            "`c2boot test` does (implies --diskimage; exit 1 if it does not).", ("--test",), BUILD,
            panel="Virtual machine"),
    Setting("firmware", str, "uefi", "Firmware of the virtual machine: uefi (OVMF), secure-boot (OVMF with Secure "
            "Boot on and Microsoft's keys enrolled), bios (SeaBIOS; the disk needs --bios).", ("--firmware",),
            BOOTING, choices=FIRMWARES, panel="Virtual machine"),
    Setting("memory", str, "2G", "Memory of the virtual machine.", ("--memory",), BOOTING, metavar="SIZE",
            panel="Virtual machine"),
    Setting("cpus", int, 2, "Virtual CPUs of the virtual machine.", ("--cpus",), BOOTING, metavar="N",
            panel="Virtual machine"),
    Setting("timeout", int, 300, "Seconds to wait for the system to come up before the test fails.",
            ("--timeout",), frozenset({"build", "test", "ssh"}), metavar="SECONDS", panel="Virtual machine"),
    Setting("ssh_port", int, None, "Forward this host port (on 127.0.0.1) to the guest's ssh port 22.",
            ("--ssh-port",), frozenset({"run"}), metavar="PORT", panel="Virtual machine"),
    Setting("publish", str, (), "Forward 127.0.0.1:HOSTPORT to the guest's GUESTPORT (TCP), as podman run -p "
            "does, e.g. 8080:80 for an app's web server. Repeatable.", ("--publish", "-p"), VM, repeatable=True,
            metavar="HOSTPORT:GUESTPORT", panel="Virtual machine"),
    Setting("direct", bool, False, "Boot the kernel and initrd from esp/ directly (QEMU -kernel/-initrd/-append, "
            "no boot loader); the disk stays attached for the root.", ("--direct",), VM, panel="Virtual machine"),
    Setting("boot_from_network", bool, False, "Boot over QEMU's user network: serve the root image over HTTP on "
            "127.0.0.1 and start the kernel with root=live:http://... (the build needs --netboot).",
            ("--netboot",), VM, panel="Virtual machine"),
    Setting("append", str, "", "Extra kernel arguments for --direct and --netboot boots (e.g. "
            "systemd.unit=rescue.target).", ("--append",), VM, metavar="ARGS", panel="Virtual machine"),
    Setting("port", int, 8080, "TCP port to serve on (0: any free port).", ("--port",), frozenset({"serve"}),
            metavar="PORT"),
    Setting("address", str, "127.0.0.1", "Address to serve on: 127.0.0.1 reaches virtual machines on this host "
            "(QEMU's user network); 0.0.0.0 serves the local network too.", ("--address",), frozenset({"serve"}),
            metavar="ADDRESS"),
    Setting("dry_run", bool, False, "Show what would be copied or deleted, and change nothing.", ("--dry-run",),
            frozenset({"sync"})),
    Setting("delete", bool, False, "Also delete files the ESP tree does not have, in the directories it writes "
            "(EFI/BOOT, container2boot, ...); other files on the stick stay.", ("--delete",), frozenset({"sync"})),
    Setting("app", bool, False, "Run the image's ENTRYPOINT and CMD with container2boot's init and a supplied "
            "kernel, as an application image, even though it has an init system of its own.", ("--app",), MAKING,
            panel="Application"),
    Setting("entrypoint", str, None, "The app's ENTRYPOINT instead of the image's (a command line, or a JSON "
            "array); as with podman, it also drops the image's CMD.", ("--entrypoint",), MAKING, metavar="CMD",
            panel="Application"),
    Setting("cmd", str, None, "The app's CMD instead of the image's (a command line, or a JSON array).",
            ("--cmd",), MAKING, metavar="CMD", panel="Application"),
    Setting("env", str, (), "Set an environment variable of the app (after the image's ENV). Repeatable.",
            ("--env",), MAKING, repeatable=True, metavar="KEY=VALUE", panel="Application"),
    Setting("user", str, None, "An application image: run the app as this user, a name from the image's "
            "/etc/passwd or uid[:gid] (default: the image's USER, else root). A machine image: the user to log in "
            "as, created when the image lacks it; --ssh-key, --password-secret and --groups apply to it.",
            ("--user",), MAKING, metavar="USER", panel="Access"),
    Setting("groups", str, None, "Supplementary groups of --user on a machine image, comma-separated (e.g. "
            "sudo,adm); each must exist in the image.", ("--groups",), MAKING, metavar="G1,G2", panel="Access"),
    Setting("hostname", str, None, "The machine's hostname. build: written to /etc/hostname of the bootable root "
            "(the image is not changed). run, test, ssh: given at boot as a systemd credential (systemd 254+), the "
            "disk untouched.", ("--hostname",), ACCESS, metavar="NAME", panel="Access"),
    Setting("ssh_keys", Path, (), "A file of SSH public keys, one per line (e.g. ~/.ssh/id_ed25519.pub), that may "
            "log in: as --user when given, else as root. build: written to the root's authorized_keys. run, test, "
            "ssh: given at boot as a systemd credential (systemd 252+), the disk untouched. Repeatable.",
            ("--ssh-key",), ACCESS, repeatable=True, metavar="FILE", panel="Access"),
    Setting("password_secret", str, None, "The password of --user (else root) from a file, in podman's secret "
            "syntax: a password, or a crypt hash ($6$..., $y$...). Only its hash enters the root; never an image "
            "layer or the manifest.", ("--password-secret",), BOTH, metavar="id=ID,src=FILE", panel="Access"),
    Setting("cloud_init", Path, None, "cloud-init user-data (#cloud-config YAML or a script). run, test, ssh: "
            "attached as a NoCloud seed volume (FAT labelled cidata). build: embedded as the root's NoCloud seed "
            "(/var/lib/cloud/seed/nocloud), for images with cloud-init.", ("--cloud-init",), ACCESS,
            metavar="FILE", panel="Access"),
    Setting("cloud", str, None, "Also write the disk as this cloud imports it: digitalocean (disk.img.gz), "
            "openstack (disk.qcow2), gce (disk.raw in disk.tar.gz), azure (fixed disk.vhd, 1 MiB aligned); warns "
            "what the image lacks there (implies --diskimage).", ("--cloud",), BOTH, choices=CLOUDS),
    Setting("login", str, "root", "The user to log in as.", ("--login", "-l"), SSH, metavar="USER",
            panel="Access"),
    Setting("identity", Path, None, "Log in with this private key (the image, the build's --ssh-key, or for root "
            "a boot-time --ssh-key must let it in; a key with a passphrase must be in ssh-agent), instead of a "
            "throw-away key given to root as a credential.", ("--identity", "-i"), SSH, metavar="FILE",
            panel="Access"),
    Setting("domain_name", str, None, "Name of the libvirt domain (default: c2boot- and the output directory's "
            "name).", ("--name",), LIBVIRT, metavar="NAME"),
    Setting("define", bool, False, "Define the domain in your qemu:///session libvirt (no root needed) instead of "
            "printing its XML; start it with `virsh -c qemu:///session start NAME`.", ("--define",), LIBVIRT),
    Setting("virt_install", bool, False, "Print the equivalent `virt-install --import` command line instead of "
            "the XML.", ("--virt-install",), LIBVIRT),
    Setting("console_log", Path, None, "Also write the serial console to this file: the boot test's whole console "
            "(test, build --test), or the libvirt domain's.", ("--console-log",),
            frozenset({"libvirt", "test", "build"}), metavar="FILE", panel="Virtual machine"),
    Setting("workdir", str, None, "The app's working directory (default: the image's WORKDIR, else /).",
            ("--workdir",), MAKING, metavar="DIR", panel="Application"),
    Setting("supplied_kernel", bool, False, "Boot the supplied kernel (and its initrd) even when the image has a "
            "kernel of its own.", ("--supplied-kernel",), MAKING, panel="Kernel"),
    Setting("kernel_image", str, None, "The image that supplies the kernel, its modules and the dracut that makes "
            "its initrd, for images without a usable kernel (default: one built on first use from Debian's "
            "signed linux-image-amd64).", ("--kernel-image",), BUILD, metavar="REF",
            panel="Kernel"),
    Setting("kernel_root", Path, None, "The root filesystem of the image that supplies the kernel (e.g. mounted "
            "with --mount=type=image,source=KERNELIMAGE,target=/kernel), for images without a usable kernel.",
            ("--kernel-root",), frozenset({"assemble"}), metavar="DIR", panel="Kernel"),
    Setting("image", str, None, "Use this existing image instead of building one (e.g. localhost/my/machine:latest).",
            ("--image",), BUILD, metavar="REF", panel="Machine image"),
    Setting("containerfile", Path, None, "Build the machine image from this Containerfile "
            "(default: the bundled example machine).", ("--file", "-f"), BUILD, metavar="FILE",
            panel="Machine image"),
    Setting("context", Path, None, "Build context (also the positional CONTEXT; default: the Containerfile's "
            "directory). Without --file, its Containerfile or Dockerfile is built.", ("--context",), BUILD,
            metavar="DIR", panel="Machine image"),
    Setting("tag", str, None, "Name of the machine image built from --file or CONTEXT (default: "
            "localhost/container2boot/custom:latest).", ("--tag", "-t"), BUILD, metavar="NAME",
            panel="Machine image"),
    Setting("build_args", str, (), "Build argument for the machine image, as for podman build. Repeatable.",
            ("--build-arg",), BUILD, repeatable=True, metavar="KEY=VALUE", panel="Machine image"),
    Setting("pull", str, "missing", "When to pull images (--image, --kernel-image, the Containerfile's FROM) from "
            "their registry, as podman build --pull: missing (those not here), always (fail when the registry "
            "cannot be reached), newer (when the registry has a newer one), never.", ("--pull",), BUILD,
            choices=PULL_POLICIES, panel="Machine image"),
    Setting("secrets", str, (), "Build secret for the machine image, as for podman build "
            "(e.g. id=chpass,src=./creds). Repeatable.", ("--secret",), BUILD, repeatable=True,
            metavar="id=ID,src=PATH", panel="Machine image"),
    Setting("base_image", str, DEFAULT_BASE_IMAGE, "Base image for the bundled Containerfiles. When it is neither "
            "present nor pullable, it is bootstrapped with mmdebstrap.", ("--base-image",), BUILDS_ROOTBUILDER,
            metavar="REF", panel="Machine image"),
    Setting("mirror", str, DEFAULT_MIRROR, "Debian mirror for bootstrapping the base image with mmdebstrap.",
            ("--mirror",), BUILDS_ROOTBUILDER, metavar="URL", panel="Machine image"),
    Setting("no_cache", bool, False, "Make every output again instead of copying those of an identical earlier "
            "build, or its initrd, from the cache (the new ones still replace them there).", ("--no-cache",), BOTH),
    Setting("cache_size", str, "20G", "Largest size of the build cache (in $XDG_CACHE_HOME/container2boot); the "
            "least recently used outputs go first.", ("--cache-size",), frozenset({"build", "cache"}),
            metavar="SIZE"),
    Setting("unused_days", int, None, "With `cache prune`: remove the outputs not used for this many days.",
            ("--older-than",), frozenset({"cache"}), metavar="DAYS"),
    Setting("prune_all", bool, False, "With `cache prune`: empty the cache.", ("--all",), frozenset({"cache"})),
    Setting("rebuild_output", Path, None, "With `verify`: keep the rebuilt outputs in this new directory, to compare "
            "them yourself (default: a temporary one beside OUT, removed).", ("--output", "-o"),
            frozenset({"verify"}), metavar="DIR"),
    Setting("publish_tag", str, None, "Also tag the rootbuilder REF: the name a cluster or CI runner pulls it by "
            "(e.g. registry.example.org/c2boot/rootbuilder:VERSION).", ("--tag", "-t"), ROOTBUILDER, metavar="REF"),
    Setting("push", bool, False, "Push --tag to its registry (credentials from podman's auth file, as `podman "
            "login` writes it).", ("--push",), ROOTBUILDER),
    Setting("no_tls_verify", bool, False, "Talk to the registry over plain HTTP or without checking its "
            "certificate (a registry on this host or a test network only).", ("--no-tls-verify",), REGISTRY),
    Setting("authfile", Path, None, "Credentials for a docker:// ROOTFS: the auth file `podman login` or `docker "
            "login` writes, e.g. a mounted dockerconfigjson secret (default: $REGISTRY_AUTH_FILE, then skopeo's usual "
            "places).", ("--authfile",), ASSEMBLE, metavar="FILE"),
    Setting("quiet", bool, False, "Print warnings and errors only, no progress.", ("--quiet", "-q"), ALL),
    Setting("verbose", bool, False, "Show the command lines of the tools container2boot runs.",
            ("--verbose", "-v"), ALL),
)
SETTINGS_BY_NAME: Mapping[str, Setting] = {s.name: s for s in SETTINGS}


@dataclass(frozen=True)
class Config:
    """Everything one build needs, decided before the first stage runs."""

    output: Path = Path("out")
    diskimage: bool = False
    bios: bool = False
    table: str = "gpt"
    layout: str = "live"
    size: str | None = None
    rootfs_type: str = "ext4"
    force: bool = False
    root_format: str = "squashfs"
    compression: str = "zstd"
    cmdline: str = ""
    selinux: str = "auto"
    image: str | None = None
    containerfile: Path | None = None
    context: Path | None = None
    tag: str | None = None
    build_args: tuple[str, ...] = ()
    pull: str = "missing"
    secrets: tuple[str, ...] = ()
    base_image: str = DEFAULT_BASE_IMAGE
    mirror: str = DEFAULT_MIRROR
    verbose: bool = False
    quiet: bool = False
    no_cache: bool = False
    cache_size: str = "20G"
    unused_days: int | None = None
    prune_all: bool = False
    netboot: bool = False
    formats: tuple[str, ...] = ()
    containerdisk: str | None = None
    publish_tag: str | None = None
    push: bool = False
    no_tls_verify: bool = False
    authfile: Path | None = None
    compress: str | None = None
    test: bool = False
    firmware: str = "uefi"
    memory: str = "2G"
    cpus: int = 2
    timeout: int = 300
    ssh_port: int | None = None
    publish: tuple[str, ...] = ()
    direct: bool = False
    boot_from_network: bool = False
    append: str = ""
    port: int = 8080
    address: str = "127.0.0.1"
    dry_run: bool = False
    delete: bool = False
    app: bool = False
    entrypoint: str | None = None
    cmd: str | None = None
    env: tuple[str, ...] = ()
    user: str | None = None
    groups: str | None = None
    hostname: str | None = None
    ssh_keys: tuple[Path, ...] = ()
    password_secret: str | None = None
    cloud_init: Path | None = None
    cloud: str | None = None
    login: str = "root"
    identity: Path | None = None
    domain_name: str | None = None
    define: bool = False
    virt_install: bool = False
    console_log: Path | None = None
    workdir: str | None = None
    supplied_kernel: bool = False
    kernel_image: str | None = None
    kernel_root: Path | None = None
    rebuild_output: Path | None = None
    # Not user settings: where the machine image came from, recorded in the manifest by the assemble stage, and
    # its OCI configuration (JSON of plan.ImageConfig: ENTRYPOINT, CMD, ENV...), which the plan reads.
    source: Mapping[str, str] = field(default_factory=dict)
    image_config: str = ""

    def with_absolute_paths(self) -> "Config":
        """The same settings with every file they name by absolute path (to be read again from elsewhere)."""
        def absolute(path: Path) -> Path:
            return path.expanduser().absolute()

        secret = self.password_secret
        if secret is not None:
            fields = (part.partition("=")[::2] for part in secret.split(","))
            secret = ",".join(f"{k}={absolute(Path(v)) if k == 'src' else v}" for k, v in fields)
        return self.replace(ssh_keys=tuple(map(absolute, self.ssh_keys)), password_secret=secret,
                            cloud_init=None if self.cloud_init is None else absolute(self.cloud_init))

    def __post_init__(self) -> None:
        for name, value, choices in (("compression", self.compression, COMPRESSIONS),
                                     ("root format", self.root_format, ROOT_FORMATS),
                                     ("--pull policy", self.pull, PULL_POLICIES),
                                     ("partition table", self.table, PARTITION_TABLES),
                                     ("layout", self.layout, LAYOUTS), ("rootfs type", self.rootfs_type, ROOTFS_TYPES),
                                     ("--selinux setting", self.selinux, SELINUX_SETTINGS)):
            if value not in choices:
                raise C2BootError(f"unknown {name} {value!r}: use one of {', '.join(choices)}")
        if self.compress is not None and self.compress not in DISK_COMPRESSIONS:
            raise C2BootError(f"unknown --compress {self.compress!r}: use one of {', '.join(DISK_COMPRESSIONS)}")
        if self.firmware not in FIRMWARES:
            raise C2BootError(f"unknown firmware {self.firmware!r}: use one of {', '.join(FIRMWARES)}")
        if unknown := [f for f in self.formats if f not in DISK_FORMATS]:
            raise C2BootError(f"unknown --format {unknown[0]!r}: use one of {', '.join(DISK_FORMATS)}")
        if self.cloud is not None and self.cloud not in CLOUDS:
            raise C2BootError(f"unknown --cloud {self.cloud!r}: use one of {', '.join(CLOUDS)}")
        for option, reference in (("--containerdisk", self.containerdisk), ("--tag", self.publish_tag)):
            if reference is not None and not IMAGE_REFERENCE.fullmatch(reference):
                raise C2BootError(f"{option} {reference!r} is not an image name: use lower-case [REGISTRY/]PATH[:TAG], "
                                  "e.g. registry.example.org/vms/web:1")
        if self.push and self.publish_tag is None:
            raise C2BootError("--push pushes the --tag name: add --tag REGISTRY/PATH:TAG")
        if self.containerdisk is not None and "qcow2" not in self.formats:
            object.__setattr__(self, "formats", (*self.formats, "qcow2"))  # what the image holds
        if self.formats or self.compress or self.test or self.cloud or self.layout == "installed":
            object.__setattr__(self, "diskimage", True)  # they need disk.img (installed: the root partition)
        if self.layout == "installed":
            if self.netboot:
                raise C2BootError("--netboot fetches the live layout's root image: drop it for --layout installed")
            if self.table == "mbr":
                raise C2BootError("--layout installed makes GPT disks only: drop --table mbr (--bios works with GPT)")
            if self.compression != "zstd" or self.root_format != "squashfs":
                option = "--compression" if self.compression != "zstd" else "--root-format"
                raise C2BootError(f"{option} sets the live layout's root image: drop it for --layout installed")
        elif self.root_format == "erofs" and self.compression == "lzo":
            raise C2BootError("EROFS cannot be compressed with lzo: use --compression zstd, xz, gzip or lz4, or "
                              "--root-format squashfs")
        elif self.size is not None or self.rootfs_type != "ext4":
            raise C2BootError("--size and --rootfs-type apply to --layout installed: add --layout installed")
        if self.size is not None:
            parse_size(self.size)
        parse_size(self.cache_size, "--cache-size")
        if self.unused_days is not None and self.unused_days < 0:
            raise C2BootError(f"--older-than {self.unused_days}: give a number of days, 0 or more")
        cmdline.check(self.cmdline, "--cmdline", reserved=cmdline.ROOM_FOR_DEFAULTS)
        cmdline.check(self.append, "--append", reserved=cmdline.ROOM_FOR_DEFAULTS)
        if self.table == "mbr" and not self.diskimage:
            raise C2BootError("--table describes disk.img: add --diskimage")
        if self.table == "mbr" and not self.bios:
            raise C2BootError("--table mbr is for BIOS machines: add --bios (the MBR disk boots with UEFI too)")
        if self.test and self.firmware == "bios" and not self.bios:
            raise C2BootError("--firmware bios tests a BIOS boot: add --bios so that disk.img can boot that way")
        if self.direct and self.boot_from_network:
            raise C2BootError("--direct and --netboot are two ways to start the kernel: choose one")
        if self.append and not (self.direct or self.boot_from_network):
            raise C2BootError("--append changes the kernel arguments of --direct and --netboot boots: add one "
                              "(a disk boots with the arguments in its boot loader's config)")
        if self.cpus < 1 or self.timeout < 1:
            raise C2BootError("--cpus and --timeout must be positive numbers")
        for option, port, lowest in (("--ssh-port", self.ssh_port, 1), ("--port", self.port, 0)):
            if port is not None and not lowest <= port < 65536:
                raise C2BootError(f"{option} {port} is not a port number: use e.g. 2222 or 8080")
        parse_size(self.memory, "--memory")
        for spec in self.publish:
            if not re.fullmatch(r"\d{1,5}:\d{1,5}", spec) or not all(0 < int(p) < 65536 for p in spec.split(":")):
                raise C2BootError(f"--publish {spec!r}: write it as HOSTPORT:GUESTPORT, e.g. 8080:80")
        if self.image and self.containerfile:
            raise C2BootError("--image and --file exclude each other: build from a Containerfile or use an image")
        if self.image and (self.context or self.tag or self.build_args):
            raise C2BootError("--image takes an image as it is: drop the build context, --tag and --build-arg, or "
                              "build from a Containerfile instead")
        for spec in self.build_args:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", spec, re.DOTALL):
                raise C2BootError(f"--build-arg {spec!r}: write it as KEY=VALUE, e.g. --build-arg VERSION=1.2")
        for name in ("image", "kernel_image", "base_image", "mirror", "workdir", "tag"):
            if getattr(self, name) == "":
                raise C2BootError(f"--{name.replace('_', '-')} needs a value")
        for name in ("output", "containerfile", "context", "kernel_root", "cmdline", "append", "cmd", "entrypoint"):
            if "\0" in str(getattr(self, name) or ""):
                raise C2BootError(f"--{name.replace('_', '-')} contains a NUL character")
        if self.hostname is not None and not HOSTNAME.fullmatch(self.hostname):
            raise C2BootError(f"--hostname {self.hostname!r} is not a hostname: use letters, digits and '-' in dot-"
                              "separated labels, at most 64 characters (e.g. web1 or web1.example.org)")
        if self.groups is not None and self.user is None:
            raise C2BootError("--groups adds --user to groups: add --user NAME")
        if self.define and self.virt_install:
            raise C2BootError("--define and --virt-install are two ways to hand the domain over: choose one")
        if self.memory_mib < MIN_MEMORY_MIB:
            raise C2BootError(f"--memory {self.memory} is too little to boot: give at least {MIN_MEMORY_MIB}M")
        if self.secrets and self.image:
            raise C2BootError("--secret is for building the machine image, and --image takes a built one: drop "
                              "--secret, or build with --file")

    @property
    def size_bytes(self) -> int | None:
        return None if self.size is None else parse_size(self.size)

    @property
    def cache_bytes(self) -> int:
        return parse_size(self.cache_size, "--cache-size")

    @property
    def published_ports(self) -> tuple[tuple[int, int], ...]:
        return tuple((int(host), int(guest)) for host, _, guest in (p.partition(":") for p in self.publish))

    @property
    def memory_mib(self) -> int:
        return parse_size(self.memory, "--memory") // 1024**2

    def replace(self, **changes: Any) -> "Config":
        return dataclasses.replace(self, **changes)


def parse_size(text: str, option: str = "--size") -> int:
    """'4G', '1500M', '4GiB', '512K' or plain bytes; units are powers of 1024, like systemd-repart's."""
    match = re.fullmatch(r"\s*(\d{1,15}(?:\.\d{1,6})?)\s*([KMGT]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if match is None or float(match.group(1)) <= 0:
        raise C2BootError(f"{option} {text!r} is not a size: use e.g. 4G or 1500M")
    return int(float(match.group(1)) * SIZE_UNITS[match.group(2).upper()])


def _check_defaults_match() -> None:
    """The table and the dataclass must agree; a mismatch is a programming error caught at import."""
    fields = {f.name: f for f in dataclasses.fields(Config)}
    for setting in SETTINGS:
        declared = fields[setting.name].default
        assert declared == setting.default, f"{setting.name}: table default {setting.default!r} != {declared!r}"
        assert setting.kind is not bool or setting.default is False, f"{setting.name}: flags default to off"


_check_defaults_match()


def load_config_file(path: Path, command: Command) -> dict[str, Any]:
    """Read a TOML config file whose keys are the long option names (e.g. `base-image = "..."`)."""
    if path.exists() and not path.is_file() and not path.is_dir():
        raise C2BootError(f"config file {path} is not a regular file: pass a TOML file")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise C2BootError(f"config file {path} not found: check the --config path") from None
    except IsADirectoryError:
        raise C2BootError(f"config file {path} is a directory: pass a TOML file") from None
    except UnicodeDecodeError:
        raise C2BootError(f"config file {path} is not UTF-8 text: pass a TOML file") from None
    except OSError as e:
        raise C2BootError(f"config file {path} cannot be read: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise C2BootError(f"config file {path} is not valid TOML: {e}") from None
    by_key = {s.key: s for s in SETTINGS if command in s.commands}
    values: dict[str, Any] = {}
    for key, value in data.items():
        setting = by_key.get(key)
        if setting is None:
            raise C2BootError(f"config file {path}: unknown key {key!r}; known keys: {', '.join(sorted(by_key))}")
        values[setting.name] = _coerce(setting, value, f"config file {path}: {key}")
    return values


def _coerce(setting: Setting, value: Any, where: str) -> Any:
    if setting.repeatable:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise C2BootError(f"{where} must be a list of strings")
        return tuple(Path(v) if setting.kind is Path else v for v in value)
    if setting.kind is bool and not isinstance(value, bool):
        raise C2BootError(f"{where} must be true or false")
    expected = str if setting.kind is Path else setting.kind
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        kind = {str: "string (in quotes)", int: "whole number"}.get(expected, expected.__name__)
        raise C2BootError(f"{where} must be a {kind}, not {value!r}")
    return Path(str(value)) if setting.kind is Path else value


def make_config(cli_values: Mapping[str, Any], file_values: Mapping[str, Any] | None = None,
                **extra: Any) -> Config:
    """CLI values win over the config file, which wins over the defaults. None means 'not given'."""
    merged: dict[str, Any] = dict(file_values or {})
    for name, value in cli_values.items():
        if value is None or (SETTINGS_BY_NAME[name].repeatable and not value):
            continue
        merged[name] = tuple(value) if isinstance(value, Sequence) and not isinstance(value, str) else value
    return Config(**merged, **extra)


# Settings that change how a run looks or whether it uses the cache, never the bytes it writes.
NOT_OUTPUT_SETTINGS = frozenset({"output", "force", "verbose", "quiet", "no_cache", "cache_size", "no_tls_verify",
                                 "authfile"})
# Build settings that say which image to boot (the manifest names it), how to test it, or what else to make in
# podman's storage: not what is made in the output directory.
IMAGE_AND_TEST_SETTINGS = frozenset({"image", "containerfile", "context", "tag", "build_args", "secrets", "pull",
                                     "test", "firmware", "memory", "cpus", "timeout", "containerdisk", "console_log"})


def command_line(config: Config, command: Command, skip: Collection[str] = ()) -> list[str]:
    """Options that give `command` the same settings as `config`: how the host hands its settings to the
    assemble stage inside the rootbuilder, without listing them a second time."""
    args: list[str] = []
    for setting in SETTINGS:
        value = getattr(config, setting.name)
        if command not in setting.commands or setting.name in skip or value == setting.default:
            continue
        flag = setting.flags[0]
        if setting.kind is bool:
            args.append(flag)
        elif setting.repeatable:
            args += [part for item in value for part in (flag, str(item))]
        else:
            args += [flag, str(value)]
    return args


def settings_from_command_line(args: Sequence[str], command: Command) -> dict[str, Any]:
    """The values that options in command_line()'s form give `command`: how `c2boot verify` reads the build options
    a manifest records."""
    by_flag = {flag: s for s in SETTINGS if command in s.commands for flag in s.flags}
    values: dict[str, Any] = {}
    rest = list(args)
    while rest:
        flag = rest.pop(0)
        setting = by_flag.get(flag)
        if setting is None or (setting.kind is not bool and not rest):
            raise C2BootError(f"{flag!r} is not an option of `c2boot {command}` with its value")
        if setting.kind is bool:
            values[setting.name] = True
            continue
        text = rest.pop(0)
        try:
            value = Path(text) if setting.kind is Path else setting.kind(text)
        except ValueError:
            raise C2BootError(f"{flag} {text!r} is not a whole number") from None  # int is the only other kind
        values[setting.name] = (*values.get(setting.name, ()), value) if setting.repeatable else value
    return values
