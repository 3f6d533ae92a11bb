"""Issue 11, the fast half: the image-kind decision, the OCI configuration turned into the app's command (quoting,
Env, User forms), bad input, and the app's configuration file as the init's shell reads it."""

import json
import shlex
import subprocess
from pathlib import Path

import pytest

from container2boot.config import Config
from container2boot.errors import C2BootError
from container2boot.plan import ImageConfig, Plan, app_command, decide, split_command
from container2boot.rootfs import Report, examine_directory
from container2boot.templates import render
from tests.conftest import C2BOOT
from tests.test_rootfs import ELF_X86_64, make_rootfs

NGINX = ImageConfig(cmd=("nginx", "-g", "daemon off;"), env=("PATH=/usr/local/sbin:/usr/sbin:/usr/bin",
                                                           "NGINX_VERSION=1.27"), stop_signal="SIGQUIT",
                    architecture="amd64")


def app_rootfs(root: Path, *, passwd: str = "", programs: tuple[str, ...] = ("usr/sbin/nginx",)) -> Report:
    """An image with no init and no kernel: a few programs, maybe a passwd."""
    root.mkdir(parents=True)
    for program in programs:
        (root / program).parent.mkdir(parents=True, exist_ok=True)
        (root / program).write_bytes(ELF_X86_64)
    if passwd:
        (root / "etc").mkdir()
        (root / "etc/passwd").write_text(passwd)
        (root / "etc/group").write_text("root:x:0:\nwww-data:x:33:\nstaff:x:50:\n")
    return examine_directory(root)


def plan_of(report: Report, image: ImageConfig = NGINX, **settings: object) -> Plan:
    plan = decide(report, image, Config(**settings))  # type: ignore[arg-type]
    return plan.with_kernel_version("6.12.57+deb13-amd64") if plan.supplies_kernel else plan


# The four kinds --------------------------------------------------------------------------------------------------


def test_a_complete_machine_image_boots_as_it_is(tmp_path: Path) -> None:
    plan = plan_of(examine_directory(make_rootfs(tmp_path)))
    assert (plan.kind, plan.kernel, plan.initrd, plan.init) == ("machine", "image", "image", "image")
    assert plan.kernel_version == "6.12.1-amd64"


def test_its_own_kernel_with_another_initrd_maker(tmp_path: Path) -> None:
    root = make_rootfs(tmp_path, dracut=False)
    (root / "usr/sbin").mkdir(parents=True)
    (root / "usr/sbin/mkinitramfs").write_text("#!/bin/sh\n")
    plan = plan_of(examine_directory(root))
    assert (plan.kind, plan.kernel, plan.initrd, plan.init) == ("own-kernel", "image", "supplied", "image")
    assert plan.kernel_version == "6.12.1-amd64"


def test_a_userland_without_a_kernel_gets_the_supplied_one(tmp_path: Path) -> None:
    plan = plan_of(examine_directory(make_rootfs(tmp_path, kernels=(), dracut=False)))
    assert (plan.kind, plan.kernel, plan.initrd, plan.init) == ("userland", "supplied", "supplied", "image")
    assert plan.kernel_version == "6.12.57+deb13-amd64"
    assert plan.describe() == "userland without a kernel: boots its init with a supplied kernel " \
        "6.12.57+deb13-amd64 and its modules"


def test_an_image_without_init_is_an_application(tmp_path: Path) -> None:
    plan = plan_of(app_rootfs(tmp_path / "root"))
    assert (plan.kind, plan.kernel, plan.init) == ("app", "supplied", "app")
    assert plan.app is not None and plan.app.stop_signal == "SIGQUIT"
    assert plan.describe() == "application image: will run `nginx -g 'daemon off;'` as root with a supplied " \
        "kernel 6.12.57+deb13-amd64"


def test_options_force_app_mode_and_the_supplied_kernel(tmp_path: Path) -> None:
    report = examine_directory(make_rootfs(tmp_path))
    forced = plan_of(report, supplied_kernel=True)
    assert forced.kernel == "supplied" and forced.kernel_version == "6.12.57+deb13-amd64"
    app = plan_of(report, ImageConfig(cmd=("/usr/lib/systemd/systemd", "--version")), app=True)
    assert app.kind == "app" and app.app is not None and app.app.command[0] == "/usr/lib/systemd/systemd"


# The OCI configuration, as podman run reads it ---------------------------------------------------------------


