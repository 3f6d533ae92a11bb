"""run/test/serve/formats without booting: the QEMU command line, the boot report, network boot arguments and
serving, qemu-img conversions and SHA256SUMS (real qemu-img, zstd and xz on small files)."""

import base64
import json
import subprocess
import urllib.request
from pathlib import Path

import pytest

from container2boot import bootcheck, formats, netboot, qemu, vm
from container2boot.config import Config
from container2boot.errors import C2BootError
from container2boot.qemu import VirtualMachine, qemu_command
from tests.conftest import C2BOOT, c2boot, require_host_tools

LIVE_CMDLINE = ("root=live:LABEL=C2BOOT rd.live.dir=/container2boot rd.live.squashimg=squashfs.img rd.live.image "
                "rd.live.overlay.readonly console=tty0 console=ttyS0,115200 quiet")


@pytest.fixture(autouse=True)
def _no_kvm_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("C2BOOT_QEMU_ACCEL", "tcg")


def fake_out(tmp_path: Path, boot: dict[str, object], disk: bool = True) -> Path:
    """An output directory as `c2boot build` leaves it, with tiny files."""
    out = tmp_path / "out"
    boot_dir = out / "esp" / "container2boot"
    boot_dir.mkdir(parents=True)
    for name in ("vmlinuz", "initrd.img", "squashfs.img"):
        (boot_dir / name).write_bytes(name.encode() * 100)
    if disk:
        (out / "disk.img").write_bytes(b"\0" * 510 + b"\x55\xaa" + b"\0" * 3584)  # a boot signature
    (out / "manifest.json").write_text(json.dumps({"kernel": {"cmdline": LIVE_CMDLINE}, "boot": boot}))
    return out


# Settings ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("values", "message"), [
    ({"formats": ("qcow3",)}, "unknown --format 'qcow3'"),
    ({"compress": "gz"}, "unknown --compress"),
    ({"firmware": "coreboot"}, "unknown firmware"),
    ({"test": True, "firmware": "bios"}, "add --bios"),
    ({"append": "quiet"}, "add one"),
    ({"direct": True, "boot_from_network": True}, "choose one"),
    ({"ssh_port": 70000}, "not a port number"),
    ({"memory": "lots"}, "--memory 'lots' is not a size"),
    ({"netboot": True, "layout": "installed"}, "drop it for --layout installed"),
])
def test_invalid_vm_settings(values: dict[str, object], message: str) -> None:
    with pytest.raises(C2BootError, match=message):
        Config(**values)  # type: ignore[arg-type]


def test_formats_compress_and_test_imply_a_disk_image() -> None:
    for values in ({"formats": ("qcow2",)}, {"compress": "zst"}, {"test": True}):
        assert Config(**values).diskimage  # type: ignore[arg-type]
    assert Config(memory="1536M").memory_mib == 1536


# The QEMU command line -----------------------------------------------------------------------------------------


def test_secure_boot_uses_smm_secboot_firmware_and_a_writable_variables_copy(tmp_path: Path) -> None:
    argv = qemu_command(VirtualMachine(Path("/x/disk.qcow2"), firmware="secure-boot", serial=["file:c"]), tmp_path)
    assert argv[argv.index("-machine") + 1] == "q35,smm=on"
    assert "driver=cfi.pflash01,property=secure,value=on" in argv
    assert any("secboot" in a and "readonly=on" in a for a in argv)
    assert f"if=pflash,format=raw,unit=1,file={tmp_path / 'OVMF_VARS.fd'}" in argv
    assert (tmp_path / "OVMF_VARS.fd").stat().st_size > 0
    assert "file=/x/disk.qcow2,format=qcow2,if=virtio,snapshot=on" in argv  # never writes the built image


def test_bios_direct_kernel_ssh_forward_and_credentials(tmp_path: Path) -> None:
    machine = VirtualMachine(Path("/x/disk.img"), firmware="bios", kernel=Path("/k"), initrd=Path("/i"),
                             append="quiet", ssh_port=2222, credentials={"a.b": b"[Unit]\n", "c": b"x,y"},
                             memory_mib=1024)
    argv = qemu_command(machine, tmp_path)
    assert not any("pflash" in a for a in argv)
    assert argv[argv.index("-kernel") + 1 :][:4] == ["/k", "-append", "quiet", "-initrd"]
    assert "user,model=virtio-net-pci,hostfwd=tcp:127.0.0.1:2222-:22" in argv
    encoded = base64.b64encode(b"[Unit]\n").decode()
    files = [Path(a.removeprefix("type=11,path=")) for a in argv if a.startswith("type=11,path=")]
    assert [f.read_text() for f in files] == [f"io.systemd.credential.binary:a.b={encoded}",
                                              "io.systemd.credential.binary:c=eCx5"]  # a file each: commas are safe
    assert argv[argv.index("-serial") + 1] == "mon:stdio"  # no serial files: the console is the terminal
    assert argv[argv.index("-m") + 1] == "1024"


