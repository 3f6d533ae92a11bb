"""The pipeline: `assemble` turns a rootfs into the outputs; `build` makes the images with podman and runs
`assemble` inside the rootbuilder container. Both return a BuildResult; failures raise C2BootError."""

import dataclasses
import re
import shutil
import tarfile
import time
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from container2boot import (
    accounts,
    bios,
    clouds,
    formats,
    lifecycle,
    reproducible,
    rootimage,
    rootpartition,
    selinux,
    supplied,
)
from container2boot.bootloader import BOOT_DIR, BootEntry, install_bootloader, installed_cmdline, live_cmdline
from container2boot.cache import Cache, output_key
from container2boot.cache import default_directory as cache_directory
from container2boot.config import IMAGE_AND_TEST_SETTINGS, NOT_OUTPUT_SETTINGS, Config, command_line
from container2boot.containerdisk import make_containerdisk
from container2boot.disk import INITRD_ALLOWANCE, build_disk, check_disk_size, disk_size_needed, estimate_esp
from container2boot.errors import C2BootError, KernelImageNeeded
from container2boot.initrd import InitrdJob, build_initrd, compress_with_zstd, loader_left_out, shell_loader
from container2boot.initrdcache import InitrdCache
from container2boot.initrdcache import recipe as initrd_recipe
from container2boot.layers import write_root_tar
from container2boot.log import StageTimer, logger
from container2boot.manifest import artifacts, build_manifest, read_manifest, sha256, write_manifest
from container2boot.output import MANIFEST, WORK_PREFIX, check_space, space_explained, staged_output
from container2boot.plan import ImageConfig, Plan, decide
from container2boot.registry import fetch_image, is_image_reference
from container2boot.reproducible import Reproducible
from container2boot.rootfs import Report, examine, examine_directory, kernel_config
from container2boot.run import run
from container2boot.tree import Tree

CLOUD_FORMATS = {"azure": "vhd", "openstack": "qcow2"}  # clouds whose file is a --format's

if TYPE_CHECKING:  # the boot test and podman run on the host only, not in the rootbuilder's assemble stage
    from container2boot.bootcheck import BootReport
    from container2boot.podman import MachineImage, Session


@dataclass(frozen=True)
class BuildResult:
    """Where the outputs are, and what the manifest says about them."""

    output: Path
    esp: Path
    disk: Path | None
    manifest_path: Path
    manifest: dict[str, Any]
    status: str = "ok"  # or "boot test failed"
    boot_test: "BootReport | None" = None  # with --test


def _result(out: Path) -> BuildResult:
    disk = out / "disk.img"
    return BuildResult(out, out / "esp", disk if disk.exists() else None, out / MANIFEST, read_manifest(out))


def unpack_rootfs_tar(tarball: Path, dest: Path) -> Path:
    """dracut needs a directory to chroot into; the root image is still packed from the tar itself."""
    dest.mkdir(parents=True)
    run(["tar", "--extract", "--file", tarball, "--directory", dest, "--numeric-owner",
         "--exclude=./dev/*", "--exclude=dev/*"])
    return dest


@dataclass(frozen=True)
class Sources:
    """The image's root and, when the plan supplies the kernel or the dracut, the kernel image's; each with the
    report read from it. `kernel_supplied`: the booted kernel is the kernel image's (not only its dracut)."""

    root: Path
    report: Report
    kernel_root: Path | None = None
    kernel_report: Report | None = None
    kernel_supplied: bool = False

    @property
    def kernel_tree(self) -> tuple[Path, Report]:
        """Where the booted kernel comes from: the image's own kernel stays the image's even when the kernel
        image's dracut makes its initrd."""
        if self.kernel_supplied and self.kernel_root is not None and self.kernel_report is not None:
            return self.kernel_root, self.kernel_report
        return self.root, self.report


def kernel_sources(kernel_root: Path | None, config: Config) -> tuple[Path, Report]:
    """The kernel image's tree, checked to supply what the layout needs: a kernel with its modules, and a dracut
    with the live (and network) modules."""
    if kernel_root is not None and not kernel_root.is_dir():
        raise C2BootError(f"--kernel-root {kernel_root} is not a directory: pass the kernel image's root filesystem "
                          "(e.g. mounted with --mount=type=image,source=KERNELIMAGE,target=/kernel)")
    if kernel_root is None:
        raise KernelImageNeeded("this image needs a supplied kernel: pass --kernel-root with a kernel image's root "
                                "filesystem (`c2boot build` mounts one), or use an image with its own kernel and "
                                "dracut")
    report = examine_directory(kernel_root)
    missing = [need for need in report.missing(config.layout, config.netboot) if need != "init"]
    if missing:
        problem = report.verdict(config.layout, config.netboot).partition(" has ")[2]
        raise C2BootError(f"the kernel image at {kernel_root} cannot supply the kernel: it has {problem}")
    return kernel_root, report


