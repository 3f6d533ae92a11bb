"""`c2boot test`: boot a built image headless and let the booted system say whether it came up.

The image is not changed: a small report unit reaches the guest as systemd credentials (SMBIOS type 11), runs
once the default target is reached, waits for the startup to finish and writes the system state, the failed units
and systemd's boot timestamps to a second serial port that only the host reads. systemd 256 and newer take the
unit itself as a credential; 252-255 get it through `tmpfiles.extra`, which systemd-tmpfiles already reads in the
initrd: it writes the unit to /run/systemd/system, which the booted system loads after the switch to its root.
systemd before 257 reads one page (4 KiB) of all the credentials: 252-256 get only the form they take.
The console (first serial port) is kept for the failure report (kernel panics, emergency mode, firmware refusals),
and is the whole verdict for an init that is not systemd or a systemd older than 252: a login prompt reached, no
panic, no emergency shell.
"""

import base64
import dataclasses
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from container2boot import lifecycle, qemu
from container2boot.config import Config
from container2boot.log import logger
from container2boot.templates import render
from container2boot.vm import (
    CREDENTIALS_SYSTEMD,
    WHOLE_SMBIOS_SYSTEMD,
    Built,
    check_console_log,
    check_credentials_fit,
    machine,
)

UNIT_CREDENTIAL_SYSTEMD = 256  # takes a unit (systemd.extra-unit.*) and a drop-in as credentials
REPORT_UNIT = "c2boot-report.service"
REPORT_PORT = "/dev/ttyS1"
REPORT_MARKER = "c2boot-report-begin"  # OVMF and GRUB write to every serial port: the report starts after this
MANAGER_PROPERTIES = ("FirmwareTimestampMonotonic", "LoaderTimestampMonotonic", "InitRDTimestampMonotonic",
                      "UserspaceTimestampMonotonic", "FinishTimestampMonotonic")
# Console lines that mean the boot cannot succeed any more; the test stops early and names the cause.
FATAL_CONSOLE = (
    (re.compile(r"Kernel panic - not syncing.*"), "the kernel panicked"),
    (re.compile(r"You are in emergency mode|Entering emergency mode.*|dracut Warning: Could not boot.*"),
     "the system fell into emergency mode"),
    (re.compile(r"Access Denied|Security Violation|bad shim signature"),
     "the firmware refused the boot loader (Secure Boot: the image needs a signed shim and GRUB)"),
    (re.compile(r"No bootable device|Boot failed: not a bootable disk|No bootable option or device was found"),
     "the firmware found nothing to boot"),
    # Not GRUB's "no such device": a failed `search` is harmless when the boot device holds the files anyway.
    (re.compile(r"error: (file .* not found|you need to load the kernel first).*"), "GRUB could not load the kernel"),
)
# A console verdict (no systemd report possible): a getty's login prompt means the system came up.
LOGIN_PROMPT = re.compile(r"^\S+ login: ", re.MULTILINE)  # kernel messages may follow on its line
INIT_BANNERS = re.compile(r"INIT: version \S+ booting|OpenRC \S+ is starting up|Run /\S+ as init process")
SELINUX_MODES = {"1": "enforcing", "0": "permissive", "off": "off"}  # the report's /sys/fs/selinux/enforce
AVC_SHOWN = 5  # the first AVC denials the report carries
GRACE_SECONDS = 5  # more console after a fatal line, for the report
APP_SETTLE_SECONDS = 10  # an app still running this long after it started is up
CONSOLE_TAIL_LINES = 30