# The boot report -----------------------------------------------------------------------------------------------

REPORT = """BdsDxe: loading Boot0002 "UEFI Misc Device" from PciRoot(0x0)/Pci(0x3,0x0)
  Booting `Debian GNU/Linux 13 (trixie) (container2boot live)' state=junk
c2boot-report-begin
reached 22.41
finished 23.60
state running
default_target graphical.target
target_state active
target_entered 22061810
FirmwareTimestampMonotonic=0
LoaderTimestampMonotonic=0
InitRDTimestampMonotonic=3035510
UserspaceTimestampMonotonic=13402841
FinishTimestampMonotonic=22944323
end
"""


def test_report_unit_escapes_dollars_for_systemd_and_is_pulled_in_after_the_default_target() -> None:
    unit = bootcheck.report_unit().decode()
    assert "After=default.target" in unit and "ConditionPathExists=!/etc/initrd-release" in unit
    assert "StandardOutput=file:/dev/ttyS1" in unit
    assert "$$(systemctl is-system-running --wait)" in unit and " $up" not in unit
    assert "FinishTimestampMonotonic" in unit
    dropin = bootcheck.report_credentials(None)["systemd.unit-dropin.basic.target~c2boot-report"].decode()
    assert dropin == "[Unit]\nWants=c2boot-report.service\n"


@pytest.mark.parametrize(("systemd", "names"), [
    (252, {"tmpfiles.extra"}),
    (255, {"tmpfiles.extra"}),
    (256, {"systemd.extra-unit.c2boot-report.service", "systemd.unit-dropin.basic.target~c2boot-report"}),
    (257, {"tmpfiles.extra", "systemd.extra-unit.c2boot-report.service",
           "systemd.unit-dropin.basic.target~c2boot-report"}),
    (None, {"tmpfiles.extra", "systemd.extra-unit.c2boot-report.service",
            "systemd.unit-dropin.basic.target~c2boot-report"}),
])
def test_the_report_goes_only_in_the_form_the_images_systemd_takes(systemd: int | None, names: set[str]) -> None:
    credentials = bootcheck.report_credentials(systemd)
    assert set(credentials) == names
    vm.check_credentials_fit(credentials, systemd)  # systemd 252-256 read one page of them: the report fits


def test_credentials_beyond_the_first_page_are_refused_for_a_systemd_that_would_cut_them() -> None:
    keys = {"ssh.authorized_keys.root": b"ssh-ed25519 " + b"A" * 3100 + b"\n"}
    assert qemu.smbios_size(keys) > vm.SMBIOS_PAGE
    with pytest.raises(C2BootError, match="systemd 252 reads only the first 4096"):
        vm.check_credentials_fit(keys, 252)
    vm.check_credentials_fit(keys, 257)  # reads the whole entry
    vm.check_credentials_fit(keys, None)  # not known: nothing to hold against it


def test_a_running_system_passes_with_timings() -> None:
    report = bootcheck.BootReport(ok=False, verdict="", boot="disk", verdict_kind="report", firmware="uefi",
                                  accelerator="tcg", image="d")
    values = bootcheck.parse_report(REPORT)
    bootcheck.decide(report, values, "console", None, reached_at=31.0, timeout=300)
    assert report.ok and report.default_target == "graphical.target" and report.failed_units == []
    assert report.seconds == {"firmware_and_loader": 8.6, "kernel": 3.0, "initrd": 10.4, "userspace": 8.7,
                              "total": 31.0}
    assert report.summary().startswith("UP: the system reached graphical.target")
    json.dumps(report.as_json())


def test_failed_units_make_it_fail_and_are_named() -> None:
    text = REPORT.replace("state running", "state degraded").replace("end\n", "failed foo.service\nend\n")
    report = bootcheck.BootReport(ok=False, verdict="", boot="disk", verdict_kind="report", firmware="uefi",
                                  accelerator="tcg", image="d")
    bootcheck.decide(report, bootcheck.parse_report(text), "a\nb\n", None, reached_at=30.0, timeout=300)
    assert not report.ok and report.failed_units == ["foo.service"]
    assert report.problem == "the system reached graphical.target but is degraded: 1 unit(s) failed"
    assert "failed unit: foo.service" in report.summary() and report.console_tail == ["a", "b"]


