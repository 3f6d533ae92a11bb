"""The pipeline: `assemble` turns a rootfs into the outputs; `build` makes the images with podman and runs
`assemble` inside the rootbuilder container. Both return a BuildResult; failures raise C2BootError."""

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from container2boot import bios
from container2boot.bootloader import BOOT_DIR, BootEntry, install_bootloader, live_cmdline
from container2boot.config import Config
from container2boot.disk import build_disk
from container2boot.errors import C2BootError
from container2boot.initrd import build_initrd
from container2boot.log import StageTimer, logger
from container2boot.manifest import build_manifest, read_manifest, write_manifest
from container2boot.output import MANIFEST, staged_output
from container2boot.rootfs import inspect
from container2boot.rootimage import build_root_image
from container2boot.run import run


@dataclass(frozen=True)
class BuildResult:
    """Where the outputs are, and what the manifest says about them."""

    output: Path
    esp: Path
    disk: Path | None
    manifest_path: Path
    manifest: dict[str, Any]
    status: str = "ok"


def _result(out: Path) -> BuildResult:
    disk = out / "disk.img"
    return BuildResult(out, out / "esp", disk if disk.exists() else None, out / MANIFEST, read_manifest(out))


def unpack_rootfs_tar(tarball: Path, dest: Path) -> Path:
    """dracut needs a directory to chroot into; the root image is still packed from the tar itself."""
    dest.mkdir(parents=True)
    run(["tar", "--extract", "--file", tarball, "--directory", dest, "--numeric-owner",
         "--exclude=./dev/*", "--exclude=dev/*"])
    return dest


def assemble_into(rootfs: Path, staging: Path, config: Config, timer: StageTimer) -> None:
    """Write esp/, disk.img (with config.diskimage) and manifest.json for `rootfs` into `staging`."""
    if not rootfs.exists():
        raise C2BootError(f"rootfs {rootfs} not found: pass a directory or a tar of the image's filesystem "
                          "(e.g. from `podman export`)")
    with tempfile.TemporaryDirectory(prefix="c2boot-") as tmp:
        scratch = Path(tmp)
        root = rootfs
        if not rootfs.is_dir():
            with timer.stage("unpack", f"Unpacking {rootfs}"):
                root = unpack_rootfs_tar(rootfs, scratch / "rootfs")
        with timer.stage("inspect", f"Inspecting {rootfs}"):
            info = inspect(root)
        logger.info("    %s, kernel %s", info.pretty_name, info.kernel.version)
        boot_dir = staging / "esp" / BOOT_DIR
        boot_dir.mkdir(parents=True)
        entry = BootEntry(
            title=f"{info.pretty_name} (container2boot live)",
            kernel=f"/{BOOT_DIR}/vmlinuz",
            initrd=f"/{BOOT_DIR}/initrd.img",
            cmdline=live_cmdline(config.cmdline),
        )
        shutil.copyfile(info.kernel.image, boot_dir / "vmlinuz")
        with timer.stage("initrd", f"Building the initrd with the image's dracut (kernel {info.kernel.version})"):
            build_initrd(info, boot_dir / "initrd.img", scratch / "initrd")
        with timer.stage("rootimage", f"Packing the root image (squashfs, {config.compression})"):
            build_root_image(rootfs, boot_dir / "squashfs.img", config.compression)
        firmware = ["uefi", "bios"] if config.bios else ["uefi"]
        with timer.stage("bootloader", f"Installing the boot loaders ({' and '.join(firmware).upper()})"):
            loaders = [install_bootloader(staging / "esp", entry, root, scratch)]
            if config.bios:
                loaders.append(bios.install_files(staging / "esp", entry))
        if config.diskimage:
            with timer.stage("disk", f"Assembling disk.img ({config.table.upper()}) with systemd-repart"):
                build_disk(staging / "esp", staging / "disk.img", scratch, config.table)
                if config.bios:
                    bios.install_boot_code(staging / "disk.img")
        manifest = build_manifest(staging, info=info, source=dict(config.source), cmdline=entry.cmdline,
                                  boot={"firmware": firmware, "bootloader": " + ".join(loaders),
                                        "partition_table": config.table if config.diskimage else None,
                                        "root_image": f"squashfs ({config.compression})"},
                                  timings=timer.seconds)
        write_manifest(staging, manifest)


def assemble(rootfs: Path, config: Config) -> BuildResult:
    """Make the outputs from a rootfs directory or tar, with the tools on this host (or in the rootbuilder)."""
    timer = StageTimer()
    with staged_output(config.output, config.force) as staging:
        assemble_into(rootfs, staging, config, timer)
    return _result(config.output)


def build(config: Config) -> BuildResult:
    """Build (or take) the machine image with podman and assemble it in the rootbuilder container."""
    from container2boot import podman  # podman-py is only needed on the host side

    timer = StageTimer()
    with podman.session() as session, staged_output(config.output, config.force) as staging:
        image = session.machine_image(config, timer)
        with timer.stage("rootbuilder", "Preparing the rootbuilder image"):
            rootbuilder = session.rootbuilder_image(config.base_image, config.mirror)
        with timer.stage("assemble", f"Assembling {image.reference} in the rootbuilder container"):
            session.assemble(rootbuilder, image, staging, config)
        manifest = read_manifest(staging)
        manifest["timings_seconds"] = {**timer.seconds, "assemble_stages": manifest["timings_seconds"]}
        write_manifest(staging, manifest)
    return _result(config.output)
