"""The `c2boot` command: a thin layer that turns options (generated from config.SETTINGS) into a Config and
hands it to the pipeline. Errors become one line on stderr and a non-zero exit."""

import dataclasses
import inspect
import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import typer
from typer.core import TyperCommand, TyperGroup, TyperOption

from container2boot import __version__, lifecycle
from container2boot.config import SETTINGS, Command, Config, Setting, load_config_file, make_config
from container2boot.errors import ERROR_PREFIX, C2BootError
from container2boot.log import DONE_PREFIX, logger, setup_logging
from container2boot.rootfs import Report

if TYPE_CHECKING:
    from container2boot.pipeline import BuildResult
    from container2boot.plan import Plan


class _FlagsTakeNoValue:
    """Flags typer makes itself (--help, --install-completion...) get no `<bool>` beside them in --help, as
    ours have none: typer 0.29 shows the type of every option without a metavar."""

    def get_params(self, ctx: Any) -> list[Any]:
        params: list[Any] = super().get_params(ctx)  # type: ignore[misc]
        for param in params:
            if isinstance(param, TyperOption) and param.is_flag and param.metavar is None:
                param.metavar = ""
        return params


class Group(_FlagsTakeNoValue, TyperGroup):
    pass


class CommandWithFlags(_FlagsTakeNoValue, TyperCommand):
    pass


app = typer.Typer(
    cls=Group,
    help="Turn a container image into a bootable disk image, as a normal user: no sudo, no loop devices, "
    "no mounts.",
    no_args_is_help=True,
    add_completion=True,  # --install-completion and --show-completion for bash, zsh, fish, PowerShell
    pretty_exceptions_enable=False,
)

EXIT_ERROR = 1


def _annotation(kind: type, repeatable: bool) -> Any:
    if repeatable:
        return Optional[list[kind]]  # type: ignore[valid-type]  # noqa: UP045 (typer needs typing.Optional)
    return Optional[kind]  # noqa: UP045


def _metavar(setting: Setting) -> str | None:
    """Flags take no value; choices show as a|b; otherwise the table's metavar (typer falls back to the type)."""
    if setting.kind is bool:
        return ""
    return "|".join(setting.choices) if setting.choices else setting.metavar


def with_settings(command: Command) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Give a command one option per setting of the table that applies to it, plus --config; the wrapped
    function receives the merged Config as `config`."""

    def decorate(func: Callable[..., None]) -> Callable[..., None]:
        own = inspect.signature(func)
        params = [p for p in own.parameters.values() if p.name != "config"]
        annotations = {p.name: func.__annotations__[p.name] for p in params}
        for setting in (s for s in SETTINGS if command in s.commands):
            default_note = "" if setting.default in (None, False, (), "") else f" (default: {setting.default})"
            option = typer.Option(
                None, *setting.flags, help=setting.help + default_note, show_default=False,
                metavar=_metavar(setting), rich_help_panel=setting.panel,
            )
            annotation = _annotation(setting.kind, setting.repeatable)
            params.append(inspect.Parameter(setting.name, inspect.Parameter.KEYWORD_ONLY, default=option,
                                            annotation=annotation))
            annotations[setting.name] = annotation
        config_option = typer.Option(None, "--config", help="TOML file with settings, keyed by long option "
                                     "name (e.g. base-image = \"...\"). Options given on the command line win.",
                                     metavar="FILE", rich_help_panel="Output")
        params.append(inspect.Parameter("config_file", inspect.Parameter.KEYWORD_ONLY, default=config_option,
                                        annotation=Optional[Path]))  # noqa: UP045
        annotations["config_file"] = Optional[Path]  # noqa: UP045

        def wrapper(**kwargs: Any) -> None:
            config_file = kwargs.pop("config_file")
            values = {s.name: kwargs.pop(s.name) for s in SETTINGS if command in s.commands}
            setup_logging(bool(values.get("verbose")), bool(values.get("quiet")))
            with reported_errors(command):
                file_values = load_config_file(config_file, command) if config_file else {}
                config = make_config(values, file_values, source=_source_from_environment(),
                                     image_config=os.environ.get("C2BOOT_IMAGE_CONFIG", ""))
                func(config=config, **kwargs)

        wrapper.__signature__ = own.replace(parameters=params)  # type: ignore[attr-defined]
        wrapper.__annotations__ = annotations
        wrapper.__doc__ = func.__doc__
        wrapper.__name__ = func.__name__
        return wrapper

    return decorate


@contextmanager
def reported_errors(command: str) -> Iterator[None]:
    """One command's run: what killed runs left is removed first; an error becomes one line and exit 1 (3: the
    rootfs needs a kernel image, see errors.KernelImageNeeded); Ctrl-C, SIGTERM and SIGHUP stop it with everything
    it started removed, and exit 128 + the signal's number."""
    try:
        with lifecycle.command(command):
            yield
    except C2BootError as e:
        logger.error("%s%s", ERROR_PREFIX, e)
        raise typer.Exit(e.exit_code) from None
    except OSError as e:  # the environment refused something no check foresaw (a name too long, /proc...)
        where = f": {e.filename}" if e.filename else ""
        logger.error("%s%s%s", ERROR_PREFIX, e.strerror or e, where)
        raise typer.Exit(EXIT_ERROR) from None
    except KeyboardInterrupt as e:
        stop = e if isinstance(e, lifecycle.Interrupted) else lifecycle.Interrupted(signal.SIGINT)
        logger.error("c2boot: interrupted by %s; what it had started was stopped and removed, and nothing was "
                     "written", signal.Signals(stop.signum).name)
        lifecycle.ignore_stop_signals()
        raise typer.Exit(stop.exit_code) from None