def assemble_into(rootfs: Path, staging: Path, config: Config, timer: StageTimer) -> None:
    """Write esp/, disk.img (with config.diskimage) and manifest.json for `rootfs` into `staging`."""
    if not rootfs.is_dir() and not (rootfs.is_file() and tarfile.is_tarfile(rootfs)):
        what = "not found" if not rootfs.exists() else "is neither a directory nor a tar"
        raise C2BootError(f"rootfs {rootfs} {what}: pass a directory or a tar of the image's filesystem "
                          "(e.g. from `podman export`)")
    # The work directory sits beside the staged outputs, not in /tmp: an unpacked rootfs may not fit a tmpfs, and
    # systemd-repart never copies files from under /tmp or /var/tmp (its denylist) into a partition.
    with lifecycle.temporary_directory(WORK_PREFIX, staging.parent) as scratch:
        root = rootfs
        if not rootfs.is_dir():
            with timer.stage("unpack", f"Unpacking {rootfs}"), space_explained(staging, None):
                root = unpack_rootfs_tar(rootfs, scratch / "rootfs")
        installed = config.layout == "installed"
        if installed:
            rootpartition.check_copyable(root, scratch)
        with timer.stage("inspect", f"Inspecting {rootfs}"):
            sources = Sources(root, examine_directory(root))
            image = ImageConfig.from_json(config.image_config) if config.image_config else ImageConfig()
            plan = decide(sources.report, image, config)
            if plan.supplies_kernel or plan.uses_supplied_dracut:
                kernel_root, kernel_report = kernel_sources(config.kernel_root, config)
                sources = dataclasses.replace(sources, kernel_root=kernel_root, kernel_report=kernel_report,
                                              kernel_supplied=plan.supplies_kernel)
                if plan.supplies_kernel:
                    assert kernel_report.kernel is not None
                    plan = plan.with_kernel_version(kernel_report.kernel.version)
            else:  # a kernel image offered in case the plan needed one (as `c2boot build` does) changes nothing
                config = config.replace(kernel_root=None)
            if not installed:  # the dracut that makes the live initrd must mount the root image
                rootimage.check_bootable(config.root_format, config.compression, sources.kernel_tree[0],
                                         plan.kernel_version, initrd_job(sources, plan, None, config).dracut_version)
        logger.info("    %s, %s", sources.report.name, plan.describe())
        if plan.selinux is not None:
            logger.info("    %s", plan.selinux.describe())
            for warning in plan.selinux.warnings(None if installed else config.root_format):
                logger.warning("    warning: %s", warning)
        for warning in cloud_warnings(sources.report, config):
            logger.warning("    warning: %s", warning)
        same = reproducibility(config)
        root_partition = rootpartition.prepare(root, config.rootfs_type, scratch, same) if installed else None
        if root_partition is not None:
            kernel_file = sources.kernel_tree[1].kernel_image_path
            check_disk_size(config.size_bytes,
                            disk_size_needed(estimate_esp(kernel_file.stat().st_size), root_partition))
        need = output_bytes(sources.report.size_bytes, config)
        check_space(staging, need)
        with space_explained(staging, need):
            make_outputs(rootfs, sources, plan, root_partition, staging, scratch, config, same, timer)


def reproducibility(config: Config) -> Reproducible:
    """The source date (SOURCE_DATE_EPOCH, else now: not reproducible) and the seed, decided once per build."""
    date = config.source.get("source_date_epoch")
    epoch = reproducible.source_date_epoch(date) if date else int(time.time())
    image = config.source.get("id") or config.source.get("digest") or config.source.get("image", "")
    return reproducible.decide(epoch, image, output_settings(config))


