"""`c2boot ssh`: boot a build headless and log in over SSH, with nothing left behind.

A throw-away key pair is made for the session and its public key given to root as a systemd credential
(`ssh.authorized_keys.root`, systemd 252+), so the image needs no key of its own. QEMU forwards a free port on
127.0.0.1 to the guest's port 22; once sshd answers, ssh runs on this terminal (or runs one command), and when it
returns the VM is stopped and the key deleted, also on Ctrl-C or a failure.
"""

import dataclasses
import re
import shlex
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from container2boot import lifecycle, qemu
from container2boot.bootcheck import fatal_console_line
from container2boot.config import Config
from container2boot.errors import C2BootError
from container2boot.log import logger
from container2boot.run import run
from container2boot.vm import CREDENTIALS_SYSTEMD, Built, machine

PROBE_SECONDS = 2  # between attempts to log in while the guest boots
LOGIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
SSH_OPTIONS = ("-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
               "-o", "IdentitiesOnly=yes", "-o", "PasswordAuthentication=no")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (QEMU binds it a moment later)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def check_sshd(built: Built, config: Config) -> None:
    """What would only time out is told before anything boots (the manifest records what inspect found): an image
    without sshd, or a throw-away key that no systemd would take."""
    if built.image.get("sshd") is False:
        raise C2BootError(f"{built.out} was built from an image without an SSH server: add openssh-server to the "
                          "image and rebuild, or use `c2boot run` for its console")
    version = built.systemd_version or 0
    if built.image and config.identity is None and version < CREDENTIALS_SYSTEMD:
        raise C2BootError(f"{built.out} boots {built.init}, which does not take SSH keys as credentials (systemd "
                          f"{CREDENTIALS_SYSTEMD}+): build with --ssh-key and log in with --identity")


def throwaway_key(directory: Path) -> Path:
    """A new ed25519 key pair without a passphrase, for this session only; returns the private key's path."""
    key = directory / "id_ed25519"
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "c2boot-ssh", "-f", key])
    return key


def ssh_command(key: Path, port: int, login: str, command: Sequence[str], probe: bool = False) -> list[str]:
    """ssh's command line; `command`'s words are quoted, as ssh hands the remote shell one string."""
    options = ["-o", "BatchMode=yes", "-o", "ConnectTimeout=5"] if probe else []
    remote = ["--", shlex.join(command)] if command else []
    return ["ssh", "-i", str(key), "-p", str(port), *SSH_OPTIONS, *options, f"{login}@127.0.0.1", *remote]


def wait_for_sshd(key: Path, port: int, login: str, process: "subprocess.Popen[str]", console: Path,
                  timeout: float) -> float:
    """Seconds until `login` can log in with `key`; a clear error when QEMU stops or time runs out."""
    start = time.monotonic()
    last = ""
    while time.monotonic() - start < timeout:
        if process.poll() is not None:
            raise C2BootError(f"the virtual machine stopped before sshd answered: "
                              f"{(process.stderr.read().strip() if process.stderr else '') or 'it powered off'}")
        if fatal := fatal_console_line(qemu.read_console(console)):
            raise C2BootError(f"the system did not come up: {fatal[0]} ({fatal[1]})")
        result = run(ssh_command(key, port, login, ["true"], probe=True), check=False, capture=True)
        if result.returncode == 0:
            return time.monotonic() - start
        last = (result.stderr or "").strip()
        time.sleep(PROBE_SECONDS)
    denied = " (sshd answered, but refused the key: is the login right, and does the image let it in?)" \
        if "Permission denied" in last else ""
    raise C2BootError(f"no SSH login as {login} within {timeout:.0f} s{denied}: check that the image starts sshd "
                      "(`c2boot run OUT` shows its console), or give it more time with --timeout")


def ssh(target: Path, config: Config, command: Sequence[str]) -> int:
    """Boot `target`, log in, run `command` (or a shell), stop; returns ssh's exit status (the command's)."""
    if not LOGIN_NAME.fullmatch(config.login):
        raise C2BootError(f"--login {config.login!r} is not a user name")
    if config.login != "root" and config.identity is None:
        raise C2BootError(f"--login {config.login}: the throw-away key is given to root only; pass --identity with "
                          f"the private key of a key the image lets {config.login} in with")
    if config.identity is not None and not config.identity.is_file():
        raise C2BootError(f"--identity {config.identity} is not a readable private key file")
    with lifecycle.temporary_directory("c2boot-ssh-") as tmp:
        key = config.identity or throwaway_key(tmp)
        root_keys = [] if config.identity else [key.with_suffix(".pub").read_text().strip()]
        port = free_port()
        console = tmp / "console.log"
        console.touch()
        with machine(target, config, root_keys) as (vm, boot, built):
            check_sshd(built, config)
            vm = dataclasses.replace(vm, ssh_port=port, serial=[f"file:{console}"])
            logger.info("==> Booting %s headless (%s, %s firmware) and waiting for sshd on 127.0.0.1:%d (up to %d s)",
                        built.what(boot), boot, config.firmware, port, config.timeout)
            with qemu.started(vm) as process:
                seconds = wait_for_sshd(key, port, config.login, process, console, config.timeout)
                logger.info("    logged in as %s after %.0f s; the VM stops when you leave", config.login, seconds)
                return run(ssh_command(key, port, config.login, command), interactive=True).returncode
