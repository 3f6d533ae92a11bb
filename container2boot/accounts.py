"""Writes what access.Access decided into the tree the build adds to the root: the login user in passwd, group,
shadow and gshadow, its authorized_keys and password hash, the hostname, the cloud-init seed, and the reset
identity (an empty machine-id, no SSH host keys, a unit that makes new ones at first boot).

Files the image has are read from its root, changed and written whole into the added tree; the image's own copies
are left out of the bootable root (returned as `left_out`). Owners are set by number, so this runs as root of a
user namespace (the rootbuilder container).
"""

import os
import shutil
from pathlib import Path

from container2boot import seed
from container2boot.access import Access, LoginUser, is_crypt_hash, read_password
from container2boot.config import Config
from container2boot.errors import C2BootError
from container2boot.run import run
from container2boot.templates import render_to

HOST_KEY_UNIT = "c2boot-ssh-host-keys.service"
HOST_KEY_WANTED_BY = ("multi-user.target", "ssh.service", "sshd.service")
NOCLOUD_SEED = "var/lib/cloud/seed/nocloud"


class Writer:
    """Adds files to `tree` for the image root `root`, remembering which of the image's files they replace."""

    def __init__(self, root: Path, tree: Path) -> None:
        self.root = root
        self.tree = tree
        self.left_out: list[str] = []

    def original(self, path: str) -> str | None:
        """The image's text of `path` (a regular file), if it has one."""
        source = self.root / path
        if source.is_symlink() or not source.is_file():
            return None
        return source.read_text(errors="surrogateescape")

    def inside(self, path: str) -> Path:
        """`path` in the added tree; never outside it (a home from the image's passwd decides some paths)."""
        target = self.tree / path
        if path.startswith("/") or not target.resolve().is_relative_to(self.tree.resolve()):
            raise C2BootError(f"/{path.lstrip('/')} is outside the root: check the user's home in the image's passwd")
        return target

    def write(self, path: str, text: str, mode: int, owner: tuple[int, int] | None = None) -> None:
        """`path` with `text`; the owner and mode of the image's file when it has one, else `owner` and `mode`."""
        target = self.inside(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text, errors="surrogateescape")
        source = self.root / path
        if source.is_file() and not source.is_symlink():
            st = source.stat()
            mode, owner = st.st_mode & 0o7777, (st.st_uid, st.st_gid)
        chown(target, owner or (0, 0))
        target.chmod(mode)
        self.leave_out(path)

    def mkdir(self, path: str, mode: int, owner: tuple[int, int]) -> None:
        target = self.inside(path)
        target.mkdir(parents=True, exist_ok=True)
        chown(target, owner)
        target.chmod(mode)

    def leave_out(self, path: str) -> None:
        if (self.root / path).exists() or (self.root / path).is_symlink():
            self.left_out.append(path)


def chown(path: Path, owner: tuple[int, int]) -> None:
    try:
        os.lchown(path, *owner)
    except PermissionError:
        raise C2BootError(f"cannot give {path.name} to uid {owner[0]}: setting up logins needs the rootbuilder "
                          "container (`c2boot build`) or root") from None


def password_hash(spec: str) -> str:
    """A crypt hash for /etc/shadow: the secret's own if it is one, else SHA-512 crypt of it (openssl)."""
    password = read_password(spec)
    if is_crypt_hash(password):
        return password
    return run(["openssl", "passwd", "-6", "-stdin"], input=password + "\n", capture=True).stdout.strip()


def append_members(lines: list[str], groups: tuple[str, ...], name: str, members_field: int) -> list[str]:
    """group/gshadow lines with `name` added to the member list of each of `groups`."""
    result = []
    for line in lines:
        fields = line.split(":")
        if fields[0] in groups and len(fields) > members_field:
            members = [m for m in fields[members_field].split(",") if m]
            if name not in members:
                fields[members_field] = ",".join([*members, name])
        result.append(":".join(fields))
    return result