def _source_from_environment() -> dict[str, str]:
    """The host tells the rootbuilder which image it mounted, for the manifest, and the source date for
    reproducible outputs (the reproducible-builds variable, which users may set for any command)."""
    keys = {"C2BOOT_SOURCE_IMAGE": "image", "C2BOOT_SOURCE_DIGEST": "digest", "C2BOOT_SOURCE_ID": "id",
            "C2BOOT_KERNEL_IMAGE": "kernel_image", "SOURCE_DATE_EPOCH": "source_date_epoch"}
    return {name: os.environ[key] for key, name in keys.items() if os.environ.get(key)}


def _report(result_output: Path, diskimage: bool) -> None:
    logger.info("%s%s/esp/%s", DONE_PREFIX, result_output, " and disk.img" if diskimage else "")


@app.command(cls=CommandWithFlags)
@with_settings("build")
def build(
    build_context: Optional[Path] = typer.Argument(  # noqa: UP045 (typer needs typing.Optional)
        None, help="Build context, as for podman build: its Containerfile (or --file) is built.", show_default=False,
        metavar="CONTEXT"),
    json_output: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout (progress stays on "
                                     "stderr).", metavar=""),
    *,
    config: Config,
) -> None:
    """Build a machine image with podman and make it bootable (outputs in --output).

    \b
    c2boot build --diskimage                                # the bundled example machine
    c2boot build -t localhost/my/machine --diskimage .      # ./Containerfile, like podman build
    c2boot build -f Containerfile --secret id=chpass,src=./creds --diskimage
    c2boot build --image localhost/my/machine:latest --diskimage
    c2boot build --format qcow2 --format vmdk --compress zst --test   # VM formats, boot-tested
    """
    from container2boot.pipeline import build as run_build

    if build_context is not None:
        if config.context is not None and config.context != build_context:
            raise C2BootError(f"two build contexts: {build_context} and --context {config.context}: give one")
        config = config.replace(context=build_context)
    result = run_build(config)
    _report(result.output, result.disk is not None)
    logger.info("%s", build_summary(result.manifest, result.output))
    if json_output:
        print(json.dumps(build_result_json(result), indent=2))
    elif result.boot_test is not None:
        print(result.boot_test.summary())
    if result.boot_test is not None and not result.boot_test.ok:
        raise typer.Exit(EXIT_ERROR)