@pytest.mark.parametrize(("image", "settings", "command"), [
    (ImageConfig(entrypoint=("/docker-entrypoint.sh",), cmd=("nginx", "-g", "daemon off;")), {},
     ("/docker-entrypoint.sh", "nginx", "-g", "daemon off;")),
    (ImageConfig(entrypoint=("/e",), cmd=("c",)), {"cmd": "x 'a b' \"c d\""}, ("/e", "x", "a b", "c d")),
    (ImageConfig(entrypoint=("/e",), cmd=("c",)), {"entrypoint": "/bin/sh -c"}, ("/bin/sh", "-c")),
    (ImageConfig(entrypoint=("/e",), cmd=("c",)), {"entrypoint": "", "cmd": "ls"}, ("ls",)),
    (ImageConfig(cmd=("c",)), {"cmd": '["printf", "%s\\n", "a b"]'}, ("printf", "%s\n", "a b")),
])
def test_entrypoint_and_cmd_combine_like_podman_run(image: ImageConfig, settings: dict[str, str],
                                                    command: tuple[str, ...]) -> None:
    assert app_command(image, Config(**settings)) == command  # type: ignore[arg-type]


def test_bad_command_lines_are_one_line_errors() -> None:
    with pytest.raises(C2BootError, match="check its quotes"):
        split_command("echo 'unterminated")
    with pytest.raises(C2BootError, match="not a JSON array of strings"):
        split_command('["a", 1]')


def test_environment_gets_dockers_path_and_the_overrides_last(tmp_path: Path) -> None:
    report = app_rootfs(tmp_path / "root", programs=("bin/app",))
    plan = plan_of(report, ImageConfig(cmd=("/bin/app",), env=("A=1",)), env=("A=2", "B=x y"))
    assert plan.app is not None
    assert plan.app.env == ("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "A=1", "A=2",
                            "B=x y")
    with pytest.raises(C2BootError, match="--env 'NOVALUE': write it as KEY=VALUE"):
        plan_of(report, ImageConfig(cmd=("/bin/app",)), env=("NOVALUE",))


PASSWD = "root:x:0:0:root:/root:/bin/sh\nnginx:x:101:33:nginx:/var/cache/nginx:/sbin/nologin\n"


@pytest.mark.parametrize(("user", "ids", "home", "who"), [
    ("", (0, 0), "/root", "root"),
    ("nginx", (101, 33), "/var/cache/nginx", "nginx (uid 101, gid 33)"),
    ("nginx:staff", (101, 50), "/var/cache/nginx", "nginx:staff (uid 101, gid 50)"),
    ("101", (101, 33), "/var/cache/nginx", "uid 101, gid 33"),
    ("1000", (1000, 0), "/", "uid 1000, gid 0"),
    ("1000:2000", (1000, 2000), "/", "uid 1000, gid 2000"),
    ("1000:www-data", (1000, 33), "/", "uid 1000, gid 33"),
])
def test_user_forms(tmp_path: Path, user: str, ids: tuple[int, int], home: str, who: str) -> None:
    plan = plan_of(app_rootfs(tmp_path / "root", passwd=PASSWD), user=user)
    assert plan.app is not None
    assert ((plan.app.uid, plan.app.gid), plan.app.home, plan.app.who) == (ids, home, who)


def test_numeric_user_without_any_passwd(tmp_path: Path) -> None:
    plan = plan_of(app_rootfs(tmp_path / "root"), user="65534:65534")
    assert plan.app is not None and (plan.app.uid, plan.app.gid, plan.app.home) == (65534, 65534, "/")
    numeric_signal = plan_of(app_rootfs(tmp_path / "other"), ImageConfig(cmd=("nginx",), stop_signal="3"))
    assert numeric_signal.app is not None and numeric_signal.app.stop_signal == "3"
    with pytest.raises(C2BootError, match="STOPSIGNAL 'SIGRTMIN\\+3' is not a signal this init knows"):
        plan_of(app_rootfs(tmp_path / "third"), ImageConfig(cmd=("nginx",), stop_signal="SIGRTMIN+3"))


# Bad input: before the slow steps, one line ----------------------------------------------------------------------


def test_an_image_for_another_architecture(tmp_path: Path) -> None:
    report = app_rootfs(tmp_path / "root")
    with pytest.raises(C2BootError, match=r"is built for aarch64, and container2boot makes x86_64 machines"):
        plan_of(report, ImageConfig(cmd=("nginx",), architecture="arm64"))
    arm = tmp_path / "arm"
    (arm / "bin").mkdir(parents=True)
    (arm / "bin/sh").write_bytes(ELF_X86_64[:18] + b"\xb7\x00" + ELF_X86_64[20:])  # an aarch64 ELF header
    with pytest.raises(C2BootError, match="built for aarch64"):
        plan_of(examine_directory(arm), ImageConfig(cmd=("/bin/sh",)))


def test_nothing_to_run(tmp_path: Path) -> None:
    with pytest.raises(C2BootError, match=r"nothing to run: .* neither ENTRYPOINT nor CMD: pass --cmd"):
        plan_of(app_rootfs(tmp_path / "root"), ImageConfig())