def write_accounts(writer: Writer, user: LoginUser, hashed: str | None) -> None:
    """passwd, group, shadow, gshadow with the new user, its groups and its password."""
    passwd = (writer.original("etc/passwd") or "").splitlines()
    group = (writer.original("etc/group") or "").splitlines()
    shadow = writer.original("etc/shadow")
    gshadow = None if (text := writer.original("etc/gshadow")) is None else text.splitlines()
    if user.created:
        passwd.append(f"{user.name}:x:{user.uid}:{user.gid}::{user.home}:{user.shell}")
        writer.write("etc/passwd", "\n".join(passwd) + "\n", 0o644)
        if not any(line.split(":")[0] == user.name for line in group):
            group.append(f"{user.name}:x:{user.gid}:")
            if gshadow is not None:
                gshadow.append(f"{user.name}:!::")
    if user.created or user.groups:
        writer.write("etc/group", "\n".join(append_members(group, user.groups, user.name, 3)) + "\n", 0o644)
        if gshadow is not None:
            writer.write("etc/gshadow", "\n".join(append_members(gshadow, user.groups, user.name, 3)) + "\n", 0o640)
    if shadow is not None and (user.created or hashed):
        lines = shadow.splitlines()
        # "*": no password, but not locked: sshd without PAM refuses even keys to a "!" (locked) account.
        entry = f"{user.name}:{hashed or '*'}::0:99999:7:::"
        for index, line in enumerate(lines):
            if line.split(":")[0] == user.name:
                fields = line.split(":")
                fields[1] = hashed or fields[1]
                lines[index] = ":".join(fields)
                break
        else:
            lines.append(entry)
        writer.write("etc/shadow", "\n".join(lines) + "\n", 0o640)
    elif hashed:
        raise C2BootError("the image has no /etc/shadow for the password: add the passwd package (shadow-utils), "
                          "or log in with --ssh-key")


def write_home(writer: Writer, user: LoginUser, keys: tuple[str, ...]) -> None:
    """A new user's home (from /etc/skel), and the authorized_keys of the user's .ssh."""
    owner = (user.uid, user.gid)
    home = user.home_path
    if user.created:
        writer.mkdir(home, 0o700, owner)
        skel = writer.root / "etc/skel"
        for item in sorted(skel.iterdir()) if skel.is_dir() else []:
            if item.is_file() and not item.is_symlink():
                shutil.copyfile(item, writer.tree / home / item.name)
                chown(writer.tree / home / item.name, owner)
    if keys:
        writer.mkdir(user.in_home(".ssh"), 0o700, owner)
        existing = writer.original(user.in_home(".ssh/authorized_keys")) or ""
        text = existing + ("" if existing.endswith("\n") or not existing else "\n") + "\n".join(keys) + "\n"
        writer.write(user.in_home(".ssh/authorized_keys"), text, 0o600, owner)


def write_identity_reset(writer: Writer, access: Access) -> None:
    """An empty machine-id (systemd makes one per machine at boot), no SSH host keys, and the unit that makes this
    machine's own before sshd starts."""
    for path in access.reset_machine_id:
        if path == "etc/machine-id":
            writer.write(path, "", 0o444)
        else:
            writer.leave_out(path)
    for path in access.reset_host_keys:
        writer.leave_out(path)
    if access.reset_host_keys:
        unit = f"etc/systemd/system/{HOST_KEY_UNIT}"
        render_to(writer.tree / unit, "ssh-host-keys.service.j2").chmod(0o644)
        for target in HOST_KEY_WANTED_BY:
            link = writer.tree / f"etc/systemd/system/{target}.wants/{HOST_KEY_UNIT}"
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(f"/{unit}")


def add_access(root: Path, tree: Path, access: Access, config: Config) -> list[str]:
    """Write `access` into `tree` for the image root `root`; returns the image's paths the tree replaces or that
    are reset (left out of the bootable root)."""
    writer = Writer(root, tree)
    hashed = password_hash(config.password_secret) if access.password and config.password_secret else None
    if access.changes_accounts:
        write_accounts(writer, access.user, hashed)
    if access.user.created or access.authorized_keys:
        write_home(writer, access.user, access.authorized_keys)
    if access.hostname:
        writer.write("etc/hostname", access.hostname + "\n", 0o644)
    if access.cloud_init and config.cloud_init is not None:
        user_data = seed.read_user_data(config.cloud_init)
        writer.mkdir(NOCLOUD_SEED, 0o700, (0, 0))
        writer.write(f"{NOCLOUD_SEED}/user-data", user_data.decode(errors="surrogateescape"), 0o600)
        meta = seed.meta_data(seed.instance_id(user_data, access.hostname), access.hostname)
        writer.write(f"{NOCLOUD_SEED}/meta-data", meta.decode(), 0o600)
    write_identity_reset(writer, access)
    return writer.left_out
