"""Everything one c2boot run starts is stopped and removed again: after success, an error, Ctrl-C, SIGTERM or SIGHUP
(all three become the same `Interrupted` exception, so every `finally` runs), and after a SIGKILL by the next run.

Each run keeps a record, a small JSON file in the user's state directory, of what it created and has not removed
yet: temporary directories (staging, scratch, QEMU's), background processes (the podman API service, QEMU) and the
label its containers carry. A record whose process is gone belongs to a run that was killed: the next c2boot
removes what it lists and says so in one line. Background processes also get the kernel's parent-death signal, so
they stop at once when c2boot is killed instead of waiting for the next run.
"""

import contextlib
import ctypes
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from container2boot.log import logger

CONTAINER_LABEL = "io.container2boot.run"  # its value is the run's id; every container we create carries it
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
STOP_WAIT_SECONDS = 10
PR_SET_PDEATHSIG = 1


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, SIGTERM or SIGHUP: the run stops, cleaning up as it goes."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # as a shell reports a process killed by the signal: 130, 143, 129


def state_dir() -> Path:
    """Where run records and output locks live: the user's XDG state directory."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "container2boot"


def _proc_start(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (with the pid, it names a process for certain); None
    when there is no such process, or only its zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return None if fields[0] in ("Z", "X") else int(fields[19])


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


@dataclass
class Record:
    """What one run has started and not yet removed."""

    pid: int
    start: int | None
    boot_id: str
    command: str
    paths: list[str] = field(default_factory=list)
    processes: list[tuple[int, int | None]] = field(default_factory=list)  # (pid, start time)
    containers: int = 0  # containers labelled CONTAINER_LABEL=id that may exist (created, not yet removed)
    building_since: float | None = None  # an image build is running (its working container carries no label)

    @property
    def id(self) -> str:
        return f"{self.pid}-{self.start}"

    def alive(self) -> bool:
        return self.boot_id == _boot_id() and _proc_start(self.pid) == self.start

    def empty(self) -> bool:
        return not (self.paths or self.processes or self.containers or self.building_since)

    def as_json(self) -> dict[str, Any]:
        return {"pid": self.pid, "start": self.start, "boot_id": self.boot_id, "command": self.command,
                "paths": self.paths, "processes": self.processes, "containers": self.containers,
                "building_since": self.building_since}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Record":
        return cls(int(data["pid"]), data.get("start"), str(data.get("boot_id", "")), str(data.get("command", "")),
                   [str(p) for p in data.get("paths", [])],
                   [(int(p), s) for p, s in data.get("processes", [])], int(data.get("containers", 0)),
                   data.get("building_since"))


class Run:
    """This process's record, written to disk whenever it changes (atomically, so a kill never leaves half)."""

    def __init__(self, command: str) -> None:
        pid = os.getpid()
        self.record = Record(pid, _proc_start(pid), _boot_id(), command)
        self.file = state_dir() / "runs" / f"{self.record.id}.json"

    @property
    def id(self) -> str:
        return self.record.id

    def save(self) -> None:
        if self.record.empty():
            self.file.unlink(missing_ok=True)
            return
        self.file.parent.mkdir(parents=True, exist_ok=True)
        partial = self.file.with_suffix(".partial")
        partial.write_text(json.dumps(self.record.as_json()))
        partial.replace(self.file)

    def add_path(self, path: Path) -> None:
        self.record.paths.append(str(path.absolute()))
        self.save()

    def forget_path(self, path: Path) -> None:
        with contextlib.suppress(ValueError):
            self.record.paths.remove(str(path.absolute()))
        self.save()

    def add_process(self, pid: int) -> None:
        self.record.processes.append((pid, _proc_start(pid)))
        self.save()

    def forget_process(self, pid: int) -> None:
        self.record.processes = [p for p in self.record.processes if p[0] != pid]
        self.save()

    def container_labels(self) -> dict[str, str]:
        """Labels for a container this run is about to create; the record counts it until it is removed."""
        self.record.containers += 1
        self.save()
        return {CONTAINER_LABEL: self.id}

    def container_removed(self) -> None:
        self.record.containers = max(0, self.record.containers - 1)
        self.save()

    @contextmanager
    def building(self) -> Iterator[None]:
        """An image build: podman's working container for it cannot be labelled, so the record keeps its start
        time, and a killed build's working container is known by when it was created."""
        self.record.building_since = time.time()
        self.save()
        try:
            yield
        finally:
            self.record.building_since = None
            self.save()


