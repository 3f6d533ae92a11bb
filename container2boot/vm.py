"""What `c2boot run` and `c2boot test` boot: an output directory (or a disk image in any --format) and the
settings become one qemu.VirtualMachine; a network boot also gets its HTTP server for as long as QEMU runs."""

import base64
import json
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from container2boot import access, lifecycle, netboot, seed
from container2boot.bootloader import BOOT_DIR
from container2boot.config import Config
from container2boot.errors import C2BootError
from container2boot.log import logger
from container2boot.output import MANIFEST
from container2boot.qemu import GUEST_HOST_ADDRESS, VirtualMachine, check_disk_image, smbios_size
from container2boot.templates import render

# The systemd that reads SMBIOS credentials, ssh.authorized_keys.root and tmpfiles.extra (in the initrd too), and the
# one that also takes system.hostname.
CREDENTIALS_SYSTEMD = 252
HOSTNAME_CREDENTIAL_SYSTEMD = 254
# systemd before 257 reads one page of the SMBIOS entry that holds every credential (measured on bookworm's 252: a
# credential that crosses byte 4096 is cut, "Failed to base64 decode credential ...: Broken pipe"; systemd's PR 33539).
WHOLE_SMBIOS_SYSTEMD = 257
SMBIOS_PAGE = 4096


@dataclass(frozen=True)
class Built:
    """A build's outputs: its directory, the disk to boot (if any) and its manifest (empty if none)."""

    out: Path
    disk: Path | None
    manifest: dict[str, Any]

    def what(self, boot: str) -> Path:
        """What a `boot` (disk, direct or network) starts from, for messages and reports."""
        return self.out if boot == "network" or self.disk is None else self.disk

    @property
    def cmdline(self) -> str:
        """The kernel arguments the build's boot loader passes (empty without a manifest)."""
        return str(self.manifest.get("kernel", {}).get("cmdline", ""))

    @property
    def image(self) -> dict[str, Any]:
        """What inspect found in the image (init, systemd_version, sshd, cloud_init); empty for older builds."""
        image: dict[str, Any] = self.manifest.get("image") or {}
        return image

    @property
    def systemd_version(self) -> int | None:
        """The version of the systemd the build boots; None for another init, or when it was not found."""
        version: int | None = self.image.get("systemd_version") if self.image.get("init") == "systemd" else None
        return version

    @property
    def init(self) -> str:
        """The booted init as messages name it: "systemd 252", "openrc"."""
        return f"systemd {self.systemd_version}" if self.systemd_version else str(self.image.get("init", "?"))

    @property
    def boot(self) -> dict[str, Any]:
        boot: dict[str, Any] = self.manifest.get("boot", {})
        return boot


def locate(target: Path) -> Built:
    """OUT (the output directory of `c2boot build`) or one of its disk images (disk.img, disk.qcow2, ...)."""
    if target.is_dir():
        out, disk = target, (target / "disk.img" if (target / "disk.img").is_file() else None)
    elif target.is_file():
        out, disk = target.parent, target
    elif target.exists():
        raise C2BootError(f"{target} is neither a directory nor a disk image file: pass the output directory of "
                          "`c2boot build` or one of its disk images")
    else:
        raise C2BootError(f"{target} not found: pass the output directory of `c2boot build` or a disk image")
    if disk is not None:
        check_disk_image(disk)
    try:
        manifest = json.loads((out / MANIFEST).read_text()) if (out / MANIFEST).is_file() else {}
    except (ValueError, UnicodeDecodeError) as e:
        raise C2BootError(f"{out / MANIFEST} is not valid JSON ({e}): rebuild the outputs") from None
    if not isinstance(manifest, dict):
        raise C2BootError(f"{out / MANIFEST} is not a container2boot manifest: rebuild the outputs")
    return Built(out, disk, manifest)


def check_firmware(built: Built, firmware: str) -> None:
    """Refuse a firmware the build cannot boot with, before a boot that would only time out."""
    loader = str(built.boot.get("bootloader", ""))
    if firmware == "bios" and built.boot.get("firmware") and "bios" not in built.boot["firmware"]:
        raise C2BootError(f"{built.out} was built without --bios, so SeaBIOS cannot boot it: rebuild with --bios, "
                          "or use --firmware uefi")
    if firmware == "secure-boot" and "unsigned" in loader:
        raise C2BootError(f"{built.out} boots with an unsigned GRUB, which Secure Boot refuses: add a signed shim "
                          "and GRUB to the image (Debian: shim-signed grub-efi-amd64-signed; Fedora: shim-x64 "
                          "grub2-efi-x64) and rebuild, or use --firmware uefi")


def _kernel_files(built: Built) -> tuple[Path, Path]:
    boot_dir = built.out / "esp" / BOOT_DIR
    kernel, initrd = boot_dir / "vmlinuz", boot_dir / "initrd.img"
    if not (kernel.is_file() and initrd.is_file()):
        raise C2BootError(f"{built.out} has no esp/{BOOT_DIR}/vmlinuz and initrd.img: pass the output directory "
                          "of `c2boot build`")
    return kernel, initrd