def build_summary(manifest: dict[str, Any], output: Path) -> str:
    """What the build did, in a few lines: each stage's time, what was reused, each output's size."""
    timings = manifest.get("timings_seconds", {})
    inner = timings.get("assemble_stages", {})
    cache = manifest.get("cache", {})
    stages = ", ".join(f"{name} {seconds:.1f} s" + (f" ({cache[name]})" if name in cache else "")
                       for name, seconds in {**timings, **inner}.items() if not isinstance(seconds, dict))
    sizes = ", ".join(f"{a['path']} {a['size'] / 2**20:.0f} MiB" for a in manifest.get("artifacts", [])
                      if a["path"].count("/") <= 2 and a["size"] >= 2**20)
    how = "copied from the cache" if cache.get("outputs") == "reused" else "built"
    return f"    stages: {stages}\n    outputs ({how}) in {output}: {sizes}"


def build_result_json(result: "BuildResult") -> dict[str, Any]:
    """`c2boot build --json`: where the outputs are, how they came about, and the boot test's verdict."""
    return {"status": result.status, "output": str(result.output.absolute()), "esp": str(result.esp.absolute()),
            "disk": str(result.disk.absolute()) if result.disk else None,
            "manifest": str(result.manifest_path.absolute()), "cache": result.manifest.get("cache"),
            "source": result.manifest.get("source"), "image_kind": result.manifest.get("image_kind"),
            "artifacts": result.manifest.get("artifacts"), "timings_seconds": result.manifest.get("timings_seconds"),
            "boot_test": result.boot_test.as_json() if result.boot_test else None}


@app.command(cls=CommandWithFlags)
@with_settings("verify")
def verify(
    out: Path = typer.Argument(..., help="The output directory of `c2boot build` to check.", show_default=False,
                               metavar="OUT"),
    *,
    config: Config,
) -> None:
    """Build OUT again from the same image with the options its manifest records (no cache, the same source date)
    and compare every file by sha256, and the manifests but for timings. Exit 0 only when all are identical.
    The image must be here under the recorded name with the recorded id.

    \b
    c2boot verify out
    c2boot verify out -o rebuilt      # keep the rebuild to compare yourself (e.g. with diffoscope)
    """
    from container2boot.verify import verify as run_verify

    verdict = run_verify(out, config)
    for line in verdict.details():
        logger.warning("%s", line)
    if not verdict.ok:
        differ = len(verdict.different) + len(verdict.only_published) + len(verdict.only_rebuilt)
        manifest = " and manifest.json" if verdict.manifest else ""
        raise C2BootError(f"{out} is not what its image and options make: {differ} file(s){manifest} differ from "
                          "the rebuild (listed above); keep it with --output to compare")
    logger.info("c2boot: %s is reproducible: its %d files and manifest.json are identical to a rebuild's", out,
                verdict.files)


@app.command(cls=CommandWithFlags)
@with_settings("assemble")
def assemble(
    rootfs: str = typer.Argument(..., help="The machine's root filesystem: a directory, a tar (e.g. from `podman "
                                 "export`), or an image: docker://REGISTRY/NAME:TAG, oci:DIR[:REF], "
                                 "oci-archive:FILE[:REF].", show_default=False, metavar="ROOTFS"),
    *,
    config: Config,
) -> None:
    """Make the outputs from a rootfs with the tools on this system (the stage that runs in the rootbuilder).

    \b
    c2boot assemble ./rootfs.tar -o out --diskimage
    c2boot assemble docker://registry.example.org/vms/web:1 -o out --diskimage   # a pod or CI job, no podman
    podman run --rm --mount=type=image,source=IMG,target=/rootfs -v ./out:/out:rw,Z ROOTBUILDER --diskimage
    """
    from container2boot.pipeline import assemble as run_assemble

    result = run_assemble(rootfs, config)
    _report(result.output, result.disk is not None)