_current: Run | None = None


def current() -> Run:
    """The record of this process (made on first use, so the Python API is covered as well as the CLI)."""
    global _current
    if _current is None or _current.record.pid != os.getpid():
        _current = Run("python")
    return _current


# Temporary directories and background processes ---------------------------------------------------------------


@contextmanager
def temporary_directory(prefix: str, parent: Path | None = None) -> Iterator[Path]:
    """tempfile.TemporaryDirectory, recorded: removed on leaving, or by the next run if this one is killed."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    current().add_path(path)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        current().forget_path(path)


def start_process(argv: Sequence[str], *, on_our_death: int = signal.SIGTERM, **popen: Any) -> "subprocess.Popen[Any]":
    """Popen for a background process (a service, a virtual machine) that must not outlive this run. The kernel
    sends it `on_our_death` when c2boot dies, even by SIGKILL: SIGTERM lets a service stop what it started; a
    process with nothing to save gets SIGKILL, which it cannot miss (a QEMU outlived one SIGTERM in CI)."""

    def die_with_parent() -> None:  # in the child, before exec
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, on_our_death, 0, 0, 0)

    process: subprocess.Popen[Any] = subprocess.Popen(list(argv), preexec_fn=die_with_parent, **popen)
    current().add_process(process.pid)
    return process


def _descendants(pid: int) -> list[tuple[int, int | None]]:
    """(pid, start time) of every process below `pid`."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                ppid = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
                children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append((child, _proc_start(child)))
            todo.append(child)
    return found


def stop_process(process: "subprocess.Popen[Any]", wait: float = STOP_WAIT_SECONDS) -> None:
    """SIGTERM, then SIGKILL if it has not exited after `wait` seconds; then it is off the record. What it had
    started itself and left running (a podman service killed in the middle of a build leaves the build's RUN
    step) is killed too."""
    if process.poll() is None:
        below = _descendants(process.pid)
        process.terminate()
        try:
            process.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        for pid, start in below:
            if start is not None and _proc_start(pid) == start:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
    current().forget_process(process.pid)


# Signals ------------------------------------------------------------------------------------------------------


_stopping = False


def _on_signal(signum: int, frame: FrameType | None) -> None:
    """The first signal interrupts; later ones (a second Ctrl-C) must not interrupt the cleanup it started."""
    global _stopping
    if _stopping:
        logger.warning("c2boot: still cleaning up after %s, please wait", signal.Signals(signum).name)
        return
    _stopping = True
    raise Interrupted(signum)