@pytest.mark.parametrize(("console", "cause"), [
    ("[ 1.0] Kernel panic - not syncing: VFS: Unable to mount root fs", "the kernel panicked"),
    ("Entering emergency mode. Exit the shell to continue.", "emergency mode"),
    ("BdsDxe: failed to load Boot0002: Access Denied", "Secure Boot"),
    ("Boot failed: not a bootable disk", "nothing to boot"),
    ("error: file `/container2boot/vmlinuz' not found.", "GRUB could not load the kernel"),
])
def test_fatal_console_lines_name_the_cause(console: str, cause: str) -> None:
    found = bootcheck.fatal_console_line(f"some boot output\n{console}\nmore\n")
    assert found is not None and cause in found[0]
    report = bootcheck.BootReport(ok=False, verdict="", boot="disk", verdict_kind="report", firmware="uefi",
                                  accelerator="tcg", image="d")
    bootcheck.decide(report, {"failed": []}, console, found, reached_at=None, timeout=300)
    assert not report.ok and cause in report.verdict and report.console_tail


def test_no_report_says_why_it_may_be_missing() -> None:
    assert bootcheck.fatal_console_line("[  OK  ] Reached target basic.target\nWelcome to emergency-free land") \
        is None
    report = bootcheck.BootReport(ok=False, verdict="", boot="disk", verdict_kind="report", firmware="uefi",
                                  accelerator="tcg", image="d")
    bootcheck.decide(report, {"failed": []}, "", None, reached_at=None, timeout=120)
    assert "within 120 s" in report.verdict and "systemd is older than 252" in report.verdict


def test_the_verdict_kind_follows_the_image_init() -> None:
    def kind(manifest: dict[str, object]) -> str:
        return bootcheck.verdict_kind(vm.Built(Path("out"), None, manifest))

    assert kind({}) == "report"  # a build that does not say: the report, as before
    assert kind({"image": {"init": "systemd", "systemd_version": 252}}) == "report"
    assert kind({"image": {"init": "systemd", "systemd_version": 249}}) == "console"
    assert kind({"image": {"init": "openrc", "systemd_version": None}}) == "console"
    assert kind({"image_kind": "app", "image": {"init": "none"}}) == "app"


def test_a_console_verdict_needs_a_login_prompt_and_no_fatal_line() -> None:
    def report() -> bootcheck.BootReport:
        return bootcheck.BootReport(ok=False, verdict="", boot="disk", verdict_kind="console", firmware="uefi",
                                    accelerator="tcg", image="d")

    up = bootcheck.decide(report(), {"failed": []}, "INIT: version 3.06 booting\nalpine login: ", None, 30.0, 120)
    assert up.ok and up.verdict == "the system reached a login prompt (alpine login:)"
    assert up.summary().startswith("UP: the system reached a login prompt (alpine login:) (judged from the console)")
    stuck = bootcheck.decide(report(), {"failed": []}, "INIT: version 3.06 booting\n", None, None, 120)
    assert not stuck.ok and stuck.problem == ("its init started (INIT: version 3.06 booting) but no login prompt on "
                                              "the console within 120 s")
    panic = bootcheck.decide(report(), {"failed": []}, "Kernel panic - not syncing: VFS",
                             ("the kernel panicked", "Kernel panic - not syncing: VFS"), None, 120)
    assert not panic.ok and panic.problem == "the kernel panicked (Kernel panic - not syncing: VFS)"
    assert bootcheck.LOGIN_PROMPT.search("Debian GNU/Linux 12 vm ttyS0\n\nvm login: ")
    assert bootcheck.LOGIN_PROMPT.search("vm login: [   31.917277] powernow_k8: Power state transitions")


# The fault of multi-threaded TCG seen in CI: an int3 that another vCPU had already patched away, before /init.
EARLY_OOPS = """[    2.300000] Freeing unused kernel image (initmem) memory: 3916K
[    2.541000] Oops: int3: 0000 [#1] PREEMPT SMP NOPTI
[    2.541100] RIP: 0010:sched_clock_cpu+0x9/0x1d0
[    2.542389] Kernel panic - not syncing: Fatal exception in interrupt
[    4.343582] ---[ end Kernel panic - not syncing: Fatal exception in interrupt ]---
"""
UP = "[    2.6] Run /init as init process\nWelcome to Debian GNU/Linux 13 (trixie)!"