def initrd_job(sources: Sources, plan: Plan, root_partition: rootpartition.RootPartition | None,
               config: Config) -> InitrdJob:
    """Which dracut makes the initrd for which kernel: the image's own, or the kernel image's (for the image's
    kernel with the image's modules, or for the supplied kernel)."""
    own_dracut = not plan.uses_supplied_dracut or sources.kernel_root is None
    dracut_root, dracut_report = (sources.root, sources.report) if own_dracut else \
        (sources.kernel_root, sources.kernel_report)
    assert dracut_root is not None and dracut_report is not None
    image_modules = None
    if plan.kind == "own-kernel":
        image_modules = sources.report.tree.real_path(f"usr/lib/modules/{plan.kernel_version}")
    zstd = compress_with_zstd(dracut_report.tree, kernel_config(sources.kernel_tree[0], plan.kernel_version))
    return InitrdJob(dracut_root, dracut_report.dracut_modules, dracut_report.dracut_version, plan.kernel_version,
                     image_modules,
                     root_partition.fstype if root_partition else None, config.netboot, plan.init == "app", zstd,
                     shell_loader(dracut_report.tree))


def supply(sources: Sources, plan: Plan, scratch: Path, config: Config,
           same: Reproducible) -> supplied.Supplied | None:
    """What the build adds to the root (see supplied.py and accounts.py), or None when it adds nothing."""
    tree = scratch / "supplied"
    tree.mkdir()
    left_out: list[str] = []
    if plan.app is not None:
        name = config.hostname or hostname(config.source.get("image", ""), sources.report)
        supplied.add_app_runtime(tree, plan.app, name)
        supplied.add_os_release(tree, sources.report.tree, name)
        supplied.add_mount_points(tree, sources.report.tree)
    elif plan.kind == "userland":
        _, kernel_report = sources.kernel_tree
        supplied.add_modules(tree, kernel_report.tree.real_path(f"usr/lib/modules/{plan.kernel_version}"),
                             sources.report.tree)
    if plan.access is not None:
        left_out = accounts.add_access(sources.root, tree, plan.access, config)
    if plan.selinux is not None:
        left_out += selinux.add_files(tree, sources.report.tree, plan.selinux, live=config.layout == "live")
    if not any(tree.iterdir()) and not left_out:
        return None
    same.clamp_times(tree)
    return supplied.Supplied(tree, tuple(left_out))


def built_initrd(job: InitrdJob, dest: Path, scratch: Path, env: Mapping[str, str]) -> list[str]:
    """Build the initrd and return the paths it holds. One that lacks the loader of its own programs cannot boot
    and is never kept: dracut makes it again once, and a second such one is an error."""
    for attempt in ("first", "second"):
        listing = scratch / f"initrd-{attempt}.files"
        build_initrd(job, dest, scratch / f"initrd-{attempt}", env, listing)
        paths = [p for p in listing.read_text(errors="surrogateescape").split("\0") if p]
        loader = loader_left_out(job, paths) if paths else None
        if loader is None:
            return paths
        if attempt == "first":
            logger.warning("    warning: dracut left every shared library out of the initrd (no %s in it), so it "
                           "could not boot: making it again", loader)
    raise C2BootError(f"dracut twice made an initrd without the shared libraries its programs need (no {loader} in "
                      f"it): `c2boot build --verbose` shows what dracut said")


def make_initrd(job: InitrdJob, dest: Path, scratch: Path, env: Mapping[str, str], no_cache: bool) -> str:
    """Build the initrd, or copy the one made of the very same files (see initrdcache.py); "built" or "reused".
    With `no_cache` it is made again, and replaces the cached one."""
    initrds = InitrdCache(cache_directory())
    key = initrd_recipe(job, int(env["SOURCE_DATE_EPOCH"]))
    if not no_cache and initrds.restore(job, key, dest):
        logger.info("    the initrd is made of the same files as one made before: reused (--no-cache makes it again)")
        return "reused"
    paths = built_initrd(job, dest, scratch, env)
    if not paths:  # dracut kept its tree elsewhere: what the initrd is made of is unknown, so it is not kept
        logger.warning("    warning: dracut's staging tree was not found: the initrd is not kept in the cache")
        return "built"
    try:
        initrds.store(job, key, dest, paths)
    except OSError as e:
        logger.warning("    warning: the initrd could not be kept in the cache (%s)", e.strerror or e)
    return "built"