@app.command("inspect", cls=CommandWithFlags)
@with_settings("inspect")
def inspect_command(
    image: str = typer.Argument(..., help="A podman image reference, a rootfs directory, or a tar of one.",
                                show_default=False, metavar="IMAGE"),
    json_output: bool = typer.Option(False, "--json", help="Print the report as JSON.", metavar=""),
    *,
    config: Config,
) -> None:
    """Say whether an image can boot, and what to add if not, without building anything (exit 1: it cannot).

    \b
    c2boot inspect localhost/container2boot/machine:latest
    c2boot inspect docker.io/library/debian:trixie --json
    c2boot inspect ./rootfs.tar --layout installed
    """
    from container2boot.pipeline import inspect_image
    from container2boot.plan import decide

    report, image_config = inspect_image(image)
    try:
        plan: Plan | None = decide(report, image_config, config)
        verdict = plan.describe() if plan else ""
    except C2BootError as e:
        plan, verdict = None, str(e)
    if json_output:
        data = report.as_json(config.layout)
        data.update(kind=plan.kind if plan else None, plan=plan.as_json() if plan else None,
                    bootable=plan is not None, verdict=verdict)
        print(json.dumps(data, indent=2))
    else:
        print(format_report(report, config.layout, plan, verdict))
    if plan is None:
        raise typer.Exit(EXIT_ERROR)


TARGET_HELP = "The output directory of `c2boot build`, or one of its disk images (disk.img, disk.qcow2, ...)."


@app.command("run", cls=CommandWithFlags)
@with_settings("run")
def run_command(
    target: Path = typer.Argument(..., help=TARGET_HELP, show_default=False, metavar="OUT"),
    *,
    config: Config,
) -> None:
    """Boot a build in QEMU with its serial console in this terminal (Ctrl-A X quits). The image is never
    written: the guest's changes go to a temporary overlay.

    \b
    c2boot run out
    c2boot run out --firmware bios --memory 4G --cpus 4 --ssh-port 2222
    c2boot run out --direct --append systemd.unit=rescue.target
    c2boot run out --netboot                     # a build with --netboot, root over HTTP
    """
    from container2boot import bootcheck, qemu, vm

    with vm.machine(target, config) as (machine, boot, built), lifecycle.temporary_directory("c2boot-run-") as tmp:
        qemu.accelerator()  # says so when it falls back to software emulation
        logger.info("==> Booting %s (%s, %s firmware, %d MiB, %d CPUs); Ctrl-A X quits QEMU",
                    built.what(boot), boot, config.firmware, config.memory_mib, config.cpus)
        if config.ssh_port:
            logger.info("    ssh -p %d USER@127.0.0.1 reaches the guest's ssh server", config.ssh_port)
        for host, guest in config.published_ports:
            logger.info("    127.0.0.1:%d reaches the guest's port %d", host, guest)
        report_port = tmp / "report.log"  # where an application image's init says how the app ended
        report_port.touch()
        code = qemu.run_interactive(dataclasses.replace(machine, reboot=True,
                                                        serial=["mon:stdio", f"file:{report_port}"]))
        app_status = bootcheck.app_exit_status(report_port.read_text(errors="replace"))
    if code != 0:
        raise C2BootError(f"QEMU exited with status {code} (its own message is above)")
    if app_status is not None:
        logger.info("c2boot: the app exited with status %d", app_status)
        raise typer.Exit(app_status)


@app.command("test", cls=CommandWithFlags)
@with_settings("test")
def test_command(
    target: Path = typer.Argument(..., help=TARGET_HELP, show_default=False, metavar="OUT"),
    json_output: bool = typer.Option(False, "--json", help="Print the report as JSON.", metavar=""),
    *,
    config: Config,
) -> None:
    """Boot a build headless and let the booted system say whether it came up: default target reached, failed
    units, time spent in firmware, kernel, initrd and userspace. Exit 0 only when it came up. Works for any image
    with systemd 256 or newer; the image is not changed.

    \b
    c2boot test out
    c2boot test out/disk.qcow2 --firmware secure-boot --json --timeout 600
    """
    from container2boot import bootcheck

    report = bootcheck.test(target, config)
    print(json.dumps(report.as_json(), indent=2) if json_output else report.summary())
    if not report.ok:
        raise typer.Exit(EXIT_ERROR)