def test_only_a_trap_on_just_patched_kernel_code_is_taken_for_the_emulators_fault() -> None:
    assert qemu.emulator_fault(EARLY_OOPS) == "[    2.541000] Oops: int3: 0000 [#1] PREEMPT SMP NOPTI"
    assert qemu.emulator_fault("[    3.1] int3: 0000 [#1] PREEMPT SMP NOPTI\n")  # Linux 6.1's words
    assert qemu.emulator_fault("[    2.0] Kernel panic - not syncing: VFS: Unable to mount root fs") is None
    assert qemu.emulator_fault("[    9.0] general protection fault, probably for non-canonical address") is None
    assert qemu.emulator_fault(UP) is None


def observation(console: str, reached_at: float | None = None) -> bootcheck.Observed:
    values: dict[str, object] = {"failed": [], "avc": []}
    if reached_at is not None:
        values.update(reached="40.0", end="", target_state="active", state="running", default_target="graphical")
    return bootcheck.Observed(values, console, bootcheck.fatal_console_line(console), reached_at, None)


@pytest.mark.parametrize(("accel", "consoles", "boots", "ok"), [
    ("tcg,thread=multi", [EARLY_OOPS, UP], 2, True),  # booted again, and up
    ("tcg,thread=multi", [EARLY_OOPS, EARLY_OOPS, UP], 2, False),  # a second fault is reported, no third boot
    ("kvm", [EARLY_OOPS, UP], 1, False),  # no emulator to blame
])
def test_the_test_boots_once_more_only_after_an_emulator_fault_under_tcg(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, accel: str, consoles: list[str], boots: int,
        ok: bool) -> None:
    monkeypatch.setenv("C2BOOT_QEMU_ACCEL", accel)
    seen = iter(observation(console, 41.0 if console == UP else None) for console in consoles)
    booted: list[VirtualMachine] = []

    def observe(machine: VirtualMachine, kind: str, timeout: float) -> bootcheck.Observed:
        booted.append(machine)
        return next(seen)

    monkeypatch.setattr(bootcheck, "observe", observe)
    report = bootcheck.check_boot(VirtualMachine(Path("disk.img")), boot="disk", image="disk.img", timeout=300,
                                  console_copy=tmp_path / "console.log")
    assert (len(booted), report.ok) == (boots, ok)
    assert (tmp_path / "console.log").read_text().count("Oops: int3") == (boots if not ok else boots - 1)
    if boots == 2:
        assert report.emulator_fault == "[    2.541000] Oops: int3: 0000 [#1] PREEMPT SMP NOPTI"
        assert "booted twice: the first boot ended in a fault of the emulator" in report.summary()
    if not ok:
        assert report.problem == "the kernel panicked (Kernel panic - not syncing: Fatal exception in interrupt)"
        assert "Oops: int3: 0000 [#1] PREEMPT SMP NOPTI" in "\n".join(report.console_tail)


# What run and test boot ----------------------------------------------------------------------------------------


def test_a_build_without_bios_or_signed_loader_is_refused_for_that_firmware(tmp_path: Path) -> None:
    out = fake_out(tmp_path, {"firmware": ["uefi"], "bootloader": "grub (unsigned)"})
    with pytest.raises(C2BootError, match="built without --bios"), vm.machine(out, Config(firmware="bios")):
        pass
    with pytest.raises(C2BootError, match="unsigned GRUB"), vm.machine(out, Config(firmware="secure-boot")):
        pass
    (out / "disk.img").unlink()
    with pytest.raises(C2BootError, match=r"has no disk\.img"), vm.machine(out, Config()):
        pass
    with pytest.raises(C2BootError, match="not found"):
        vm.locate(tmp_path / "nothing")


def test_a_console_log_in_a_missing_directory_is_refused_before_the_boot_or_the_build(tmp_path: Path) -> None:
    out = fake_out(tmp_path, {"firmware": ["uefi"], "bootloader": "grub (unsigned)"})
    for args in (("test", out), ("build", "--image", "localhost/none:1", "--test", "-o", tmp_path / "new")):
        result = c2boot(*args, "--console-log", tmp_path / "missing" / "console.log", check=False)
        assert result.returncode != 0 and "its directory does not exist" in result.stderr, result.stderr
    assert not (tmp_path / "new").exists()


def test_direct_boot_appends_to_the_built_kernel_arguments(tmp_path: Path) -> None:
    out = fake_out(tmp_path, {"firmware": ["uefi"], "bootloader": "grub (unsigned)"})
    with vm.machine(out / "disk.img", Config(direct=True, append="systemd.unit=rescue.target")) as (machine, how, _):
        assert how == "direct" and machine.disk == out / "disk.img"
        assert machine.append == f"{LIVE_CMDLINE} systemd.unit=rescue.target"
        assert machine.kernel == out / "esp" / "container2boot" / "vmlinuz"


