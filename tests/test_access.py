"""Getting in, decided and written: key files checked, users and groups planned from the image, the files written
into the added tree (owners set in a real podman user namespace, as in the rootbuilder), and the root image's tar
stream leaving out what they replace."""

import base64
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from container2boot import access
from container2boot.config import Config
from container2boot.errors import C2BootError
from container2boot.plan import decide
from container2boot.qemu import merge_credentials
from container2boot.rootfs import examine_directory
from container2boot.rootimage import merged_tar_command
from container2boot.vm import boot_credentials
from tests.test_plan import NGINX
from tests.test_rootfs import make_rootfs

PASSWD = "root:x:0:0:root:/root:/bin/bash\nbob:x:1000:1000::/home/bob:/bin/bash\n"
GROUP = "root:x:0:\nadm:x:4:\nsudo:x:27:bob\nbob:x:1000:\n"
SHADOW = "root:*:19000:0:99999:7:::\nbob:!:19000:0:99999:7:::\n"


def keygen(path: Path, kind: str = "ed25519") -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", kind, "-N", "", "-C", "me@host", "-f", path], check=True)
    return path


def machine(root: Path, *, host_keys: bool = True, machine_id: str = "0123456789abcdef0123456789abcdef\n") -> Path:
    make_rootfs(root)
    for name, text in (("passwd", PASSWD), ("group", GROUP), ("shadow", SHADOW), ("gshadow", "sudo:!::bob\n"),
                       ("machine-id", machine_id), ("hostname", "image\n")):
        (root / "etc" / name).write_text(text)
    (root / "etc/shadow").chmod(0o640)  # the image's mode is kept
    (root / "etc/skel").mkdir()
    (root / "etc/skel/.profile").write_text("# profile\n")
    (root / "usr/bin/ssh-keygen").write_text("#!/bin/sh\n")
    (root / "usr/bin/bash").write_text("#!/bin/sh\n")
    if host_keys:
        (root / "etc/ssh").mkdir()
        for name in ("ssh_host_ed25519_key", "ssh_host_ed25519_key.pub"):
            (root / "etc/ssh" / name).write_text("host key\n")
    return root


def test_public_key_files_are_checked(tmp_path: Path) -> None:
    key = keygen(tmp_path / "id")
    rsa = keygen(tmp_path / "rsa", "rsa")
    both = tmp_path / "both.pub"
    both.write_text(f"# mine\n{key.with_suffix('.pub').read_text()}\n{rsa.with_suffix('.pub').read_text()}")
    assert [k.split()[0] for k in access.read_public_keys(both)] == ["ssh-ed25519", "ssh-rsa"]
    with pytest.raises(C2BootError, match=r"is a private key: pass the public one \(.*/id.pub\)"):
        access.read_public_keys(key)
    bad = tmp_path / "bad.pub"
    ed25519_blob = key.with_suffix(".pub").read_text().split()[1]
    for text, message in (("ssh-ed25519 AAAA!!\n", "line 1: its key is not valid base64"),
                          (f"# c\nssh-rsa {ed25519_blob}\n", "line 2: its key data is not a ssh-rsa key"),
                          ("hello world\n", "line 1: not a public key"), ("\n# only comments\n", "has no key")):
        bad.write_text(text)
        with pytest.raises(C2BootError, match=message):
            access.read_public_keys(bad)
    with pytest.raises(C2BootError, match="not found"):
        access.read_public_keys(tmp_path / "missing.pub")
    with pytest.raises(C2BootError, match="is not a regular file"):
        access.read_public_keys(tmp_path)


def test_the_login_user_is_planned_from_the_image(tmp_path: Path) -> None:
    report = examine_directory(machine(tmp_path / "root"))
    root = access.login_user(report, Config())
    assert (root.name, root.uid, root.home, root.created) == ("root", 0, "/root", False)
    bob = access.login_user(report, Config(user="bob", groups="adm"))
    assert (bob.uid, bob.gid, bob.groups, bob.created) == (1000, 1000, ("adm",), False)
    alice = access.login_user(report, Config(user="alice", groups="sudo,adm"))
    assert (alice.uid, alice.gid, alice.home, alice.shell, alice.created) == \
        (1001, 1001, "/home/alice", "/usr/bin/bash", True)
    with pytest.raises(C2BootError, match="group 'wheel' is not in the image's /etc/group"):
        access.login_user(report, Config(user="alice", groups="wheel"))
    with pytest.raises(C2BootError, match="'Alice!' is not a user name to create"):
        access.login_user(report, Config(user="Alice!"))
    with pytest.raises(C2BootError, match="--groups adds --user to groups"):
        Config(groups="sudo")
    with pytest.raises(C2BootError, match="is not a hostname"):
        Config(hostname="web_1")