def boot_credentials(config: Config, root_keys: Sequence[str] = ()) -> dict[str, bytes]:
    """Access given at boot, the disk untouched: systemd credentials for root's SSH keys (--ssh-key's and
    `root_keys`; systemd 252+) and the hostname (254+).

    systemd's provision.conf writes `ssh.authorized_keys.root` only where root has no authorized_keys; a build (or
    an image) that gave root keys of its own would shut these out. So the keys also go to root's authorized_keys2,
    which sshd reads too unless its AuthorizedKeysFile says otherwise, through a tmpfiles.extra line."""
    credentials = {}
    if keys := [*(key for path in config.ssh_keys for key in access.read_public_keys(path)), *root_keys]:
        text = "\n".join(keys) + "\n"
        credentials["ssh.authorized_keys.root"] = text.encode()
        credentials["tmpfiles.extra"] = render("root-keys.tmpfiles.j2",
                                               keys_base64=base64.b64encode(text.encode()).decode()).encode()
    if config.hostname:
        credentials["system.hostname"] = config.hostname.encode()
    return credentials


def check_console_log(path: Path | None) -> None:
    """--console-log's directory must be there before a boot (or a build) that ends by writing to it: QEMU and libvirt
    do not create it."""
    if path is not None and not path.expanduser().absolute().parent.is_dir():
        raise C2BootError(f"--console-log {path}: its directory does not exist: create it, or name a file in an "
                          "existing directory")


def check_credentials_fit(credentials: Mapping[str, bytes], systemd_version: int | None) -> None:
    """Refuse credentials that an older systemd would read only in part, losing what comes after its first page."""
    size = smbios_size(credentials)
    if systemd_version is not None and systemd_version < WHOLE_SMBIOS_SYSTEMD and size > SMBIOS_PAGE:
        raise C2BootError(f"the credentials given at boot take {size} bytes, but systemd {systemd_version} reads only "
                          f"the first {SMBIOS_PAGE} (systemd {WHOLE_SMBIOS_SYSTEMD} reads them all): give fewer or "
                          "shorter --ssh-key files, or build the keys into the image (`c2boot build --ssh-key`)")


def boot_features_missing(built: Built, config: Config) -> list[str]:
    """Boot-time access the build's systemd cannot take (from the manifest's record of the image)."""
    if not built.image:
        return []
    version = built.systemd_version or 0
    missing = []
    if config.ssh_keys and version < CREDENTIALS_SYSTEMD:
        missing.append(f"--ssh-key at boot needs systemd {CREDENTIALS_SYSTEMD} or newer")
    if config.hostname and version < HOSTNAME_CREDENTIAL_SYSTEMD:
        missing.append(f"--hostname at boot needs systemd {HOSTNAME_CREDENTIAL_SYSTEMD} or newer (build with "
                       "--hostname instead)")
    if config.cloud_init and not built.image.get("cloud_init"):
        missing.append("--cloud-init needs cloud-init in the image")
    return missing


@contextmanager
def machine(target: Path, config: Config, root_keys: Sequence[str] = ()) -> Iterator[tuple[VirtualMachine, str,
                                                                                             Built]]:
    """The virtual machine for `target` and how it boots (disk, direct or network), with the access given at boot
    (credentials, with `root_keys` for root besides --ssh-key's; a cloud-init seed volume)."""
    built = locate(target)
    check_firmware(built, config.firmware)
    for missing in boot_features_missing(built, config):
        logger.warning("    warning: %s: %s has %s", missing, built.out, built.init)
    credentials = boot_credentials(config, root_keys)
    check_credentials_fit(credentials, built.systemd_version)
    user_data = seed.read_user_data(config.cloud_init) if config.cloud_init is not None else None
    with lifecycle.temporary_directory("c2boot-seed-") as tmp:
        seed_volume = None
        if user_data is not None:
            meta = seed.meta_data(seed.instance_id(user_data, config.hostname), config.hostname)
            seed_volume = seed.make_seed(user_data, meta, tmp / "seed.img")
        common: dict[str, Any] = {"firmware": config.firmware, "memory_mib": config.memory_mib, "cpus": config.cpus,
                                  "ssh_port": config.ssh_port, "ports": config.published_ports,
                                  "credentials": credentials, "seed": seed_volume}
        with _machine(built, config, common) as found:
            yield found


@contextmanager
def _machine(built: Built, config: Config, common: dict[str, Any]) -> Iterator[tuple[VirtualMachine, str, Built]]:
    if config.boot_from_network:
        kernel, initrd = _kernel_files(built)
        directory = netboot.boot_files(built.out, built.manifest)
        with netboot.serving(directory, "127.0.0.1", 0, quiet=True) as server:
            url = f"http://{GUEST_HOST_ADDRESS}:{server.server_port}/{netboot.root_image(directory, built.cmdline)}"
            logger.info("==> Serving %s/esp/%s on 127.0.0.1:%d for the guest", built.out, BOOT_DIR,
                        server.server_port)
            yield (VirtualMachine(None, kernel=kernel, initrd=initrd, append=netboot.netboot_cmdline(
                built.cmdline, url, config.append), **common), "network", built)
        return
    if built.disk is None:
        raise C2BootError(f"{built.out} has no disk.img: build with --diskimage, or boot over the network with "
                          "--netboot (a build with --netboot)")
    if config.direct:
        if not built.cmdline:
            raise C2BootError(f"{built.out} has no manifest.json with the kernel arguments: --direct needs the "
                              "output directory of `c2boot build`")
        kernel, initrd = _kernel_files(built)
        append = f"{built.cmdline} {config.append}".strip()
        yield VirtualMachine(built.disk, kernel=kernel, initrd=initrd, append=append, **common), "direct", built
        return
    yield VirtualMachine(built.disk, **common), "disk", built
