"""What an image is and what a build supplies, decided once from the inspection report, the image's own
configuration and the settings, before any slow step. Every later stage reads the plan; none decides again.

The four kinds of image:
- machine: its own kernel, its own dracut (able to make the initrd the layout needs) and an init: booted as it is.
- own-kernel: its own kernel and init, but no dracut that can do the job (initramfs-tools, mkinitcpio, none): the
  supplied kernel image's dracut makes the initrd for the image's kernel from the image's modules.
- userland: an init system but no kernel: the supplied kernel, its initrd, and its modules added to the root.
- app: no init system (or `--app`): the supplied kernel, and container2boot's init runs the image's configured
  command the way `podman run` does.
"""

import dataclasses
import json
import posixpath
import re
import shlex
from dataclasses import asdict, dataclass
from typing import Any

from container2boot import access, selinux
from container2boot.access import Access
from container2boot.config import Config
from container2boot.errors import C2BootError
from container2boot.rootfs import Report
from container2boot.selinux import SELinux

KINDS = ("machine", "own-kernel", "userland", "app")
KIND_NAMES = {"machine": "complete machine image", "own-kernel": "machine image without a usable initrd maker",
              "userland": "userland without a kernel", "app": "application image"}
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"  # Docker's, when the image has none
DEFAULT_STOP_SIGNAL = "SIGTERM"
SIGNALS = ("HUP", "INT", "QUIT", "KILL", "USR1", "USR2", "TERM", "WINCH", "PWR", "STOP", "CONT")
ARCHITECTURES = {"amd64": "x86_64", "x86_64": "x86_64", "arm64": "aarch64", "aarch64": "aarch64",
                 "386": "i386", "arm": "arm", "ppc64le": "ppc64", "s390x": "s390x", "riscv64": "riscv64"}
MACHINE_ARCHITECTURE = "x86_64"
MAX_ID = 2**32 - 2  # the largest uid/gid Linux gives out


@dataclass(frozen=True)
class ImageConfig:
    """The parts of the OCI image configuration that say how the image runs (as `podman image inspect` shows)."""

    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    env: tuple[str, ...] = ()
    working_dir: str = ""
    user: str = ""
    stop_signal: str = ""
    architecture: str | None = None

    @classmethod
    def from_inspect(cls, attrs: dict[str, Any]) -> "ImageConfig":
        config = attrs.get("Config") or {}
        return cls(tuple(config.get("Entrypoint") or ()), tuple(config.get("Cmd") or ()),
                   tuple(config.get("Env") or ()), config.get("WorkingDir") or "", config.get("User") or "",
                   config.get("StopSignal") or "", attrs.get("Architecture"))

    def as_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "ImageConfig":
        data = json.loads(text)
        return cls(tuple(data.get("entrypoint", ())), tuple(data.get("cmd", ())), tuple(data.get("env", ())),
                   data.get("working_dir", ""), data.get("user", ""), data.get("stop_signal", ""),
                   data.get("architecture"))


@dataclass(frozen=True)
class App:
    """What container2boot's init runs, resolved as `podman run` would."""

    command: tuple[str, ...]
    env: tuple[str, ...]  # KEY=VALUE, in order; later ones win
    workdir: str
    user: str  # as given: a name from the image's passwd, or uid[:gid]; "" is root
    uid: int
    gid: int
    home: str
    stop_signal: str

    @property
    def shell_command(self) -> str:
        return shlex.join(self.command)

    @property
    def who(self) -> str:
        if not self.user:
            return "root"
        return f"{self.user} (uid {self.uid}, gid {self.gid})" if not self.user[0].isdigit() else \
            f"uid {self.uid}, gid {self.gid}"


@dataclass(frozen=True)
class Plan:
    """The decisions every stage follows."""

    kind: str  # one of KINDS
    kernel_version: str  # the kernel that boots
    kernel: str  # "image" or "supplied"
    initrd: str  # "image": the image's dracut makes it; "supplied": the kernel image's dracut does
    init: str  # "image" or "app"
    app: App | None = None
    access: Access | None = None  # a machine's (not an app's): keys, user, hostname, what is reset
    selinux: SELinux | None = None  # None: the image has no policy, and --selinux is auto

    @property
    def supplies_kernel(self) -> bool:
        return self.kernel == "supplied"

    @property
    def uses_supplied_dracut(self) -> bool:
        return self.initrd == "supplied"

    def with_kernel_version(self, version: str) -> "Plan":
        """The plan with the supplied kernel's version filled in, once the kernel image has been read."""
        return dataclasses.replace(self, kernel_version=version)

    def describe(self) -> str:
        """One line for `c2boot inspect` and the build's progress."""
        kernel = f"{'a supplied' if self.supplies_kernel else 'its own'} kernel {self.kernel_version}".rstrip()
        if self.app is not None:
            return f"{KIND_NAMES[self.kind]}: will run `{self.app.shell_command}` as {self.app.who} with {kernel}"
        if self.kind == "machine":
            return f"{KIND_NAMES[self.kind]}: boots as it is, with {kernel}, its dracut and its init"
        if self.kind == "own-kernel":
            return f"{KIND_NAMES[self.kind]}: boots {kernel} and its init; the supplied dracut makes the initrd"
        return f"{KIND_NAMES[self.kind]}: boots its init with {kernel} and its modules"

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["description"] = self.describe()
        data["access"] = self.access.as_json() if self.access else None
        return data