@dataclass
class BootReport:
    """What `c2boot test` found out; `ok` only when the default target was reached with no failed units."""

    ok: bool
    verdict: str
    boot: str  # disk, direct or network
    verdict_kind: str  # report: the booted systemd reported; console: judged from the console; app: its init's
    firmware: str
    accelerator: str
    image: str
    default_target: str | None = None
    reached_default_target: bool = False
    system_state: str | None = None  # running, degraded, ... as `systemctl is-system-running` says
    failed_units: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    problem: str | None = None
    console_tail: list[str] = field(default_factory=list)
    app_command: str | None = None  # an application image: what its init started
    app_exit_status: int | None = None  # and how it ended, if it did
    selinux: str | None = None  # enforcing, permissive or off, as the booted kernel says; None: not reported
    avc_denials: int = 0  # SELinux AVC denials during the boot
    avc_examples: list[str] = field(default_factory=list)  # the first of them
    emulator_fault: str | None = None  # the fault of software emulation that ended a first boot, booted again

    def as_json(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        """The human-readable report: one verdict line, then the timings or what the console said last."""
        kind = {"console": " (judged from the console)", "app": ""}.get(self.verdict_kind, "")
        lines = [f"{'UP' if self.ok else 'FAILED'}: {self.verdict}{kind}"]
        if self.seconds:
            lines.append("  " + ", ".join(f"{name.replace('_', ' ')} {value:.1f} s"
                                          for name, value in self.seconds.items()))
        lines += [f"  failed unit: {unit}" for unit in self.failed_units]
        if self.emulator_fault:
            lines.append(f"  booted twice: the first boot ended in a fault of the emulator ({self.emulator_fault})")
        if self.selinux not in (None, "off"):
            lines.append(f"  SELinux {self.selinux}")
        if self.avc_denials:
            lines.append(f"  warning: {self.avc_denials} SELinux AVC denial(s) during the boot; the first:")
            lines += [f"    {denial}" for denial in self.avc_examples]
        if not self.ok and self.console_tail:
            lines += ["  last console lines:", *(f"    {line}" for line in self.console_tail)]
        return "\n".join(lines)


def report_unit() -> bytes:
    return render("report.service.j2", port=REPORT_PORT, marker=REPORT_MARKER,
                  manager_properties=MANAGER_PROPERTIES, avc_shown=AVC_SHOWN).encode()


def report_credentials(systemd_version: int | None) -> dict[str, bytes]:
    """The unit and what pulls it into the boot, in the forms the image's systemd takes (all when it is not known):
    for 256+, the unit and a drop-in (systemd-debug-generator reads both credentials); for 252-255, and for 257+
    too, tmpfiles lines that write the unit and its wants link under /run from the initrd, before any SELinux policy
    is loaded (Debian's enforcing policy keeps the generator from the credentials). 256 gets one form only, as
    systemd before 257 reads just one page of all the credentials."""
    unit = report_unit()
    credentials = {}
    if systemd_version is None or systemd_version >= UNIT_CREDENTIAL_SYSTEMD:
        credentials[f"systemd.extra-unit.{REPORT_UNIT}"] = unit
        credentials["systemd.unit-dropin.basic.target~c2boot-report"] = f"[Unit]\nWants={REPORT_UNIT}\n".encode()
    if systemd_version is None or not UNIT_CREDENTIAL_SYSTEMD <= systemd_version < WHOLE_SMBIOS_SYSTEMD:
        credentials["tmpfiles.extra"] = render("report.tmpfiles.j2", unit=REPORT_UNIT,
                                               unit_base64=base64.b64encode(unit).decode()).encode()
    return credentials


def parse_report(text: str) -> dict[str, Any]:
    """The report's lines ('key value' and systemctl's 'Key=value') as a dict; failed units as a list. Whatever
    came before the marker (firmware, boot loader) is not part of it."""
    values: dict[str, Any] = {"failed": [], "avc": []}
    _, marker, report = text.partition(REPORT_MARKER)
    for line in report.splitlines() if marker else []:
        line = line.strip()
        if "=" in line and " " not in line.partition("=")[0]:
            key, _, value = line.partition("=")
            values[key] = value
        elif line:
            key, _, value = line.partition(" ")
            if key in ("failed", "avc"):
                values[key].append(value)
            else:
                values[key] = value
    return values


def _microseconds(values: dict[str, Any], key: str) -> int:
    try:
        return int(values.get(key, 0))
    except ValueError:
        return 0


def boot_seconds(values: dict[str, Any], host_seconds_at_reached: float) -> dict[str, float]:
    """Firmware and loader (from the host's clock, as the guest's starts with the kernel), kernel, initrd and
    userspace until the default target, like `systemd-analyze time`."""
    initrd = _microseconds(values, "InitRDTimestampMonotonic")
    userspace = _microseconds(values, "UserspaceTimestampMonotonic")
    target = _microseconds(values, "target_entered")
    seconds: dict[str, float] = {}
    try:
        guest_uptime = float(values["reached"])
        seconds["firmware_and_loader"] = round(max(0.0, host_seconds_at_reached - guest_uptime), 1)
    except (KeyError, ValueError):
        pass
    if userspace:
        seconds["kernel"] = round((initrd or userspace) / 1e6, 1)
        if initrd:
            seconds["initrd"] = round((userspace - initrd) / 1e6, 1)
        if target > userspace:
            seconds["userspace"] = round((target - userspace) / 1e6, 1)
    seconds["total"] = round(host_seconds_at_reached, 1)
    return seconds


def fatal_console_line(console: str) -> tuple[str, str] | None:
    """(cause, the console line) for the first line that means the boot failed."""
    for pattern, cause in FATAL_CONSOLE:
        if match := pattern.search(console):
            return cause, match.group(0).strip()
    return None


def console_tail(console: str) -> list[str]:
    lines = [line.rstrip() for line in console.splitlines() if line.strip()]
    return lines[-CONSOLE_TAIL_LINES:]


def decide_app(report: BootReport, values: dict[str, Any], console: str, started_at: float | None) -> BootReport:
    """An application image's verdict: its init started the app, which runs or exited with status 0."""
    report.app_command = values["app_started"]
    if started_at is not None:
        report.seconds = {"total": round(started_at, 1)}
    try:
        report.app_exit_status = int(values["app_exit"]) if "app_exit" in values else None
    except ValueError:
        report.app_exit_status = None
    if report.app_exit_status is None:
        report.ok, report.verdict = True, f"the app is running: {report.app_command}"
        return report
    report.ok = report.app_exit_status == 0
    report.verdict = f"the app ran and exited with status {report.app_exit_status}: {report.app_command}"
    if not report.ok:
        report.problem = report.verdict
        report.console_tail = console_tail(console)
    return report


def decide_console(report: BootReport, console: str, fatal: tuple[str, str] | None, reached_at: float | None,
                   timeout: float) -> BootReport:
    """The verdict for an init that cannot report: a login prompt on the console, and no fatal line before it."""
    banner = INIT_BANNERS.search(console)
    if reached_at is not None and fatal is None:
        report.ok = True
        report.seconds = {"total": round(reached_at, 1)}
        prompt = LOGIN_PROMPT.search(console)
        report.verdict = f"the system reached a login prompt ({prompt.group(0).strip() if prompt else 'login:'})"
        return report
    report.console_tail = console_tail(console)
    if fatal is not None:
        report.problem = f"{fatal[0]} ({fatal[1]})"
    elif report.problem is None:
        started = f"its init started ({banner.group(0)}) but " if banner else ""
        report.problem = f"{started}no login prompt on the console within {timeout:.0f} s"
    report.verdict = report.problem
    return report


def app_exit_status(report_port: str) -> int | None:
    """The exit status an application image's init reported, if it did."""
    value = parse_report(report_port).get("app_exit")
    return int(value) if value is not None and value.lstrip("-").isdigit() else None


def test(target: Path, config: Config) -> BootReport:
    """`c2boot test`: boot a build's output directory or disk image as `config` says, and report."""
    check_console_log(config.console_log)
    with machine(target, config) as (vm, boot, built):
        kind = verdict_kind(built)
        how = "its systemd reports" if kind == "report" else \
            f"judged from its console: not systemd {CREDENTIALS_SYSTEMD} or newer"
        logger.info("==> Testing that %s boots (%s, %s firmware; up to %d s; %s)", built.what(boot), boot,
                    config.firmware, config.timeout, how)
        return check_boot(vm, boot=boot, image=str(built.what(boot)), timeout=config.timeout, kind=kind,
                          systemd_version=built.systemd_version, console_copy=config.console_log)


def verdict_kind(built: Built) -> str:
    """How the boot is judged: by the booted system's report (systemd 252+, an app's init, or a build that does not
    say), or by its console (another init, an older systemd)."""
    if built.manifest.get("image_kind") == "app":
        return "app"
    if "init" not in built.image:
        return "report"
    version = built.systemd_version
    return "report" if built.image["init"] == "systemd" and (version is None or version >= CREDENTIALS_SYSTEMD) \
        else "console"


@dataclass(frozen=True)
class Observed:
    """What one boot showed: the report port's values, the console, its first fatal line, when the system was up
    (seconds after power-on) and why QEMU stopped, if it did."""

    values: dict[str, Any]
    console: str
    fatal: tuple[str, str] | None
    reached_at: float | None
    qemu_stopped: str | None


def check_boot(vm: qemu.VirtualMachine, *, boot: str, image: str, timeout: float, kind: str = "report",
               systemd_version: int | None = None, console_copy: Path | None = None) -> BootReport:
    """Boot `vm` (its console and report ports are set here) and decide from the booted system whether it came up:
    from its report, or with `kind` "console" from a login prompt on its console; once more after an emulator fault
    (qemu.emulator_fault). The whole console (of both boots then) is also written to `console_copy`. The report
    unit goes in the form `systemd_version` takes (both when not known)."""
    credentials = qemu.merge_credentials(vm.credentials, report_credentials(systemd_version))
    check_credentials_fit(credentials, systemd_version)
    vm = dataclasses.replace(vm, credentials=credentials, reboot=False)
    report = BootReport(ok=False, verdict="", boot=boot, verdict_kind=kind, firmware=vm.firmware,
                        accelerator=qemu.accelerator().split(",")[0], image=image)
    seen = observe(vm, kind, timeout)
    console = seen.console
    if seen.reached_at is None and (fault := qemu.boot_again_after(seen.console)):
        report.emulator_fault = fault
        seen = observe(vm, kind, timeout)
        console += f"\n[c2boot: booting again after the emulator's fault]\n{seen.console}"
    if console_copy is not None:
        console_copy.expanduser().write_text(console)
    if seen.qemu_stopped is not None:
        report.problem = f"QEMU stopped: {seen.qemu_stopped}"
    return decide(report, seen.values, seen.console, seen.fatal, seen.reached_at, timeout)


def observe(vm: qemu.VirtualMachine, kind: str, timeout: float) -> Observed:
    """Boot `vm` once with its console and report ports on files, until the system reported its end (or, for a
    console verdict, showed a login prompt), an app settled, QEMU stopped, a fatal console line had its grace, or
    `timeout` seconds passed."""
    with lifecycle.temporary_directory("c2boot-test-") as tmp:
        console_log, report_log = tmp / "console.log", tmp / "report.log"
        console_log.touch()
        report_log.touch()
        vm = dataclasses.replace(vm, serial=[f"file:{console_log}", f"file:{report_log}"])
        with qemu.started(vm) as process:
            start = time.monotonic()
            reached_at: float | None = None
            fatal: tuple[str, str] | None = None
            fatal_at = 0.0
            stopped: str | None = None
            while True:
                elapsed = time.monotonic() - start
                values = parse_report(report_log.read_text(errors="replace"))
                if ("reached" in values or "app_started" in values) and reached_at is None:
                    reached_at = elapsed
                if kind == "console" and LOGIN_PROMPT.search(qemu.read_console(console_log)):
                    reached_at = elapsed
                    break
                if "end" in values or elapsed > timeout:
                    break
                if "app_started" in values and reached_at is not None and elapsed - reached_at > APP_SETTLE_SECONDS:
                    break  # an app that keeps running (a server) is up
                if process.poll() is not None:
                    stopped = (process.stderr.read().strip() if process.stderr else "") or \
                        "the guest powered off or reset"
                    break
                if reached_at is None and fatal is None:
                    fatal = fatal_console_line(qemu.read_console(console_log))
                    fatal_at = elapsed
                if fatal is not None and elapsed - fatal_at > GRACE_SECONDS:
                    break
                time.sleep(0.5)
        return Observed(values, qemu.read_console(console_log), fatal, reached_at, stopped)


def decide(report: BootReport, values: dict[str, Any], console: str, fatal: tuple[str, str] | None,
           reached_at: float | None, timeout: float) -> BootReport:
    """Fill in `report` from what the report port and the console showed."""
    if "app_started" in values:
        report.verdict_kind = "app"
        return decide_app(report, values, console, reached_at)
    if report.verdict_kind == "console":
        return decide_console(report, console, fatal, reached_at, timeout)
    report.default_target = values.get("default_target")
    report.system_state = values.get("state")
    report.failed_units = list(values.get("failed", []))
    report.selinux = SELINUX_MODES.get(values.get("selinux", ""))
    report.avc_denials = int(values["avc_count"]) if str(values.get("avc_count", "")).isdigit() else 0
    report.avc_examples = list(values.get("avc", []))
    report.reached_default_target = values.get("target_state") == "active"
    if reached_at is not None:
        report.seconds = boot_seconds(values, reached_at)
    target = report.default_target or "its default target"
    if "end" in values and report.reached_default_target and report.system_state == "running":
        report.ok = True
        report.verdict = f"the system reached {target} and is running, with no failed units"
        return report
    report.console_tail = console_tail(console)
    if "end" in values and report.reached_default_target:
        report.problem = f"the system reached {target} but is {report.system_state}"
        if report.failed_units:
            report.problem += f": {len(report.failed_units)} unit(s) failed"
    elif "end" in values:
        report.problem = f"{target} is not active (the system is {report.system_state})"
    elif reached_at is not None:
        report.problem = f"the system reached {target}, but its startup did not finish within {timeout:.0f} s"
    elif fatal is not None:
        report.problem = f"{fatal[0]} ({fatal[1]})"
    elif report.problem is None:
        report.problem = (f"no report from the system within {timeout:.0f} s: it did not reach its default target, "
                          f"or its systemd is older than {CREDENTIALS_SYSTEMD}, which reads the test's unit from "
                          "SMBIOS credentials")
    report.verdict = report.problem
    return report