def test_netboot_arguments_replace_the_disk_root() -> None:
    args = netboot.netboot_cmdline(LIVE_CMDLINE, "http://10.0.2.2:8080/squashfs.img", "x=1")
    assert args == ("root=live:http://10.0.2.2:8080/squashfs.img rd.neednet=1 ip=dhcp rd.live.image "
                    "rd.live.overlay.readonly console=tty0 console=ttyS0,115200 quiet x=1")


def test_network_boot_serves_the_root_image_while_the_machine_runs(tmp_path: Path) -> None:
    out = fake_out(tmp_path, {"firmware": ["uefi"], "bootloader": "grub (unsigned)", "netboot": True}, disk=False)
    with vm.machine(out, Config(boot_from_network=True)) as (machine, how, _):
        assert how == "network" and machine.disk is None
        url = machine.append.split()[0].removeprefix("root=live:")
        port = url.split(":")[2].split("/")[0]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/squashfs.img") as response:
            assert response.read() == b"squashfs.img" * 100
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["boot"]["netboot"] = False
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(C2BootError, match="without --netboot"), vm.machine(out, Config(boot_from_network=True)):
        pass


def test_serve_prints_the_kernel_arguments_and_serves(tmp_path: Path) -> None:
    out = fake_out(tmp_path, {"netboot": True}, disk=False)
    with netboot.serving(out / "esp" / "container2boot", "127.0.0.1", 0) as server:
        process = subprocess.Popen([*C2BOOT, "serve", str(out), "--port",
                                    str(server.server_port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True)
        _, errors = process.communicate(timeout=30)
    assert process.returncode == 1 and "check --address and --port" in errors  # the port is taken
    process = subprocess.Popen([*C2BOOT, "serve", str(out), "--port", "0"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        lines = [process.stdout.readline() for _ in range(4)]
        assert lines[0].startswith("Serving ") and "root=live:http://10.0.2.2:" in lines[3]
    finally:
        process.terminate()
        process.wait(timeout=10)


# Formats and checksums -----------------------------------------------------------------------------------------


def test_formats_convert_compress_and_checksum(tmp_path: Path) -> None:
    require_host_tools("qemu-img", "zstd", "xz", "sha256sum")
    disk = tmp_path / "disk.img"
    with disk.open("wb") as f:
        f.truncate(3 * 1024 * 1024 + 512)  # not a whole MiB: the fixed VHD must still take it
        f.seek(1024 * 1024)
        f.write(b"container2boot" * 1000)
    outputs = formats.convert(disk, ["qcow2", "raw", "vhd", "qcow2"])
    assert [name for name, _ in outputs] == ["raw", "qcow2", "vhd"]
    subprocess.run(["qemu-img", "check", tmp_path / "disk.qcow2"], check=True, capture_output=True)
    info = json.loads(subprocess.run(["qemu-img", "info", "-f", "vpc", "--output=json", tmp_path / "disk.vhd"],
                                     check=True, capture_output=True, text=True).stdout)
    assert info["format"] == "vpc" and info["virtual-size"] >= disk.stat().st_size
    copies = formats.compress([p for _, p in outputs], "zst")
    assert [p.name for p in copies] == ["disk.img.zst", "disk.qcow2.zst", "disk.vhd.zst"]
    restored = subprocess.run(["zstd", "-dc", tmp_path / "disk.img.zst"], check=True, capture_output=True).stdout
    assert restored == disk.read_bytes()
    assert formats.compress([disk], "xz")[0].name == "disk.img.xz"
    from container2boot.manifest import artifacts

    formats.write_checksums(tmp_path, artifacts(tmp_path))
    subprocess.run(["sha256sum", "--check", "--quiet", "SHA256SUMS"], cwd=tmp_path, check=True)


def test_cli_help_teaches_each_verb() -> None:
    for verb, example in (("run", "--ssh-port 2222"), ("test", "--json"), ("serve", "--address 0.0.0.0"),
                          ("esp", "sync")):
        result = c2boot(verb, "--help")
        assert example in result.stdout, verb


@pytest.mark.parametrize("command", [(), ("build",), ("cache", "prune"), ("esp", "sync"), ("inspect",)])
def test_help_shows_no_type_beside_flags(command: tuple[str, ...]) -> None:
    """Flags take no value: neither ours nor typer's own (--help, --install-completion) show `<bool>`."""
    result = c2boot(*command, "--help")
    assert "--help" in result.stdout and "<bool>" not in result.stdout