def test_access_is_decided_with_the_plan(tmp_path: Path) -> None:
    key = keygen(tmp_path / "id").with_suffix(".pub")
    report = examine_directory(machine(tmp_path / "root"))
    plan = decide(report, NGINX, Config(ssh_keys=(key,), hostname="web1"))
    assert plan.access is not None and plan.access.reset_machine_id == ("etc/machine-id",)
    assert plan.access.reset_host_keys == ("etc/ssh/ssh_host_ed25519_key", "etc/ssh/ssh_host_ed25519_key.pub")
    assert plan.as_json()["access"]["authorized_keys"] == 1  # the manifest counts the keys, it does not copy them
    assert "reset so that every machine is unique: /etc/machine-id, 2 SSH host key files (new ones are made at " \
        "first boot)" in plan.access.describe()
    with pytest.raises(C2BootError, match=r"--ssh-key sets up logins of a machine, and .* is run as an application"):
        decide(report, NGINX, Config(ssh_keys=(key,), app=True))
    with pytest.raises(C2BootError, match="has no cloud-init: add the cloud-init package"):
        decide(report, NGINX, Config(cloud_init=key))
    empty = tmp_path / "empty"
    empty.write_text("")
    with pytest.raises(C2BootError, match="is empty: write the password"):
        decide(report, NGINX, Config(password_secret=f"id=pw,src={empty}"))


def test_an_init_that_cannot_make_host_keys_keeps_them(tmp_path: Path) -> None:
    root = machine(tmp_path / "root", machine_id="")
    (root / "usr/lib/systemd/systemd").unlink()
    (root / "sbin").mkdir()
    (root / "sbin/openrc-init").write_text("")
    found = access.decide(examine_directory(root), Config())
    assert (found.reset_machine_id, found.reset_host_keys, found.kept_host_keys) == ((), (), True)


ADD_ACCESS = """
import json, sys
from pathlib import Path
from container2boot import accounts, access
from container2boot.config import Config
from container2boot.rootfs import examine_directory
root, tree, key, password = map(Path, sys.argv[1:5])
config = Config(user="alice", groups="sudo", ssh_keys=(key,), hostname="web1", password_secret=f"id=pw,src={password}")
plan = access.decide(examine_directory(root), config)
print(json.dumps(accounts.add_access(root, tree, plan, config)))
"""


def unshared_read(path: Path) -> str:
    """A file given to another user of the namespace (alice's home is hers, mode 0700)."""
    return subprocess.run(["podman", "unshare", "cat", path], capture_output=True, text=True, check=True).stdout


def test_the_files_are_written_with_their_owners(tmp_path: Path) -> None:
    root = machine(tmp_path / "root")
    tree = tmp_path / "supplied"
    tree.mkdir()
    key = keygen(tmp_path / "id").with_suffix(".pub")
    password = tmp_path / "pw"
    password.write_text("s3cret\n")
    try:
        # As root of a user namespace with the user's subordinate ids, like the rootbuilder container.
        result = subprocess.run(["podman", "unshare", sys.executable, "-c", ADD_ACCESS, root, tree, key, password],
                                capture_output=True, text=True, check=False)
        assert result.returncode == 0, result.stderr
        left_out = json.loads(result.stdout)
        assert sorted(left_out) == ["etc/group", "etc/gshadow", "etc/hostname", "etc/machine-id", "etc/passwd",
                                    "etc/shadow", "etc/ssh/ssh_host_ed25519_key", "etc/ssh/ssh_host_ed25519_key.pub"]
        assert (tree / "etc/passwd").read_text().endswith("alice:x:1001:1001::/home/alice:/usr/bin/bash\n")
        assert "sudo:x:27:bob,alice\n" in (tree / "etc/group").read_text()
        assert (tree / "etc/group").read_text().endswith("alice:x:1001:\n")
        assert (tree / "etc/gshadow").read_text() == "sudo:!::bob,alice\nalice:!::\n"
        alice = (tree / "etc/shadow").read_text().splitlines()[-1].split(":")
        assert alice[0] == "alice" and alice[1].startswith("$6$") and "s3cret" not in (tree / "etc/shadow").read_text()
        assert (tree / "etc/hostname").read_text() == "web1\n" and (tree / "etc/machine-id").read_text() == ""
        assert unshared_read(tree / "home/alice/.ssh/authorized_keys") == key.read_text().strip() + "\n"
        assert unshared_read(tree / "home/alice/.profile") == "# profile\n"
        unit = tree / "etc/systemd/system/c2boot-ssh-host-keys.service"
        assert "ExecStart=/usr/bin/ssh-keygen -A" in unit.read_text()
        assert os.readlink(tree / "etc/systemd/system/ssh.service.wants/c2boot-ssh-host-keys.service") == \
            "/etc/systemd/system/c2boot-ssh-host-keys.service"
        owners = subprocess.run(["podman", "unshare", "stat", "-c", "%n %u:%g %a", tree / "home/alice",
                                 tree / "home/alice/.ssh/authorized_keys", tree / "etc/shadow"],
                                capture_output=True, text=True, check=True).stdout.split("\n")
        assert [line.split(" ", 1)[1] for line in owners if line] == ["1001:1001 700", "1001:1001 600", "0:0 640"]
    finally:  # files of other users of the namespace: removed inside it
        subprocess.run(["podman", "unshare", "rm", "-rf", tree], check=True)