@app.command("ssh", cls=CommandWithFlags)
@with_settings("ssh")
def ssh_command(
    target: Path = typer.Argument(..., help=TARGET_HELP, show_default=False, metavar="OUT"),
    command: Optional[list[str]] = typer.Argument(None, help="A command to run instead of a shell (after --).",  # noqa: UP045
                                                  show_default=False, metavar="[-- COMMAND...]"),
    *,
    config: Config,
) -> None:
    """Boot a build headless and log in over SSH: a throw-away key is given to root at boot (a systemd credential,
    systemd 252+), a free port on 127.0.0.1 is forwarded to the guest's sshd; the VM stops and the key is deleted
    when you leave. With a command, exit with its status. The image is never written.

    \b
    c2boot ssh out                                   # a root shell in the booted system
    c2boot ssh out -- systemctl is-system-running    # one command; its exit status is c2boot's
    c2boot ssh out --login alice --identity ~/.ssh/id_ed25519 -- id   # a user the build let in (--user, --ssh-key)
    c2boot ssh out --cloud-init user-data.yaml --hostname web1
    """
    from container2boot.ssh import ssh

    status = ssh(target, config, command or [])
    if status != 0:
        raise typer.Exit(status)


@app.command("libvirt", cls=CommandWithFlags)
@with_settings("libvirt")
def libvirt_command(
    target: Path = typer.Argument(..., help=TARGET_HELP, show_default=False, metavar="OUT"),
    *,
    config: Config,
) -> None:
    """Hand a build to libvirt: print its domain XML (UEFI, Secure Boot or BIOS firmware chosen by libvirt from
    the installed OVMF; virtio disk and user-mode network; serial console), or the equivalent virt-install line,
    or define it in your own qemu:///session (no root). The domain boots the disk in place: the guest writes to it.

    \b
    c2boot libvirt out > web1.xml                # the XML, for virsh define
    c2boot libvirt out --define --name web1      # and says how to start it
    c2boot libvirt out --define --console-log ~/web1-console.log
    c2boot libvirt out/disk.qcow2 --firmware secure-boot --virt-install
    """
    from container2boot import libvirt

    domain = libvirt.domain(target, config)
    if config.define:
        libvirt.define(domain)
        print(libvirt.next_steps(domain))
    elif config.virt_install:
        print(libvirt.virt_install_line(domain))
    else:
        print(libvirt.domain_xml(domain), end="")