def ignore_stop_signals() -> None:
    """The run is over and cleaned up: a late signal must not kill it on its way out. Python gives back the
    default action (death by the signal) as it shuts down, so a second Ctrl-C that came 0.2 s after the first
    turned exit 130 into a death by SIGINT; ignored signals stay ignored."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


def handle_signals() -> None:
    """SIGTERM and SIGHUP (a cancelled CI job, `timeout`, a closed terminal) stop the run like Ctrl-C."""
    global _stopping
    _stopping = False
    for signum in STOP_SIGNALS:
        signal.signal(signum, _on_signal)


# Cleaning up --------------------------------------------------------------------------------------------------


def _stop_pid(pid: int, start: int | None) -> bool:
    """Stop a recorded process if it is still the same process; True when one was stopped."""
    if start is None or _proc_start(pid) != start:
        return False
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_WAIT_SECONDS
        while _proc_start(pid) == start and time.monotonic() < deadline:
            time.sleep(0.1)
        if _proc_start(pid) == start:
            os.kill(pid, signal.SIGKILL)
    return True


def _remove_containers(run_id: str) -> int:
    """Remove the containers labelled with `run_id`; how many there were."""
    from container2boot.run import run  # run() logs through log.py only; imported late to keep this module light

    if shutil.which("podman") is None:
        return 0
    listed = run(["podman", "ps", "--all", "--quiet", "--filter", f"label={CONTAINER_LABEL}={run_id}"],
                 capture=True, check=False)
    ids = listed.stdout.split()
    if ids:
        run(["podman", "rm", "--force", "--time", "0", *ids], check=False)
    return len(ids)


def _remove_working_containers(since: float, until: float) -> int:
    """Remove image builds' working containers created between `since` and `until` (a killed build's)."""
    from container2boot.run import run

    if shutil.which("podman") is None:
        return 0
    listed = run(["podman", "ps", "--all", "--external", "--format", "json"], capture=True, check=False)
    try:
        containers = json.loads(listed.stdout or "[]") or []
    except ValueError:
        return 0
    ids = [c["Id"] for c in containers
           if c.get("State") == "storage" and since - 1 <= float(c.get("Created", 0)) < until]
    if ids:
        run(["podman", "rm", "--force", *ids], check=False)
        _kill_run_steps(ids)
    return len(ids)


def _kill_run_steps(container_ids: list[str]) -> None:
    """A RUN step of a killed build can outlive the podman service that ran it: it is the first process of its
    own PID namespace, with its working container's short id as HOSTNAME. Killing it ends the whole step."""
    hostnames = {f"HOSTNAME={i[:12]}".encode() for i in container_ids}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if entry.stat().st_uid != os.getuid() or not hostnames & set((entry / "environ").read_bytes().split(b"\0")):
                continue
            nspids = next(line for line in (entry / "status").read_text().splitlines() if line.startswith("NSpid:"))
            if nspids.split()[-1] == "1":
                os.kill(int(entry.name), signal.SIGKILL)


def clean(record: Record, others_building_since: float = float("inf")) -> dict[str, int]:
    """Remove what `record` lists: processes first (they may still write), then containers, then directories.
    Working containers created after `others_building_since` may belong to a running build: they stay."""
    stopped = sum(_stop_pid(pid, start) for pid, start in record.processes)
    containers = _remove_containers(record.id) if record.containers else 0
    if record.building_since is not None:
        containers += _remove_working_containers(record.building_since, others_building_since)
    directories = 0
    for path in record.paths:
        if os.path.lexists(path):
            shutil.rmtree(path, ignore_errors=True)
            directories += 1
    return {"process": stopped, "container": containers, "temporary directory": directories}


PLURALS = {"process": "processes", "container": "containers", "temporary directory": "temporary directories"}


def describe(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {what if n == 1 else PLURALS[what]}" for what, n in counts.items() if n)


def clean_leftovers() -> None:
    """Remove what killed runs of this user left behind, with one line for each such run."""
    runs = state_dir() / "runs"
    records: dict[Path, Record] = {}
    for file in sorted(runs.glob("*.json")) if runs.is_dir() else []:
        try:
            records[file] = Record.from_json(json.loads(file.read_text()))
        except (OSError, ValueError, KeyError, TypeError):
            file.unlink(missing_ok=True)  # unreadable: not ours
    alive = {file for file, record in records.items() if record.pid == os.getpid() or record.alive()}
    others_building = min((r.building_since for f, r in records.items() if f in alive and r.building_since),
                          default=float("inf"))
    for file, record in records.items():
        if file in alive:
            continue
        counts = clean(record, others_building)
        file.unlink(missing_ok=True)
        if any(counts.values()):
            logger.info("c2boot: removed what an interrupted `c2boot %s` (pid %d) left behind: %s",
                        record.command, record.pid, describe(counts))


@contextmanager
def command(name: str) -> Iterator[Run]:
    """One CLI command: signals handled, leftovers of killed runs removed first, and whatever is still on this
    run's record when it ends (after an interruption that hit a cleanup half-way) removed last."""
    global _current
    handle_signals()
    _current = Run(name)
    clean_leftovers()
    try:
        yield _current
    finally:
        if not _current.record.empty():
            clean(_current.record)
            _current.record = Record(_current.record.pid, _current.record.start, _current.record.boot_id, name)
            _current.save()