def boot_cmdline(plan: Plan, job: InitrdJob, root_partition: rootpartition.RootPartition | None,
                 config: Config) -> str:
    """The kernel arguments: the layout's root (as the initrd's dracut takes them), the app's init (quiet, so the
    console is the app's), SELinux's mode, the user's."""
    extra = config.cmdline
    if plan.init == "app":
        extra = f"init={supplied.INIT} quiet {extra}".strip()
    if plan.selinux is not None:
        extra = f"{plan.selinux.kernel_arguments()} {extra}".strip()
    if root_partition is None:
        return live_cmdline(extra, job.dracut_version, rootimage.FILES[config.root_format])
    return installed_cmdline(root_partition.partuuid, root_partition.fstype, extra)


def make_outputs(rootfs: Path, sources: Sources, plan: Plan, root_partition: rootpartition.RootPartition | None,
                 staging: Path, scratch: Path, config: Config, same: Reproducible, timer: StageTimer) -> None:
    """The slow part of assemble_into: initrd, root image, boot loaders, disk, formats, checksums, manifest."""
    installed = root_partition is not None
    report = sources.report
    boot_dir = staging / "esp" / BOOT_DIR
    boot_dir.mkdir(parents=True)
    job = initrd_job(sources, plan, root_partition, config)
    contexts = None  # the file_contexts the build labels the root from
    if plan.selinux is not None and plan.selinux.labels_root:
        contexts = selinux.copy_contexts(sources.report.tree, plan.selinux, scratch / "selinux")
    entry = BootEntry(
        title=f"{report.name} (container2boot {config.layout})",
        kernel=f"/{BOOT_DIR}/vmlinuz",
        initrd=f"/{BOOT_DIR}/initrd.img",
        cmdline=boot_cmdline(plan, job, root_partition, config),
    )
    _, kernel_report = sources.kernel_tree
    shutil.copyfile(kernel_report.kernel_image_path, boot_dir / "vmlinuz")
    if plan.access is not None:
        for line in plan.access.describe():
            logger.info("    %s", line)
    extra = supply(sources, plan, scratch, config, same)
    if root_partition is not None and extra is not None:
        root_partition = dataclasses.replace(root_partition, extra=extra.tree,
                                             replaced=(*root_partition.replaced, *extra.left_out))
    with ExitStack() as background:
        packed = None
        root_image = f"{config.root_format}, {config.compression}"
        if root_partition is None:  # packed while dracut runs: the two do not depend on each other
            logger.info("==> Packing the root image (%s) in the background", root_image)
            packer = rootimage.pack_command(config.root_format, boot_dir / rootimage.FILES[config.root_format],
                                            config.compression, same)
            packed = background.enter_context(rootimage.packing(
                rootfs, packer, extra.tree if extra else None,
                extra.left_out if extra else (), same.environment(),
                selinux.filter_command(contexts) if contexts else None))
        with timer.stage("initrd", f"Building the {config.layout}{' and network' if config.netboot else ''} "
                         f"initrd with {'the image' if job.dracut_root == sources.root else 'the kernel image'}'s "
                         f"dracut (kernel {plan.kernel_version}{'; zstd compresses it' if job.zstd else ''})"):
            # Dated by the kernel, not by the image: a changed image with the same kernel can reuse the initrd and
            # still get the very bytes a build without the cache would make.
            kernel_date = int(kernel_report.kernel_image_path.stat().st_mtime)
            initrd = make_initrd(job, boot_dir / "initrd.img", scratch, same.environment(kernel_date),
                                 config.no_cache)
        if packed is not None:
            with timer.stage("rootimage", f"Finishing the root image ({root_image})"):
                packing_seconds = packed()
            timer.seconds["rootimage"] = round(packing_seconds, 2)  # the packing itself, not the wait for it
    firmware = ["uefi", "bios"] if config.bios else ["uefi"]
    with timer.stage("bootloader", f"Installing the boot loaders ({' and '.join(firmware).upper()})"):
        loader_roots = [sources.root, *([Path("/")] if plan.supplies_kernel else [])]
        loaders = [install_bootloader(staging / "esp", entry, loader_roots, scratch)]
        if config.bios:
            loaders.append(bios.install_files(staging / "esp", entry))
    same.clamp_times(staging / "esp")  # what the build wrote: the FAT entries in disk.img take these times
    if config.diskimage:
        what = f"{config.table.upper()}" + (f", {config.rootfs_type} root partition" if installed else "")
        with timer.stage("disk", f"Assembling disk.img ({what}) with systemd-repart"):
            build_disk(staging / "esp", staging / "disk.img", scratch, same, table=config.table, root=root_partition,
                       size=config.size_bytes)
            if config.bios:
                bios.install_boot_code(staging / "disk.img", same.environment())
        if root_partition is not None and contexts is not None:
            with timer.stage("selinux", f"Labelling the {root_partition.fstype} root partition from the image's "
                             "SELinux policy"):
                selinux.label_root_partition(staging / "disk.img", root_partition.partuuid, contexts, scratch)
    disk_images = make_disk_formats(staging, config, timer) if config.diskimage else []
    with timer.stage("checksums", "Writing SHA256SUMS and manifest.json"):
        files = artifacts(staging)
        checksums = formats.write_checksums(staging, files)
        files.append({"path": checksums.name, "size": checksums.stat().st_size, "sha256": sha256(checksums)})
    supplied_kernel = None
    if sources.kernel_root is not None and sources.kernel_report is not None:  # its kernel, or its dracut only
        supplied_kernel = {"image": config.source.get("kernel_image", str(sources.kernel_root)),
                           "package": supplied.package_version(sources.kernel_root, plan.kernel_version),
                           "dracut": sources.kernel_report.dracut_version}
    manifest = build_manifest(report=report, plan=plan, supplied_kernel=supplied_kernel,
                              source={k: v for k, v in config.source.items() if k != "kernel_image"},
                              cmdline=entry.cmdline,
                              boot={"firmware": firmware, "bootloader": " + ".join(loaders),
                                    "partition_table": config.table if config.diskimage else None,
                                    "layout": config.layout, "root": root_description(config, root_partition),
                                    "netboot": config.netboot},
                              disk_images=disk_images, files=files, timings=timer.seconds, created=same.epoch)
    manifest["cache"] = {"initrd": initrd}
    write_manifest(staging, manifest)
    if plan.access is not None and plan.access.password:
        keep_private(staging)