@app.command(cls=CommandWithFlags)
@with_settings("serve")
def serve(
    target: Path = typer.Argument(..., help="The output directory of a `c2boot build --netboot`.",
                                  show_default=False, metavar="OUT"),
    *,
    config: Config,
) -> None:
    """Serve a --netboot build's root image (and kernel and initrd) over HTTP until Ctrl-C, and print the kernel
    arguments and a QEMU command that boot from it.

    \b
    c2boot serve out                        # for virtual machines on this host
    c2boot serve out --address 0.0.0.0 --port 8080   # for machines on the local network (PXE/iPXE)
    """
    from container2boot import netboot, vm
    from container2boot.qemu import GUEST_HOST_ADDRESS

    built = vm.locate(target)
    directory = netboot.boot_files(built.out, built.manifest)
    with netboot.serving(directory, config.address, config.port) as server:
        port = server.server_port
        root_image = netboot.root_image(directory, built.cmdline)
        print(f"Serving {directory} on http://{config.address}:{port}/ (Ctrl-C stops)\n")
        if config.address not in ("127.0.0.1", "localhost"):
            url = f"http://{netboot.lan_address() if config.address == '0.0.0.0' else config.address}:{port}"
            lan_args = netboot.netboot_cmdline(built.cmdline, f"{url}/{root_image}")
            print(f"Kernel arguments for a machine on the network:\n  {lan_args}\n\n"
                  f"iPXE script:\n  #!ipxe\n  kernel {url}/vmlinuz {lan_args}\n  initrd {url}/initrd.img\n  boot\n")
        guest_args = netboot.netboot_cmdline(built.cmdline, f"http://{GUEST_HOST_ADDRESS}:{port}/{root_image}")
        print(f"Kernel arguments for a QEMU guest on this host (user network):\n  {guest_args}\n\n"
              "QEMU command:\n"
              f"  qemu-system-x86_64 -machine q35 -m 2048 -nographic -nic user,model=virtio-net-pci "
              f"-kernel {directory / 'vmlinuz'} -initrd {directory / 'initrd.img'} -append '{guest_args}'\n",
              flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            logger.info("c2boot: stopped serving")


@app.command("rootbuilder", cls=CommandWithFlags)
@with_settings("rootbuilder")
def rootbuilder(*, config: Config) -> None:
    """Build the rootbuilder (the toolbox image with this container2boot inside, in which `build` assembles) for
    CI runners and clusters: --tag names it, --push pushes that name. Prints the name to pull.

    \b
    c2boot rootbuilder
    c2boot rootbuilder --tag registry.example.org/c2boot/rootbuilder:VERSION --push
    """
    from container2boot import podman

    with podman.session() as session:
        name = session.rootbuilder_image(config.base_image, config.mirror)
        if config.publish_tag is not None:
            name = session.publish(name, config.publish_tag, config.push, not config.no_tls_verify)
    logger.info("%sthe rootbuilder of container2boot %s", DONE_PREFIX, __version__)
    print(name)


esp_app = typer.Typer(cls=Group, help="Put the ESP tree on a USB stick for bare metal.", no_args_is_help=True)
app.add_typer(esp_app, name="esp")


@esp_app.command("sync", cls=CommandWithFlags)
@with_settings("sync")
def esp_sync(
    target_out: Path = typer.Argument(..., help="The output directory of `c2boot build` (its esp/ is copied).",
                                      show_default=False, metavar="OUT"),
    destination: Path = typer.Argument(..., help="The USB stick's mounted FAT partition (e.g. /media/$USER/C2BOOT), "
                                       "or an unmounted FAT image file or partition device you can write.",
                                       show_default=False, metavar="TARGET"),
    *,
    config: Config,
) -> None:
    """Copy the ESP tree onto a FAT filesystem like rsync: new and changed files only, with progress. Refuses
    anything but FAT, and this host's own ESP; warns when the filesystem is not labelled C2BOOT.

    \b
    c2boot esp sync out /media/$USER/C2BOOT --dry-run
    c2boot esp sync out /media/$USER/C2BOOT --delete
    c2boot esp sync out stick.img                 # a FAT image file, written with mtools
    """
    from container2boot.espsync import sync

    sync(target_out, destination, dry_run=config.dry_run, delete=config.delete)


cache_app = typer.Typer(cls=Group, help="The build cache: outputs of earlier builds, reused when the same image is "
                        "built with the same settings.", no_args_is_help=True)
app.add_typer(cache_app, name="cache")


@cache_app.command("list", cls=CommandWithFlags)
@with_settings("cache")
def cache_list(*, config: Config) -> None:
    """What the cache holds, most recently used first: size, last use, image and settings.

    \b
    c2boot cache list
    """
    from container2boot.cache import Cache, default_directory

    outputs_cache = Cache(default_directory(), config.cache_bytes)
    entries = outputs_cache.entries()
    for entry in entries:
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(entry.last_used))
        print(f"{entry.key[:12]}  {entry.size / 2**20:8.0f} MiB  {used}  {entry.image} {entry.settings}".rstrip())
    total = sum(entry.size for entry in entries)
    print(f"{len(entries)} cached build(s), {total / 2**20:.0f} MiB of {config.cache_bytes / 2**20:.0f} MiB, in "
          f"{outputs_cache.directory}")