def test_the_root_image_stream_leaves_out_what_is_replaced(tmp_path: Path) -> None:
    root = machine(tmp_path / "root")
    extra = tmp_path / "supplied"
    (extra / "etc").mkdir(parents=True)
    (extra / "etc/hostname").write_text("web1\n")
    (extra / "etc/machine-id").write_text("")
    with merged_tar_command(root, extra, ("etc/hostname", "etc/machine-id", "etc/ssh/ssh_host_ed25519_key")) as tar:
        stream = subprocess.run(tar, capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(stream)) as archive:
        members = {m.name: m for m in archive.getmembers()}
        names = [m.name for m in archive.getmembers()]
        assert names.count("./etc/hostname") == 1 and names.count("./etc") == 1
        hostname = archive.extractfile(members["./etc/hostname"])
        assert hostname is not None and hostname.read() == b"web1\n"
    assert "./etc/ssh/ssh_host_ed25519_key" not in members and "./etc/ssh/ssh_host_ed25519_key.pub" in members
    assert members["./etc/machine-id"].size == 0 and "./etc/passwd" in members


def test_boot_time_access_becomes_credentials(tmp_path: Path) -> None:
    key = keygen(tmp_path / "id").with_suffix(".pub")
    credentials = boot_credentials(Config(ssh_keys=(key,), hostname="web1"), ["ssh-ed25519 AAAA throwaway"])
    keys = key.read_bytes().strip() + b"\nssh-ed25519 AAAA throwaway\n"
    assert credentials["ssh.authorized_keys.root"] == keys and credentials["system.hostname"] == b"web1"
    # also as root's authorized_keys2, for a root that has an authorized_keys already (provision.conf skips it)
    [line] = [x for x in credentials["tmpfiles.extra"].decode().splitlines() if x and not x.startswith("#")]
    assert line.startswith("f~ /root/.ssh/authorized_keys2 0600 root root - ")
    assert base64.b64decode(line.split()[-1]) == keys
    merged = merge_credentials(credentials, {"tmpfiles.extra": b"d /run/x", "system.hostname": b"db1"})
    assert merged["tmpfiles.extra"].decode().endswith(f"{line}\nd /run/x") and merged["system.hostname"] == b"db1"


def test_links_in_the_image_are_followed_or_refused(tmp_path: Path) -> None:
    root = machine(tmp_path / "root")
    (root / "var/roothome").mkdir(parents=True)
    (root / "var/home").mkdir()
    (root / "home").symlink_to("var/home")
    (root / "root").symlink_to("var/roothome")
    (root / "etc/passwd").write_text(PASSWD + "carol:x:1002:1002::/home/carol:/bin/sh\nsvc:x:999:999::/:/bin/sh\n")
    report = examine_directory(root)
    assert access.login_user(report, Config(user="svc")).in_home(".ssh") == ".ssh"  # a home of /: never "/.ssh"
    assert access.login_user(report, Config()).home_path == "var/roothome"
    assert access.login_user(report, Config(user="dave")).home_path == "var/home/dave"
    assert access.login_user(report, Config(user="carol")).home_path == "var/home/carol"
    (root / "var/home/dave").mkdir()
    with pytest.raises(C2BootError, match="has no such user but has /home/dave already"):
        access.login_user(examine_directory(root), Config(user="dave"))
    (root / "etc/passwd").unlink()
    (root / "etc/passwd").symlink_to("../usr/lib/passwd")
    (root / "usr/lib/passwd").write_text(PASSWD)
    with pytest.raises(C2BootError, match="the image's /etc/passwd is a symbolic link, and setting up logins"):
        access.decide(examine_directory(root), Config(user="root", groups="adm"))
    assert access.decide(examine_directory(root), Config(hostname="web1")).hostname == "web1"  # passwd untouched