def keep_private(staging: Path) -> None:
    """The root image and the disks carry the password's hash: readable by their owner only, against offline
    guessing by other users of the host."""
    logger.info("    the outputs hold the password's hash: they are readable by you only (mode 0600)")
    for path in staging.rglob("*"):
        if path.is_file() and not path.is_symlink():
            path.chmod(0o600)


def hostname(reference: str, report: Report) -> str:
    """The app's hostname: the image's name (docker.io/library/nginx:1 -> nginx), else its os-release ID."""
    name = reference.rpartition("/")[2].partition(":")[0].partition("@")[0]
    cleaned = re.sub(r"[^a-z0-9-]+", "-", (name or report.os_release.get("ID", "") or "app").lower()).strip("-")
    return cleaned[:63] or "app"


def cloud_warnings(report: Report, config: Config) -> list[str]:
    """What the image (or the settings) lack for the --cloud it is made for."""
    if config.cloud is None:
        return []
    warnings = clouds.cloud_warnings(report, config.cloud)
    title = clouds.CLOUDS[config.cloud].title
    if config.cloud_init is not None:
        warnings.append(f"--cloud-init embeds a NoCloud seed, which cloud-init may prefer to {title}'s own "
                        "metadata: leave it out for a cloud image")
    if config.cloud in ("gce", "azure", "openstack") and not config.bios:
        warnings.append(f"{title} starts many machine types with BIOS firmware: add --bios so that the disk boots "
                        "either way")
    return warnings


def output_bytes(image_bytes: int, config: Config) -> int:
    """About how much space the outputs take, for the space check before the slow steps: the root image (60-70 %
    of the files, compressed; EROFS needs the files' size again while it is packed) or the root partition's files,
    the kernel and initrd, disk.img holding the ESP again, and each converted or compressed copy of the disk at most
    its size again."""
    live = config.layout == "live"
    esp = (int(image_bytes * rootimage.RATIOS[config.root_format]) if live else 0) + INITRD_ALLOWANCE
    packing = esp + (int(image_bytes * rootimage.PACKING_BUFFER[config.root_format]) if live else 0)
    if not config.diskimage:
        return packing
    disk = esp + (image_bytes if config.layout == "installed" else 0)
    copies = len([f for f in dict.fromkeys(config.formats) if f != "raw"]) + (2 if config.cloud else 0)
    return max(packing, esp + disk * (1 + copies) * (2 if config.compress else 1))