@cache_app.command("prune", cls=CommandWithFlags)
@with_settings("cache")
def cache_prune(*, config: Config) -> None:
    """Remove cached outputs: all of them (--all), those unused for some days (--older-than), and the least
    recently used ones beyond --cache-size.

    \b
    c2boot cache prune --older-than 30
    c2boot cache prune --all
    """
    from container2boot.cache import Cache, default_directory

    removed = Cache(default_directory(), config.cache_bytes).prune(
        limit=config.cache_bytes, everything=config.prune_all,
        unused_for=None if config.unused_days is None else config.unused_days * 86400)
    freed = sum(entry.size for entry in removed)
    logger.info("c2boot: removed %d cached build(s), %.0f MiB", len(removed), freed / 2**20)


def format_report(report: Report, layout: str, plan: "Plan | None", verdict: str) -> str:
    """The human-readable `c2boot inspect` report: what the image has, then what a build will do with it."""
    data = report.as_json(layout)
    kernels = ", ".join(f"{k.version}{f' (incomplete: {k.problem})' if k.problem else ''}" for k in report.kernels)
    dracut = data["dracut"]
    rows = [
        ("system", f"{report.name} ({data['family']}, {report.architecture or 'unknown architecture'}, "
                   f"{report.size_bytes / 1e6:.0f} MB)"),
        ("kernels", kernels or "none"),
        ("init", report.init),
        ("dracut", f"{dracut['version']}, live modules: {', '.join(dracut['live_modules']) or 'none'}"
         if dracut["version"] else "no" + (" (initramfs-tools instead)" if report.initramfs_tools else "")),
        ("secure boot", f"signed shim and GRUB ({report.signed_loader})" if report.signed_loader
         else "no signed shim/GRUB: boots with Secure Boot off"),
        ("netboot", "yes (dracut livenet and network modules, curl)" if report.netboot_ready
         else f"no: for --netboot {report.packages(['livenet'])}"),
        ("selinux", f"{report.selinux_policy} policy, {report.selinux_mode or 'no mode set'} (build labels the root "
                    "from it)" if report.selinux_policy else "no policy"),
        ("bootc", "yes (containers.bootc label)" if report.bootc else "no"),
        ("ssh", "yes (sshd)" if report.sshd else "no sshd"),
        ("cloud-init", "no" if not report.cloud_init else "yes" if report.cloud_datasources is None
         else f"yes, datasources: {', '.join(report.cloud_datasources) or 'none'}"),
    ]
    if plan is not None and plan.kind != "machine" and report.missing(layout):
        rows.append(("on its own", f"to boot without supplied parts, {report.packages(report.missing(layout))}"))
    width = max(len(name) for name, _ in rows)
    lines = [f"  {name:<{width}}  {value}" for name, value in rows]
    return "\n".join([*lines, f"{'OK' if plan else 'CANNOT BOOT'}: {verdict}"])


@app.command(cls=CommandWithFlags)
def doctor(
    output: Path = typer.Option(Path("out"), "--output", "-o", help="The output directory whose free space counts.",
                                metavar="DIR"),
) -> None:
    """Check this host for what build, run and test need; each line OK, WARN or FAIL with the fix (exit 1 on FAIL).

    \b
    c2boot doctor
    """
    from container2boot.doctor import run_checks

    setup_logging(False)
    with reported_errors("doctor"):
        checks = run_checks(output)
    for check in checks:
        print(check.line())
    failed = [c for c in checks if c.status == "FAIL"]
    print(f"{len(failed)} problem(s) stop builds here" if failed else "This host can build container2boot images.")
    if failed:
        raise typer.Exit(EXIT_ERROR)


def _version(value: bool) -> None:
    if value:
        print(f"container2boot {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Show the version and exit."),
) -> None:
    """Turn a container image into a bootable disk image, as a normal user."""


def main() -> None:
    app(prog_name="c2boot")


if __name__ == "__main__":
    main()
