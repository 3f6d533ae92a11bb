"""Getting into the booted machine: SSH keys, a login user with a password, a hostname, and the identity every
copy of an image must not share (machine-id, SSH host keys).

Everything here is checked and decided before the slow steps, from the settings and the image's report; the files
themselves are written by accounts.add_access into the tree the build adds to the root (the image never changes).
"""

import base64
import binascii
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from container2boot.config import Config
from container2boot.errors import C2BootError
from container2boot.rootfs import Report

KEY_TYPES = ("ssh-ed25519", "ssh-rsa", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp521",
             "sk-ssh-ed25519@openssh.com", "sk-ecdsa-sha2-nistp256@openssh.com", "ssh-dss")
MAX_KEY_FILE_BYTES = 256 * 1024
USER_NAME = re.compile(r"[a-z_][a-z0-9_-]{0,31}")
FIRST_UID, LAST_UID = 1000, 59999  # the range useradd gives normal users
SHELLS = ("bin/bash", "bin/sh", "usr/bin/bash", "usr/bin/sh")
CRYPT_HASH = re.compile(r"\$(1|5|6|y|gy|7|2[abxy])\$[./A-Za-z0-9$=,]+")
HOST_KEYS = re.compile(r"etc/ssh/ssh_host_[a-z0-9]+_key(\.pub)?")
MACHINE_IDS = ("etc/machine-id", "var/lib/dbus/machine-id")


def parse_secret(spec: str, option: str = "--secret") -> tuple[str, Path]:
    """`id=ID,src=PATH` (podman's --secret syntax) -> (ID, absolute PATH), checked to be a readable file."""
    fields = dict(part.partition("=")[::2] for part in spec.split(","))
    if not fields.get("id") or not fields.get("src"):
        raise C2BootError(f"{option} {spec!r}: write it as id=ID,src=PATH")
    src = Path(fields["src"]).expanduser().absolute()
    if not src.is_file():
        raise C2BootError(f"{option} {spec!r}: {src} is not a readable file")
    return fields["id"], src


def read_text_file(path: Path, what: str, limit: int = MAX_KEY_FILE_BYTES) -> str:
    """A small text file the user names, or a one-line error that says what is wrong with it."""
    if path.is_dir() or (path.exists() and not path.is_file()):
        raise C2BootError(f"{what} {path} is not a regular file")
    try:
        with path.open("rb") as f:
            data = f.read(limit + 1)
    except FileNotFoundError:
        raise C2BootError(f"{what} {path} not found") from None
    except OSError as e:
        raise C2BootError(f"{what} {path} cannot be read: {e.strerror}") from None
    if len(data) > limit:
        raise C2BootError(f"{what} {path} is larger than {limit // 1024} KiB: is it the right file?")
    try:
        return data.decode()
    except UnicodeDecodeError:
        raise C2BootError(f"{what} {path} is not text") from None