def make_disk_formats(staging: Path, config: Config, timer: StageTimer) -> list[dict[str, str]]:
    """disk.img in the other --format's and --compress'ed copies; for the manifest, which file is which."""
    disks = [("raw", staging / "disk.img")]
    if config.formats:
        with timer.stage("formats", f"Converting disk.img to {', '.join(config.formats)} with qemu-img"):
            disks = formats.convert(staging / "disk.img", config.formats)
    images = [{"format": name, "path": path.name} for name, path in disks]
    if config.cloud:
        converted = dict(disks)  # Azure's file is --format vhd's, OpenStack's --format qcow2's: made once
        with timer.stage("cloud", f"Writing the disk as {clouds.CLOUDS[config.cloud].title} imports it"):
            cloud_file = converted.get(CLOUD_FORMATS.get(config.cloud, "")) or \
                formats.cloud_disk(staging / "disk.img", config.cloud)
        images.append({"format": f"{config.cloud} (cloud)", "path": cloud_file.name})
    if config.compress:
        with timer.stage("compress", f"Compressing {', '.join(p.name for _, p in disks)} ({config.compress})"):
            copies = formats.compress([p for _, p in disks], config.compress)
        images += [{"format": name, "compression": config.compress, "path": copy.name}
                   for (name, _), copy in zip(disks, copies, strict=True)]
    return images


def root_description(config: Config, root_partition: rootpartition.RootPartition | None) -> str:
    """For the manifest: where the booted system's root comes from."""
    if root_partition is None:
        image = rootimage.FILES[config.root_format]
        return f"{image} ({config.root_format}, {config.compression}) with a tmpfs overlay"
    return f"{root_partition.fstype} partition PARTUUID={root_partition.partuuid}, read-write"


def assemble(rootfs: str | Path, config: Config) -> BuildResult:
    """Make the outputs from a rootfs directory or tar, or an image a transport names (docker://, oci:,
    oci-archive:), with the tools on this host (or in the rootbuilder)."""
    timer = StageTimer()
    with staged_output(config.output, config.force) as staging:
        if isinstance(rootfs, str) and is_image_reference(rootfs):
            assemble_fetched(rootfs, staging, config, timer)
        else:
            assemble_into(Path(rootfs), staging, config, timer)
    return _result(config.output)


def assemble_fetched(reference: str, staging: Path, config: Config, timer: StageTimer) -> None:
    """Fetch the image, make its root one tar (the layers go once it is made) and assemble that, with the image's
    digest, creation date and run configuration in place of what `c2boot build` would pass from podman."""
    with lifecycle.temporary_directory(WORK_PREFIX, staging.parent) as download:
        with timer.stage("fetch", f"Fetching {reference}"), space_explained(staging, None):
            image = fetch_image(reference, download / "image", not config.no_tls_verify, config.authfile)
        with timer.stage("layers", f"Merging the {len(image.layers)} layers of {reference}"), \
                space_explained(staging, None):
            tar = write_root_tar(image.layers, download / "rootfs.tar")
            shutil.rmtree(download / "image")
        logger.info("    %s is %s", reference, image.digest)
        assemble_into(tar, staging, config.replace(source=image.source(config.source),
                                                   image_config=image.image_config.as_json()), timer)


def inspect_image(source: str) -> tuple[Report, ImageConfig]:
    """`c2boot inspect`: a rootfs directory, a tar of one (`podman export`), or a podman image reference (which
    also has an OCI configuration: ENTRYPOINT, CMD...)."""
    if not source.strip():
        raise C2BootError("inspect needs an image: a podman image reference, a rootfs directory or a tar of one")
    path = Path(source)
    if path.is_dir():
        return examine(Tree.from_directory(path)), ImageConfig()
    if path.exists() and not path.is_file():
        raise C2BootError(f"{source} is neither a directory nor a tar file: pass a rootfs directory or a tar, or an "
                          "image reference")
    if path.is_file():
        try:
            with path.open("rb") as stream:
                return examine(Tree.from_tar(stream)), ImageConfig()
        except tarfile.TarError as e:
            raise C2BootError(f"{source} is not a tar of a root filesystem ({e}): pass a directory, a tar "
                              "(e.g. from `podman export`) or an image reference") from None
    if source.startswith(("/", "./", "../")):
        raise C2BootError(f"{source} not found: pass an existing rootfs directory or tar, or an image reference")
    from container2boot import podman  # podman-py is only needed on the host side

    with podman.session() as session:
        return session.examine(source), session.image_config(source)