def test_a_password_needs_a_shadow_file(tmp_path: Path) -> None:
    root = machine(tmp_path / "root")
    (root / "etc/shadow").unlink()
    password = tmp_path / "pw"
    password.write_text("x\n")
    with pytest.raises(C2BootError, match="has no /etc/shadow to hold the password's hash"):
        access.decide(examine_directory(root), Config(password_secret=f"id=pw,src={password}"))


def test_ssh_refuses_what_would_only_time_out(tmp_path: Path) -> None:
    from container2boot.ssh import check_sshd, ssh, ssh_command
    from container2boot.vm import Built

    def built(image: dict[str, object]) -> Built:
        return Built(tmp_path, None, {"image": image})

    with pytest.raises(C2BootError, match="built from an image without an SSH server: add openssh-server"):
        check_sshd(built({"init": "systemd", "systemd_version": 257, "sshd": False}), Config())
    with pytest.raises(C2BootError, match="boots systemd 250, which does not take SSH keys as credentials"):
        check_sshd(built({"init": "systemd", "systemd_version": 250, "sshd": True}), Config())
    with pytest.raises(C2BootError, match="boots openrc, which does not take SSH keys"):
        check_sshd(built({"init": "openrc", "systemd_version": None, "sshd": True}), Config())
    check_sshd(built({"init": "openrc", "sshd": True}), Config(identity=tmp_path / "key"))  # a key of the build's
    check_sshd(built({"init": "systemd", "systemd_version": 252, "sshd": True}), Config())
    with pytest.raises(C2BootError, match="--login '-oProxyCommand=x' is not a user name"):
        ssh(tmp_path, Config(login="-oProxyCommand=x"), [])
    with pytest.raises(C2BootError, match="the throw-away key is given to root only"):
        ssh(tmp_path, Config(login="alice"), [])
    argv = ssh_command(tmp_path / "key", 2222, "root", ["sh", "-c", "echo 'a b'; exit 3"])
    assert argv[-3:] == ["root@127.0.0.1", "--", "sh -c 'echo '\"'\"'a b'\"'\"'; exit 3'"]  # one string, quoted


def test_the_rootbuilder_sees_the_input_files_read_only(tmp_path: Path) -> None:
    from container2boot.podman import container_inputs, debian_bases

    key, data, password = tmp_path / "k.pub", tmp_path / "ud", tmp_path / "pw"
    for path in (key, data, password):
        path.write_text("x\n")
    inputs, inside = container_inputs(Config(ssh_keys=(key,), cloud_init=data, password_secret=f"id=p,src={password}"))
    assert inputs == [(key, "/run/c2boot-inputs/ssh-key-0.pub"), (data, "/run/c2boot-inputs/user-data"),
                      (password, "/run/c2boot-inputs/password")]
    assert inside.ssh_keys == (Path("/run/c2boot-inputs/ssh-key-0.pub"),)
    assert inside.password_secret == "id=p,src=/run/c2boot-inputs/password"
    assert debian_bases("FROM docker.io/library/debian:bookworm AS base\nFROM base\nFROM fedora:41\n"
                        "FROM --platform=linux/amd64 debian:trixie\nFROM $BASE\n") == \
        ["docker.io/library/debian:bookworm", "debian:trixie"]


def test_boot_time_access_the_built_systemd_cannot_take_is_named(tmp_path: Path) -> None:
    from container2boot.vm import Built, boot_features_missing

    key = keygen(tmp_path / "id").with_suffix(".pub")
    config = Config(ssh_keys=(key,), hostname="web1", cloud_init=key)
    debian12 = Built(tmp_path, None, {"image": {"init": "systemd", "systemd_version": 252, "cloud_init": True}})
    assert boot_features_missing(debian12, config) == [
        "--hostname at boot needs systemd 254 or newer (build with --hostname instead)"]
    openrc = Built(tmp_path, None, {"image": {"init": "openrc", "systemd_version": None, "cloud_init": False}})
    assert len(boot_features_missing(openrc, config)) == 3 and openrc.init == "openrc" and debian12.init == \
        "systemd 252"
    assert boot_features_missing(Built(tmp_path, None, {}), config) == []  # an older build says nothing