def check_public_key(line: str) -> str:
    """One authorized_keys line 'TYPE BASE64 [comment]' whose blob names its own type; returns it normalised."""
    fields = line.split(None, 2)
    if len(fields) < 2 or fields[0] not in KEY_TYPES:
        raise ValueError(f"not a public key (it should start with one of {', '.join(KEY_TYPES[:3])}, ...)")
    try:
        blob = base64.b64decode(fields[1], validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("its key is not valid base64") from None
    length = int.from_bytes(blob[:4], "big")
    if blob[4:4 + length].decode(errors="replace") != fields[0]:
        raise ValueError(f"its key data is not a {fields[0]} key")
    return " ".join(fields)


def read_public_keys(path: Path) -> tuple[str, ...]:
    """The keys of a public key file (one per line; blank lines and # comments allowed)."""
    text = read_text_file(path, "--ssh-key")
    if "PRIVATE KEY" in text:
        raise C2BootError(f"--ssh-key {path} is a private key: pass the public one ({path}.pub), never the private "
                          "key")
    keys = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            keys.append(check_public_key(line.strip()))
        except ValueError as e:
            raise C2BootError(f"--ssh-key {path}, line {number}: {e}; pass a file of OpenSSH public keys, one "
                              "per line (e.g. ~/.ssh/id_ed25519.pub)") from None
    if not keys:
        raise C2BootError(f"--ssh-key {path} has no key: pass a file of OpenSSH public keys (e.g. "
                          "~/.ssh/id_ed25519.pub)")
    return tuple(keys)


def read_password(spec: str) -> str:
    """The password (or crypt hash) from --password-secret's file: its first line, not empty."""
    _, src = parse_secret(spec, "--password-secret")
    lines = read_text_file(src, "--password-secret file").splitlines()
    if not lines or not lines[0]:
        raise C2BootError(f"--password-secret file {src} is empty: write the password (or a crypt hash) on its "
                          "first line")
    return lines[0]


def is_crypt_hash(password: str) -> bool:
    return CRYPT_HASH.fullmatch(password) is not None


@dataclass(frozen=True)
class LoginUser:
    """The user --ssh-key, --password-secret and --groups apply to (root without --user)."""

    name: str
    uid: int
    gid: int
    home: str
    shell: str
    groups: tuple[str, ...] = ()
    created: bool = False  # the image lacks it: the build adds it to passwd, group, shadow and gshadow
    home_path: str = ""  # where the home is in the image, links followed (/root -> var/roothome on ostree images)

    def in_home(self, name: str) -> str:
        """A path under the home, relative to the image root (a home of / gives just `name`)."""
        return "/".join(part for part in (self.home_path, name) if part)


@dataclass(frozen=True)
class Access:
    """What the build writes into the root so that its owner can get in, and what it resets."""

    user: LoginUser
    authorized_keys: tuple[str, ...] = ()
    password: bool = False  # the hash is made from --password-secret when the files are written
    hostname: str | None = None
    cloud_init: bool = False  # --cloud-init embedded as the root's NoCloud seed
    reset_machine_id: tuple[str, ...] = ()  # the image's machine-id files, emptied or left out
    reset_host_keys: tuple[str, ...] = ()  # the image's SSH host keys, left out (regenerated at first boot)
    kept_host_keys: bool = False  # the image has host keys, but nothing would make new ones at boot

    @property
    def changes_accounts(self) -> bool:
        return self.user.created or bool(self.user.groups) or self.password

    def describe(self) -> list[str]:
        """What the build does, for the progress lines."""
        lines = []
        who = self.user.name + (" (new user)" if self.user.created else "")
        if self.authorized_keys:
            lines.append(f"{len(self.authorized_keys)} SSH key(s) may log in as {who}")
        if self.password:
            lines.append(f"{self.user.name}'s password is set from --password-secret (only its hash is stored)")
        if self.user.groups:
            lines.append(f"{self.user.name} is in {', '.join(self.user.groups)}")
        if self.hostname:
            lines.append(f"hostname {self.hostname}")
        if self.cloud_init:
            lines.append("cloud-init user-data embedded as the NoCloud seed")
        reset = [f"/{p}" for p in self.reset_machine_id]
        if self.reset_host_keys:
            reset.append(f"{len(self.reset_host_keys)} SSH host key files (new ones are made at first boot)")
        if reset:
            lines.append(f"reset so that every machine is unique: {', '.join(reset)}")
        if self.kept_host_keys:
            lines.append("kept the image's SSH host keys: nothing would make new ones at boot (that needs systemd "
                         "and ssh-keygen)")
        return lines

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["authorized_keys"] = len(self.authorized_keys)  # count only: the manifest need not carry them
        return data


def next_free(used: set[int], start: int = FIRST_UID) -> int:
    candidate = start
    while candidate in used:
        candidate += 1
    if candidate > LAST_UID:
        raise C2BootError(f"no free id between {FIRST_UID} and {LAST_UID} in the image")
    return candidate


def login_user(report: Report, config: Config) -> LoginUser:
    """root, or --user: the image's own, or a new one with its own group, a home and a shell."""
    groups = tuple(g for g in (config.groups or "").replace(" ", "").split(",") if g)
    known_groups = {f[0]: f for line in report.group.splitlines() if len(f := line.split(":")) >= 3}
    if missing := [g for g in groups if g not in known_groups]:
        raise C2BootError(f"group {missing[0]!r} is not in the image's /etc/group: add it to the image, or leave it "
                          f"out of --groups (groups: {', '.join(sorted(known_groups)[:10]) or 'none'})")
    name = config.user or "root"
    passwd = {f[0]: f for line in report.passwd.splitlines() if len(f := line.split(":")) >= 7}
    if name in passwd:
        entry = passwd[name]
        home = entry[5] or "/"
        return LoginUser(name, int(entry[2]), int(entry[3]), home, entry[6], groups, home_path=in_image(report, home))
    if name == "root":  # an image without a passwd entry for it still runs as root
        return LoginUser("root", 0, 0, "/root", "/bin/sh", groups, home_path=in_image(report, "/root"))
    if not USER_NAME.fullmatch(name):
        raise C2BootError(f"--user {name!r} is not a user name to create: use lowercase letters, digits, '-' and "
                          "'_', starting with a letter (at most 32)")
    if not passwd:
        raise C2BootError(f"--user {name}: the image has no /etc/passwd to add the user to")
    uid = next_free({int(f[2]) for f in passwd.values() if f[2].isdigit()})
    gids = {int(f[2]) for f in known_groups.values() if f[2].isdigit()}
    gid = int(known_groups[name][2]) if name in known_groups else uid if uid not in gids else next_free(gids)
    shell = next((f"/{s}" for s in SHELLS if report.tree.is_file(s)), "/bin/sh")
    home = f"/home/{name}"
    if report.tree.entry(home) is not None:
        raise C2BootError(f"--user {name}: the image has no such user but has {home} already: add the user to the "
                          "image, or choose another name")
    return LoginUser(name, uid, gid, home, shell, groups, created=True, home_path=in_image(report, home))


def in_image(report: Report, path: str) -> str:
    """`path` as it is in the image, the links of its existing parents followed (/home -> var/home): where files
    under it must go, so that the added tree never puts a directory where the image has a link."""
    path = path.strip("/")
    if not path or (resolved := report.tree.resolve(path)) is not None:
        return path if not path else str(resolved)
    parent, _, name = path.rpartition("/")
    return "/".join(part for part in (in_image(report, parent), name) if part)


def check_editable(report: Report, paths: list[str]) -> None:
    """The image files the build rewrites must be regular files (or absent): a link would be replaced by a file,
    or its target's content lost."""
    for path in paths:
        entry = report.tree.entries.get(path)
        if entry is not None and entry.kind != "file":
            kind = "a symbolic link" if entry.kind == "link" else "not a regular file"
            raise C2BootError(f"the image's /{path} is {kind}, and setting up logins rewrites it: make it a regular "
                              "file in the image, or leave out the option that changes it")


def identity_files(report: Report) -> tuple[tuple[str, ...], tuple[str, ...], bool]:
    """The image's machine-id files with an id in them, its SSH host keys that can be reset (a systemd image with
    ssh-keygen makes new ones at boot, with container2boot's unit), and whether host keys had to be kept."""
    machine_ids = tuple(p for p in MACHINE_IDS if (entry := report.tree.entry(p)) is not None and
                        entry.kind == "file" and entry.size > 0 and report.tree.resolve(p) == p)
    host_keys = tuple(sorted(p for p in report.tree.entries if HOST_KEYS.fullmatch(p)))
    if host_keys and (report.init != "systemd" or not report.tree.is_file("usr/bin/ssh-keygen")):
        return machine_ids, (), True
    return machine_ids, host_keys, False


def decide(report: Report, config: Config) -> Access:
    """The access settings checked against the image: keys readable, user and groups possible, password file
    there; bad input fails here, before any slow step."""
    keys = tuple(key for path in config.ssh_keys for key in read_public_keys(path))
    if config.password_secret is not None:
        read_password(config.password_secret)
        if not report.tree.is_file("etc/shadow"):
            raise C2BootError(f"--password-secret: {report.name} has no /etc/shadow to hold the password's hash: add "
                              "the passwd package (shadow-utils) to the image, or log in with --ssh-key")
    if config.cloud_init is not None and not report.cloud_init:
        raise C2BootError(f"--cloud-init embeds a NoCloud seed for cloud-init, and {report.name} has no cloud-init: "
                          "add the cloud-init package to the image, or give the seed at boot time (`c2boot run OUT "
                          "--cloud-init FILE`)")
    machine_ids, host_keys, kept = identity_files(report)
    user = login_user(report, config)
    found = Access(user, keys, config.password_secret is not None, config.hostname, config.cloud_init is not None,
                   machine_ids, host_keys, kept)
    edited = [*(["etc/passwd", "etc/group", "etc/shadow", "etc/gshadow"] if found.changes_accounts else []),
              *(["etc/hostname"] if config.hostname else []),
              *([user.in_home(".ssh/authorized_keys")] if keys else [])]
    check_editable(report, edited)
    if keys and (entry := report.tree.entries.get(user.in_home(".ssh"))) is not None and entry.kind != "dir":
        raise C2BootError(f"the image's {user.home}/.ssh is not a directory: make it one, or log in as another user")
    return found