def build(config: Config) -> BuildResult:
    """Build (or take) the machine image with podman and assemble it in the rootbuilder container (with the
    kernel image mounted too when it is at hand or the image needs it), or copy the outputs of an identical
    earlier build from the cache; with --test, boot the result."""
    from container2boot import podman, vm  # host side only

    timer = StageTimer()
    if config.test:
        vm.check_console_log(config.console_log)  # before the build, not after it
    if not config.image:
        podman.build_inputs(config)  # a wrong --file, --context or --secret fails before anything starts
    outputs_cache = Cache(cache_directory(), config.cache_bytes)
    with staged_output(config.output, config.force) as staging, podman.session() as session:
        image = session.machine_image(config, timer)
        reused = False
        if not config.no_cache:
            with timer.stage("cache", "Looking for the same outputs in the cache"), cache_trouble(outputs_cache):
                reused = any(outputs_cache.restore(key, staging) for key in output_keys(session, config, image))
        if reused:
            logger.info("    the same image was built with the same settings before: its outputs are reused "
                        "(--no-cache makes them again)")
        else:
            key = assemble_in_rootbuilder(session, image, staging, config, timer)
        record_build(staging, session, config, timer, "reused" if reused else "built",
                     containerdisk_image(session, staging, config, timer))
        if not reused:
            with timer.stage("store", "Keeping a copy of the outputs in the cache"), \
                    cache_trouble(outputs_cache, storing=True):
                outputs_cache.store(key, staging, image.reference, " ".join(output_settings(config)))
    return finish(config)


@contextmanager
def cache_trouble(outputs_cache: Cache, storing: bool = False) -> Iterator[None]:
    """A cache that cannot be read or written (a read-only or full home) costs time, never the build. (A copy out
    of the cache that fails has written to the outputs: that one is the build's error.)"""
    try:
        yield
    except (OSError, C2BootError) as e:
        if isinstance(e, C2BootError) and not storing:
            raise
        logger.warning("    warning: the build cache in %s cannot be used (%s): going on without it",
                       outputs_cache.directory, e.strerror if isinstance(e, OSError) and e.strerror else e)


def assemble_in_rootbuilder(session: "Session", image: "MachineImage", staging: Path, config: Config,
                            timer: StageTimer) -> str:
    """Make the image's outputs in the rootbuilder container, which checks the image where it mounts it: its files
    are read once, by the root image's packer. Returns the key to keep them under in the cache."""
    image_config = session.image_config(image.image_id)
    plan = None
    # About the space the outputs need, for the message if the disk fills up: podman's size of the image also counts
    # files that later layers removed, so the check before the slow steps is the rootbuilder's, from the files.
    need = output_bytes(image.size_bytes, config)
    if session.image(session.rootbuilder_tag(config.base_image)) is None:
        plan, size = check_on_host(session, image, image_config, config, timer)
        need = output_bytes(size, config)
        check_space(staging, need)
    with space_explained(staging, need):
        with timer.stage("rootbuilder", "Preparing the rootbuilder image"):
            rootbuilder = session.rootbuilder_image(config.base_image, config.mirror)
        if plan is None:  # the rootbuilder decides: the kernel image is offered if it is here already
            kernel_image = session.kernel_image_at_hand(config)
        elif plan.supplies_kernel or plan.uses_supplied_dracut:
            kernel_image = prepared_kernel_image(session, config, timer)
        else:
            kernel_image = None
        config = config.replace(image_config=image_config.as_json())
        try:
            return assemble_with(session, rootbuilder, image, kernel_image, staging, config, timer)
        except KernelImageNeeded:  # only when none was offered
            logger.info("    %s needs the supplied kernel (or its dracut): preparing the kernel image, then "
                        "assembling again", image.reference)
            kernel_image = prepared_kernel_image(session, config, timer)
            return assemble_with(session, rootbuilder, image, kernel_image, staging, config, timer)


def check_on_host(session: "Session", image: "MachineImage", image_config: ImageConfig, config: Config,
                  timer: StageTimer) -> tuple[Plan, int]:
    """Before the rootbuilder's first build (minutes), the host checks the image itself, from podman's export of
    it, so that bad input fails at once; it returns the plan and the size of the image's files."""
    with timer.stage("check", f"Checking that {image.reference} can boot") as progress:
        report = session.examine(image.image_id, progress)
        plan = decide(report, image_config, config)
    logger.info("    %s, %s", report.name, plan.describe())
    return plan, report.size_bytes


def prepared_kernel_image(session: "Session", config: Config, timer: StageTimer) -> str:
    with timer.stage("kernelimage", "Preparing the kernel image"):
        return session.kernel_image(config)