def normalise_architecture(name: str | None) -> str | None:
    return None if name is None else ARCHITECTURES.get(name, name)


def check_architecture(report: Report, image: ImageConfig) -> None:
    found = normalise_architecture(report.architecture or image.architecture)
    if found is not None and found != MACHINE_ARCHITECTURE:
        raise C2BootError(f"{report.name} is built for {found}, and container2boot makes {MACHINE_ARCHITECTURE} "
                          "machines: use the image's x86_64 (amd64) variant, e.g. `podman pull --arch amd64 IMAGE`")


def split_command(text: str) -> tuple[str, ...]:
    """--cmd/--entrypoint as podman takes them: a JSON array, or a command line split like a shell would."""
    if text.lstrip().startswith("["):
        try:
            value = json.loads(text)
        except ValueError:
            value = None
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise C2BootError(f"{text!r} is not a JSON array of strings: write e.g. '[\"nginx\", \"-g\", "
                              "\"daemon off;\"]' or nginx -g 'daemon off;'")
        return tuple(value)
    try:
        return tuple(shlex.split(text))
    except ValueError as e:
        raise C2BootError(f"cannot split {text!r} into words ({e}): check its quotes") from None


def app_command(image: ImageConfig, config: Config) -> tuple[str, ...]:
    """ENTRYPOINT + CMD; as with `podman run`, a new entrypoint drops the image's CMD."""
    entrypoint = split_command(config.entrypoint) if config.entrypoint is not None else image.entrypoint
    if config.cmd is not None:
        return (*entrypoint, *split_command(config.cmd))
    return entrypoint if config.entrypoint is not None else (*entrypoint, *image.cmd)


def app_env(image: ImageConfig, config: Config) -> tuple[str, ...]:
    env = list(image.env)
    if not any(e.startswith("PATH=") for e in env):
        env.insert(0, f"PATH={DEFAULT_PATH}")
    for item in config.env:
        if "=" not in item or item.startswith("="):
            raise C2BootError(f"--env {item!r}: write it as KEY=VALUE")
        env.append(item)
    return tuple(env)


def home_of(report: Report, uid: int) -> str:
    """The user's home from the image's passwd, else / (as podman sets HOME)."""
    entry = next((f for line in report.passwd.splitlines() if len(f := line.split(":")) >= 6 and f[2] == str(uid)),
                 None)
    return entry[5] if entry and entry[5] else "/"


def lookup_user(report: Report, user: str) -> tuple[int, int]:
    """uid and gid for `user`: a name (or name:group) from the image's passwd and group, or numeric uid[:gid]."""
    if not user:
        return 0, 0
    name, _, group = user.partition(":")
    for part in (name, group):
        if re.fullmatch(r"[0-9]+", part) and int(part) > MAX_ID:
            raise C2BootError(f"--user {user!r}: ids go up to {MAX_ID}")
    passwd = {f[0]: f for line in report.passwd.splitlines() if len(f := line.split(":")) >= 4}
    groups = {f[0]: f for line in report.group.splitlines() if len(f := line.split(":")) >= 3}
    if re.fullmatch(r"[0-9]+", name):
        uid = int(name)
        entry = next((f for f in passwd.values() if f[2] == name), None)
        gid = int(entry[3]) if entry else 0  # as podman: a uid without a passwd entry runs with gid 0
    elif name in passwd:
        uid, gid = int(passwd[name][2]), int(passwd[name][3])
    else:
        known = ", ".join(sorted(passwd)[:8]) or "none: use a numeric uid[:gid]"
        raise C2BootError(f"user {name!r} is not in the image's /etc/passwd (users: {known})")
    if group:
        if re.fullmatch(r"[0-9]+", group):
            gid = int(group)
        elif group in groups:
            gid = int(groups[group][2])
        else:
            raise C2BootError(f"group {group!r} is not in the image's /etc/group: use a numeric gid")
    return uid, gid