def test_a_user_the_image_does_not_have(tmp_path: Path) -> None:
    with pytest.raises(C2BootError, match=r"user 'www' is not in the image's /etc/passwd \(users: nginx, root\)"):
        plan_of(app_rootfs(tmp_path / "root", passwd=PASSWD), user="www")
    with pytest.raises(C2BootError, match="group 'wheel' is not in the image's /etc/group"):
        plan_of(app_rootfs(tmp_path / "other", passwd=PASSWD), user="nginx:wheel")


def test_a_command_the_image_does_not_have(tmp_path: Path) -> None:
    with pytest.raises(C2BootError, match="the app's command 'httpd' is not in the image"):
        plan_of(app_rootfs(tmp_path / "root"), ImageConfig(cmd=("httpd",)))


def test_app_options_for_an_image_with_an_init(tmp_path: Path) -> None:
    with pytest.raises(C2BootError, match=r"--cmd configures an application image.s command.*add --app"):
        plan_of(examine_directory(make_rootfs(tmp_path)), cmd="/bin/true")


def test_the_cli_refuses_bad_app_input_before_building(tmp_path: Path) -> None:
    from tests.conftest import c2boot

    root = make_rootfs(tmp_path / "root", kernels=(), init=False)
    result = c2boot("inspect", root, check=False)
    assert result.returncode == 1 and result.stdout.splitlines()[-1].startswith("CANNOT BOOT: nothing to run")
    data = json.loads(c2boot("inspect", root, "--cmd", "/usr/bin/dracut --help", "--json").stdout)
    assert data["kind"] == "app" and data["plan"]["app"]["command"] == ["/usr/bin/dracut", "--help"]


# The app's configuration, read back by a shell ------------------------------------------------------------------


def test_the_app_configuration_survives_the_shell(tmp_path: Path) -> None:
    """app.conf quotes every word: the shell gives the init exactly the command and environment of the plan."""
    command = ("printf", "[%s]\\n", "a b", "$HOME", "it's", ";", "*")
    env = ("PATH=/usr/bin:/bin", "QUOTED=it's \"x\"", "DOLLAR=$PATH", "EMPTY=")
    conf = tmp_path / "app.conf"
    conf.write_text(render("app.conf.j2", command=" ".join(shlex.quote(a) for a in command),
                           command_text=shlex.quote(shlex.join(command)), env=[shlex.quote(e) for e in env],
                           workdir=shlex.quote("/srv/my app"), user=shlex.quote(""), stop_signal="QUIT",
                           hostname=shlex.quote("web"), home=shlex.quote("/root")))
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "busybox").write_text('#!/bin/sh\nshift\nexec env "$@"\n')  # "busybox env ..." -> env ...
    (fake / "busybox").chmod(0o755)
    script = f'B={fake}; . {conf}; printf "%s\\n" "$APP_WORKDIR" "$APP_STOP_SIGNAL" "$APP_COMMAND"; ' \
        'run_app /usr/bin/env; "$@"'
    out = subprocess.run(["sh", "-c", script], capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[:3] == ["/srv/my app", "QUIT", shlex.join(command)]
    environment = out[3:3 + 6]
    assert environment == ["HOSTNAME=web", "HOME=/root", *env]
    assert out[3 + 6:] == ["[a b]", "[$HOME]", "[it's]", "[;]", "[*]"]


def test_a_kernel_without_its_modules(tmp_path: Path) -> None:
    root = make_rootfs(tmp_path, kernels=())
    (root / "boot/vmlinuz-6.12.9-amd64").write_bytes(b"kernel")
    with pytest.raises(C2BootError, match=r"has kernel 6.12.9-amd64 \(/boot/vmlinuz-6.12.9-amd64\) but no modules "
                       r"directory /usr/lib/modules/6.12.9-amd64: .* or pass --supplied-kernel"):
        plan_of(examine_directory(root))
    assert plan_of(examine_directory(root), supplied_kernel=True).kind == "userland"


def test_assemble_without_the_kernel_image_an_image_needs_exits_3(tmp_path: Path) -> None:
    """Its own status, which `c2boot build` answers by mounting the kernel image and assembling again; nothing is
    written."""
    from container2boot.errors import KernelImageNeeded
    from container2boot.podman import wants_pull

    root = make_rootfs(tmp_path / "userland", kernels=(), dracut=False)
    result = subprocess.run([*C2BOOT, "assemble", str(root), "-o", str(tmp_path / "out")], capture_output=True,
                            text=True, check=False)
    assert result.returncode == KernelImageNeeded.exit_code == 3, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("c2boot: error: this image needs a supplied kernel: "
                                                             "pass --kernel-root")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["userland"]
    # The kernel image offered without asking is one the pull policy takes as it is.
    assert not wants_pull("quay.io/k/kernel:1", "missing", True) and wants_pull("quay.io/k/kernel:1", "missing", False)
    assert wants_pull("quay.io/k/kernel:1", "newer", True) and not wants_pull("quay.io/k/kernel:1", "never", False)
    assert not wants_pull("localhost/k:1", "newer", True) and wants_pull("localhost/k:1", "always", True)