def assemble_with(session: "Session", rootbuilder: str, image: "MachineImage", kernel_image: str | None,
                  staging: Path, config: Config, timer: StageTimer) -> str:
    """One run of the assemble container; the cache key of what it made, taken before it reads the files: with
    the kernel image's when the outputs use it (the manifest says), else without."""
    without, with_kernel = output_keys(session, config, image)
    with timer.stage("assemble", f"Assembling {image.reference} in the rootbuilder container") as progress:
        session.assemble(rootbuilder, image, staging, config, kernel_image, progress)
    return with_kernel if read_manifest(staging).get("supplied_kernel") else without


def output_settings(config: Config) -> list[str]:
    """The settings that decide the outputs' bytes, given the image: what the host hands to the assemble stage but
    those that only change how a run looks or whether it uses the cache. The seed and the cache key both take them."""
    return command_line(config, "assemble", skip=NOT_OUTPUT_SETTINGS)


def rebuild_options(config: Config) -> list[str]:
    """The `c2boot build` options that make the same outputs from the same image: those of the assemble stage and
    those that choose the rootbuilder and the supplied kernel; files by absolute path, to be found from anywhere."""
    return command_line(config.with_absolute_paths(), "build", skip=NOT_OUTPUT_SETTINGS | IMAGE_AND_TEST_SETTINGS)


def output_keys(session: "Session", config: Config, image: "MachineImage") -> tuple[str, str]:
    """The cache keys of this build's outputs, without and with the supplied kernel's image (the plan, made in the
    rootbuilder, tells which): by the image (its id and name), the rootbuilder, the settings, the source date and
    the files the settings name."""
    from container2boot.podman import container_inputs, kernel_tag  # host side only

    rootbuilder = session.image(session.rootbuilder_tag(config.base_image))
    kernel = session.image(kernel_tag(config))
    parts = {"image": image.reference, "image_id": image.image_id,
             "rootbuilder": rootbuilder.image_id if rootbuilder else None, "settings": output_settings(config),
             "source_date_epoch": image.source_date(config.source)}
    inputs = [host for host, _ in container_inputs(config)[0]]
    return output_key({**parts, "kernel": None}, inputs), \
        output_key({**parts, "kernel": kernel.image_id if kernel else None}, inputs)


def containerdisk_image(session: "Session", staging: Path, config: Config,
                        timer: StageTimer) -> dict[str, Any] | None:
    """With --containerdisk, the KubeVirt image made from the outputs' disk.qcow2: what the manifest says of it."""
    if config.containerdisk is None:
        return None
    with timer.stage("containerdisk", f"Making the containerDisk image {config.containerdisk}"):
        return make_containerdisk(session, staging, config.containerdisk)


def record_build(staging: Path, session: "Session", config: Config, timer: StageTimer, how: str,
                 containerdisk: dict[str, Any] | None) -> None:
    """The manifest says how to build the outputs again from the image it names (for `c2boot verify`: the options
    and the rootbuilder, which the cache key holds too), whether they were built or reused from the cache, the
    containerDisk image made from them (this run's only), and this run's stage times (with the assemble stage's own
    when it ran)."""
    manifest = read_manifest(staging)
    manifest.pop("containerdisk", None)  # a cached manifest may hold an earlier run's
    if containerdisk is not None:
        manifest["containerdisk"] = containerdisk
    rootbuilder = session.image(session.rootbuilder_tag(config.base_image))
    manifest["build"] = {"options": rebuild_options(config),
                         "rootbuilder": rootbuilder.image_id if rootbuilder else None}
    manifest["cache"] = {**manifest.get("cache", {}), "outputs": how} if how == "built" else {"outputs": how}
    assembled = {"assemble_stages": manifest["timings_seconds"]} if how == "built" else {}
    manifest["timings_seconds"] = {**timer.seconds, **assembled}
    write_manifest(staging, manifest)


def finish(config: Config) -> BuildResult:
    """The published outputs; with --test, booted."""
    from container2boot import bootcheck  # host side only

    result = _result(config.output)
    if not config.test:
        return result
    # The access settings are in the disk already: the test boots it as it is. The outputs stay either way.
    boot_report = bootcheck.test(config.output, config.replace(ssh_keys=(), hostname=None, cloud_init=None))
    return dataclasses.replace(result, boot_test=boot_report,
                               status="ok" if boot_report.ok else "boot test failed")