def find_command(report: Report, command: str, env: tuple[str, ...], workdir: str) -> bool:
    """Whether the image has the program, as execvp would find it (PATH from the app's environment)."""
    if "/" in command:
        return report.tree.is_file(posixpath.join(workdir or "/", command))
    path = next((e.partition("=")[2] for e in reversed(env) if e.startswith("PATH=")), DEFAULT_PATH)
    return any(report.tree.is_file(posixpath.join(d or ".", command)) for d in path.split(":"))


def decide_app(report: Report, image: ImageConfig, config: Config) -> App:
    command = app_command(image, config)
    if not command:
        raise C2BootError(f"nothing to run: {report.name} has no init system and neither ENTRYPOINT nor CMD: pass "
                          "--cmd (e.g. --cmd /bin/sh)")
    env = app_env(image, config)
    workdir = config.workdir if config.workdir is not None else (image.working_dir or "/")
    if not workdir.startswith("/"):
        raise C2BootError(f"--workdir {workdir!r} must be an absolute path")
    user = config.user if config.user is not None else image.user
    uid, gid = lookup_user(report, user)
    if not find_command(report, command[0], env, workdir):
        raise C2BootError(f"the app's command {command[0]!r} is not in the image (looked in its PATH and "
                          f"{workdir}): pass --cmd or --entrypoint with a program the image has")
    signal = (image.stop_signal or DEFAULT_STOP_SIGNAL).upper()
    signal = signal if signal.startswith("SIG") or signal.isdigit() else f"SIG{signal}"
    if signal.removeprefix("SIG") not in SIGNALS and not signal.isdigit():
        raise C2BootError(f"the image's STOPSIGNAL {image.stop_signal!r} is not a signal this init knows: use a "
                          f"number or one of {', '.join(SIGNALS)}")
    return App(command, env, workdir, user, uid, gid, home_of(report, uid), signal)


def decide(report: Report, image: ImageConfig, config: Config) -> Plan:
    """The plan for `report`'s image. A supplied kernel's version is filled in (with_kernel_version) once the
    kernel image has been read; until then the plan names none."""
    check_architecture(report, image)
    app_mode = config.app or report.init == "none"
    overrides = [flag for flag, value in (("--entrypoint", config.entrypoint), ("--cmd", config.cmd),
                                          ("--env", config.env or None), ("--workdir", config.workdir))
                 if value is not None]
    if overrides and not app_mode:
        raise C2BootError(f"{overrides[0]} configures an application image's command, and {report.name} boots its "
                          f"own init ({report.init}): add --app to run the command instead of the init")
    machine_only = [flag for flag, value in (("--ssh-key", config.ssh_keys or None), ("--groups", config.groups),
                                             ("--password-secret", config.password_secret),
                                             ("--cloud-init", config.cloud_init)) if value is not None]
    if machine_only and app_mode:
        raise C2BootError(f"{machine_only[0]} sets up logins of a machine, and {report.name} is run as an "
                          "application image (its command, no logins): drop it")
    plan = decide_kind(report, image, config, app_mode)
    security = selinux.decide(config.selinux, report.selinux_policy, report.selinux_mode, report.name,
                              boots_own_init=not app_mode,
                              installed_fstype=config.rootfs_type if config.layout == "installed" else None)
    plan = dataclasses.replace(plan, selinux=security)
    return plan if app_mode else dataclasses.replace(plan, access=access.decide(report, config))


def decide_kind(report: Report, image: ImageConfig, config: Config, app_mode: bool) -> Plan:
    """What kind of image `report`'s is, and so what the build supplies."""
    broken = [k for k in report.kernels if k.image is not None and not k.has_modules]
    if report.kernel is None and broken and not config.supplied_kernel:
        raise C2BootError(f"{report.name} has kernel {broken[0].version} (/{broken[0].image}) but no modules "
                          f"directory /usr/lib/modules/{broken[0].version}: add its modules to the image, or pass "
                          "--supplied-kernel to boot the supplied kernel instead")
    own = report.kernel if not config.supplied_kernel else None
    if own is not None and own.image is not None and report.initrd_ready(config.layout, config.netboot) \
            and not app_mode:
        return Plan("machine", own.version, "image", "image", "image")
    if app_mode:
        app = decide_app(report, image, config)
        return Plan("app", "", "supplied", "supplied", "app", app)
    if own is not None:
        return Plan("own-kernel", own.version, "image", "supplied", "image")
    return Plan("userland", "", "supplied", "supplied", "image")
