"""Issue 16, the fast half: hostile input reaching generated configs, the output lock between real processes,
signals and SIGKILL leftovers on real processes, clean one-line errors for bad input, full disks."""

import errno
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from container2boot import cmdline, lifecycle, output
from container2boot.bootloader import BootEntry, installed_cmdline, live_cmdline
from container2boot.config import Config, load_config_file
from container2boot.errors import C2BootError
from container2boot.podman import build_error
from container2boot.templates import render, repart_path
from tests.conftest import c2boot

# The kernel command line ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("args", "message"), [
    ("quiet\n}\nmenuentry 'evil' {", "contains a newline"),
    ("a\tb", "contains a tab"),
    ('foo="a b"', "without quotes or backslashes"),
    ("x='y'", "without quotes or backslashes"),
    ("path=C:\\x", "without quotes or backslashes"),
    ("caf\u00e9=1", "contains 'é'"),
    (" ".join(f"a{i}=1" for i in range(31)), "31 name=value arguments the kernel does not use itself"),
    (" ".join(f"w{i}" for i in range(32)), "32 words the kernel does not use itself"),
    ("-- " + " ".join(f"w{i}" for i in range(32)), "32 words"),
    (" ".join(f"module.option{i}=value" for i in range(600)), "too long: the kernel command line would be"),
])
def test_kernel_arguments_that_cannot_boot_are_refused_before_the_build(args: str, message: str) -> None:
    with pytest.raises(C2BootError, match=re.escape(message)):
        Config(cmdline=args)


def test_kernel_arguments_that_boot_are_accepted() -> None:
    args = " ".join([*(f"systemd.setenv=V{i}=1" for i in range(40)), *(f"e{i}=1" for i in range(29)),
                     "console=ttyS0,115200", "quiet", "splash", "dyndbg=+p", "x=$y;{z}#"])
    Config(cmdline=args)
    BootEntry("t", "/k", "/i", live_cmdline(args))
    with pytest.raises(C2BootError, match="too long"):  # the whole line counts, container2boot's own arguments too
        BootEntry("t", "/k", "/i", live_cmdline("x" * (cmdline.MAX_BYTES - len(live_cmdline("")))))


def test_grub_gets_each_argument_as_one_literal_word() -> None:
    """GRUB script expands $, ends commands at ; and takes { and # specially: single quotes keep them literal."""
    entry = BootEntry("t", "/k", "/i", installed_cmdline("u", "ext4", "x=$y;{z}#w"))
    cfg = render("grub.cfg.j2", entry=entry, timeout=3)
    assert "  linux /k 'root=PARTUUID=u' 'rootfstype=ext4' 'rw' 'console=tty0' 'console=ttyS0,115200' " \
        "'x=$y;{z}#w'\n" in cfg


def test_hostile_titles_stay_one_menu_entry() -> None:
    """A PRETTY_NAME with a quote and a newline (os-release is the image's) cannot end the menu entry early."""
    entry = BootEntry("Evil' {\nmenuentry 'x", "/k", "/i", live_cmdline(""))
    grub = render("grub.cfg.j2", entry=entry, timeout=3)
    assert grub.count("\nmenuentry ") == 1 and grub.count("\n  linux ") == 1 and grub.count("\n  initrd ") == 1
    assert "menuentry 'Evil'\\'' { menuentry '\\''x' {" in grub
    syslinux = render("syslinux.cfg.j2", entry=entry, timeout=3)
    assert "  MENU LABEL Evil' { menuentry 'x\n" in syslinux and syslinux.count("LABEL container2boot") == 1


def test_paths_are_escaped_for_systemd_repart() -> None:
    assert repart_path("/home/a b/50%:x\\y\n") == "/home/a\\x20b/50%%\\x3ax\\\\y\\x0a"
    assert repart_path("/out/.c2boot-partial-work-x/esp") == "/out/.c2boot-partial-work-x/esp"


# Bad input: one line, exit 1, nothing written ----------------------------------------------------------------------


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    [line] = [line for line in result.stderr.splitlines() if line.startswith("c2boot: error: ")]
    return line.removeprefix("c2boot: error: ")


@pytest.mark.parametrize(("content", "message"), [
    (None, "is a directory: pass a TOML file"),
    (b"output = '\xff\xfe'\n", "is not UTF-8 text"),
    (b"output = 7\n", "output must be a string (in quotes), not 7"),
    (b"cpus = '2'\n", "cpus must be a whole number, not '2'"),
    (b"cpus = true\n", "cpus must be a whole number, not True"),
    (b"diskimage = 'yes'\n", "diskimage must be true or false"),
    (b"format = 'qcow2'\n", "format must be a list of strings"),
    (b"[output]\nx = 1\n", "output must be a string"),
])
def test_config_file_errors_are_one_line(tmp_path: Path, content: bytes | None, message: str) -> None:
    path = tmp_path / "c2boot.toml"
    path.mkdir() if content is None else path.write_bytes(content)
    with pytest.raises(C2BootError, match=re.escape(message)):
        load_config_file(path, "build")
    assert message in one_line_error(c2boot("build", "-o", tmp_path / "out", "--config", path, check=False))


def test_build_inputs_are_checked_before_anything_starts(tmp_path: Path) -> None:
    containerfile = tmp_path / "Containerfile"
    containerfile.write_text("FROM scratch\n")
    out = tmp_path / "out"
    cases = [
        (["-f", containerfile, "--context", containerfile], "is not a directory"),
        (["-f", containerfile, "--secret", "garbage"], "--secret 'garbage': write it as id=ID,src=PATH"),
        (["--image", "x", "--secret", f"id=a,src={containerfile}"], "--secret is for building the machine image"),
        (["-f", tmp_path / "missing"], "not found: check the --file path"),
        (["--cmdline", "a\nb"], "--cmdline contains a newline"),
        ([tmp_path / "empty-context"], "is not a build context with a Containerfile or Dockerfile"),
        ([tmp_path, "--context", tmp_path / "other"], "two build contexts"),
        (["-f", containerfile, "--build-arg", "NOVALUE"], "--build-arg 'NOVALUE': write it as KEY=VALUE"),
        (["--image", "x", "-t", "y"], "--image takes an image as it is"),
        (["-t", "", "-f", containerfile], "--tag needs a value"),
    ]
    for args, message in cases:
        assert message in one_line_error(c2boot("build", "-o", out, *args, check=False))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Containerfile"]


@pytest.mark.parametrize(("name", "content"), [
    ("file.txt", b"hello\n"), ("disk.img", b"\0" * 4096), ("disk.qcow2", b"\0" * 4096), ("empty.vhd", b""),
])
def test_run_and_test_refuse_what_is_not_a_disk_image(tmp_path: Path, name: str, content: bytes) -> None:
    target = tmp_path / name
    target.write_bytes(content)
    for command in ("run", "test"):
        assert "is not a" in one_line_error(c2boot(command, target, check=False))


def test_a_real_disk_image_is_accepted(tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    with disk.open("wb") as f:
        f.truncate(4 * 1024 * 1024)
    subprocess.run(["sfdisk", "--quiet", disk], input="label: gpt\n,,U\n", text=True, check=True)
    from container2boot.qemu import check_disk_image

    check_disk_image(disk)
    qcow2 = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", disk, qcow2], check=True)
    check_disk_image(qcow2)


def test_podman_build_errors_lose_the_go_data_structures() -> None:
    raw = ('building at STEP "FOO ": Build error: Unknown instruction: "FOO" &imagebuilder.Step{Env:[]string{'
           '"PATH=/usr/local/sbin"}, Command:"foo", Args:[]string{""}, Original:"FOO bar"}')
    assert build_error(raw) == 'building at STEP "FOO ": Unknown instruction: "FOO"'


def test_inspect_lists_incomplete_kernels(tmp_path: Path) -> None:
    from tests.test_rootfs import make_rootfs

    root = make_rootfs(tmp_path / "root", kernels=("6.1.0",))
    (root / "usr/lib/modules/9.99.0-fake").mkdir()
    result = c2boot("inspect", root, check=False)
    assert "  kernels      9.99.0-fake (incomplete: no vmlinuz), 6.1.0\n" in result.stdout
    assert result.returncode == 0
    data = json.loads(c2boot("inspect", root, "--json").stdout)
    assert [(k["version"], k["chosen"]) for k in data["kernels"]] == [("9.99.0-fake", False), ("6.1.0", True)]


# The output lock, between real processes ----------------------------------------------------------------------

HOLD_LOCK = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from container2boot.output import locked
    with locked(Path(sys.argv[1])):
        print("locked", flush=True)
        time.sleep(60)
""")


def test_one_build_owns_an_output_directory(tmp_path: Path) -> None:
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        start = time.monotonic()
        message = one_line_error(c2boot("build", "--image", "localhost/any:1", "-o", out, check=False))
        assert time.monotonic() - start < 10
        assert message == f"another c2boot (pid {holder.pid}) is writing to {out}: wait until it is done, or " \
            "choose another --output"
        # The same directory by another name is the same directory.
        (tmp_path / "link").symlink_to(tmp_path)
        assert "is writing to" in one_line_error(c2boot("build", "-o", tmp_path / "link" / "out", check=False))
    finally:
        holder.kill()
        holder.wait()
    with output.locked(out):  # the kernel released the dead holder's lock
        pass
    assert not (tmp_path / "out").exists()


# Signals and leftovers, on real processes ---------------------------------------------------------------------

RUN_THAT_WAITS = textwrap.dedent("""
    import signal, subprocess, sys, time
    from pathlib import Path
    from container2boot import lifecycle
    from container2boot.cli import reported_errors
    import typer
    try:
        with reported_errors("probe"):
            with lifecycle.temporary_directory("c2boot-probe-", Path(sys.argv[1])) as tmp:
                child = lifecycle.start_process(["sleep", "600"])
                try:
                    print(tmp, child.pid, flush=True)
                    time.sleep(600)
                finally:
                    time.sleep(float(sys.argv[2]))  # a slow cleanup, to interrupt a second time
                    lifecycle.stop_process(child)
    except typer.Exit as e:
        late = all(signal.getsignal(s) == signal.SIG_IGN for s in lifecycle.STOP_SIGNALS)
        print("late signals ignored" if late else "late signals kill", file=sys.stderr)
        sys.exit(e.exit_code)
""")


def start_probe(tmp_path: Path, cleanup_seconds: float = 0) -> tuple[subprocess.Popen[str], Path, int]:
    probe = subprocess.Popen([sys.executable, "-c", RUN_THAT_WAITS, str(tmp_path), str(cleanup_seconds)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert probe.stdout is not None
    directory, child = probe.stdout.readline().split()
    return probe, Path(directory), int(child)


def gone(pid: int, within: float = 10) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
        except OSError:
            return True
        if state == "Z":  # exited; only its parent's wait is missing
            return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGHUP, 129), (signal.SIGINT, 130)])
def test_a_signal_stops_a_run_like_ctrl_c(tmp_path: Path, signum: int, code: int) -> None:
    probe, directory, child = start_probe(tmp_path)
    assert directory.is_dir() and not gone(child, 0)
    probe.send_signal(signum)
    _, stderr = probe.communicate(timeout=30)
    assert probe.returncode == code, stderr
    assert f"interrupted by {signal.Signals(signum).name}" in stderr
    # Python restores the default actions as it exits: a second Ctrl-C then would kill it with SIGINT, not 130.
    assert "late signals ignored" in stderr
    assert not directory.exists() and gone(child)
    assert not list((lifecycle.state_dir() / "runs").glob(f"{probe.pid}-*.json"))


def test_a_second_ctrl_c_does_not_interrupt_the_cleanup(tmp_path: Path) -> None:
    probe, directory, child = start_probe(tmp_path, cleanup_seconds=2)
    probe.send_signal(signal.SIGINT)
    time.sleep(0.5)
    probe.send_signal(signal.SIGINT)
    _, stderr = probe.communicate(timeout=30)
    assert probe.returncode == 130 and "still cleaning up after SIGINT" in stderr
    assert not directory.exists() and gone(child)


DEAF_CHILD = textwrap.dedent("""
    import signal, time
    from container2boot import lifecycle
    child = lifecycle.start_process(["python3", "-c", "import signal, time; signal.signal(signal.SIGTERM, "
                                     "signal.SIG_IGN); print('ready', flush=True); time.sleep(600)"],
                                    on_our_death=signal.SIGKILL, stdout=None)
    print('child', child.pid, flush=True)
    time.sleep(600)
""")


def test_a_process_that_ignores_sigterm_still_dies_with_c2boot() -> None:
    """QEMU gets SIGKILL when c2boot dies: one SIGTERM can be missed, a SIGKILL cannot."""
    probe = subprocess.Popen([sys.executable, "-c", DEAF_CHILD], stdout=subprocess.PIPE, text=True)
    assert probe.stdout is not None
    lines = [probe.stdout.readline().split() for _ in range(2)]  # "ready": the child has set its handler
    child = next(int(line[1]) for line in lines if line[0] == "child")
    probe.kill()
    probe.wait()
    assert gone(child), "a process that ignores SIGTERM outlived c2boot's SIGKILL"


def test_after_sigkill_the_next_run_removes_what_was_left(tmp_path: Path) -> None:
    probe, directory, child = start_probe(tmp_path)
    probe.kill()
    probe.wait()
    assert gone(child), "a background process outlived c2boot's SIGKILL (no parent-death signal)"
    assert directory.is_dir()  # only a process of ours can remove it now
    result = c2boot("inspect", tmp_path / "no-such-thing", check=False)
    assert f"c2boot: removed what an interrupted `c2boot probe` (pid {probe.pid}) left behind: " \
        "1 temporary directory" in result.stderr
    assert not directory.exists()
    assert "left behind" not in c2boot("inspect", tmp_path / "no-such-thing", check=False).stderr


def test_a_record_of_a_live_run_is_left_alone(tmp_path: Path) -> None:
    probe, directory, _ = start_probe(tmp_path)
    try:
        assert "left behind" not in c2boot("inspect", tmp_path / "no-such-thing", check=False).stderr
        assert directory.is_dir()
    finally:
        probe.send_signal(signal.SIGTERM)
        probe.communicate(timeout=30)


# Full disks ----------------------------------------------------------------------------------------------------


def test_a_write_that_hits_a_full_disk_names_the_filesystem_and_the_need(tmp_path: Path) -> None:
    """/dev/full fails every write with ENOSPC, as a full filesystem does."""
    with pytest.raises(C2BootError) as error, output.space_explained(tmp_path, 500 * 1000 * 1000), \
            open("/dev/full", "wb") as full:
        full.write(b"x" * 4096)
        full.flush()
    message = str(error.value)
    assert message.startswith(f"no space left on {output.filesystem_of(tmp_path)} ({tmp_path}), need about 500 "
                              "MB (") and message.endswith("MB free): free some space or choose another --output")


def test_a_tool_failure_on_a_full_filesystem_is_reported_as_a_full_disk(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """tar2sqfs says only "I/O error" when the disk is full: the free space decides. (Here the threshold is
    raised above what this filesystem has free, instead of filling a real disk.)"""
    monkeypatch.setattr(output, "LOW_SPACE", output.free_bytes(tmp_path) + 1)
    with pytest.raises(C2BootError, match=r"^no space left on .*need about 3 MB"), \
            output.space_explained(tmp_path, 3 * 1000 * 1000):
        raise C2BootError("tar2sqfs failed (exit 1): usr/lib/modules/x.ko.xz: I/O error.")
    monkeypatch.setattr(output, "LOW_SPACE", 0)
    with pytest.raises(C2BootError, match="I/O error"), output.space_explained(tmp_path, 1):
        raise C2BootError("tar2sqfs failed (exit 1): usr/lib/modules/x.ko.xz: I/O error.")


def test_outputs_that_cannot_fit_are_refused_before_the_slow_steps(tmp_path: Path) -> None:
    with pytest.raises(C2BootError, match=r"need about \d+ MB"):
        output.check_space(tmp_path, output.free_bytes(tmp_path) + 10**12)
    output.check_space(tmp_path, 1)


def test_an_enospc_while_publishing_is_a_space_error(tmp_path: Path) -> None:
    with pytest.raises(C2BootError, match=r"^no space left on"), output.staged_output(tmp_path / "out", False):
        raise OSError(errno.ENOSPC, "No space left on device")
    assert list(tmp_path.iterdir()) == []



# Found by sweeping the CLI with about 120 kinds of bad input ------------------------------------------------------


def test_swept_bad_inputs_are_one_line_errors(tmp_path: Path) -> None:
    """Each was a traceback, a hang, silent acceptance or a misleading message before."""
    out = tmp_path / "out"
    text = tmp_path / "text.txt"
    text.write_text("hello\n")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "disk.img").write_bytes(os.urandom(1024 * 1024))
    manifests = {}
    for name, content in (("list", b"[1, 2]"), ("null", b"null"), ("binary", b"\xff\xfe\x00x")):
        manifests[name] = tmp_path / f"m-{name}"
        manifests[name].mkdir()
        (manifests[name] / "manifest.json").write_bytes(content)
    nul_config = tmp_path / "nul.toml"
    nul_config.write_text('output = "a\\u0000b"\n')
    empty = tmp_path / "empty"
    empty.mkdir()
    esp_out = tmp_path / "espout"
    (esp_out / "esp/EFI/BOOT").mkdir(parents=True)
    (esp_out / "esp/EFI/BOOT/BOOTX64.EFI").write_bytes(b"MZ")
    cases = [
        (["build", "--image", "", "-o", out], "--image needs a value"),
        (["build", "--base-image", "", "-o", out], "--base-image needs a value"),
        (["inspect", ""], "inspect needs an image"),
        (["inspect", "/dev/null"], "is neither a directory nor a tar file"),
        (["test", empty, "--memory", "1K"], "is too little to boot"),
        (["test", empty, "--memory", "9" * 400], "is not a size"),
        (["run", garbage], "is not a disk with a partition table"),
        (["test", fifo], "is neither a directory nor a disk image file"),
        (["build", "--image", "x", "-o", "/proc/c2boot-x"], ""),
        (["build", "--image", "x", "-o", loop], ""),
        (["build", "--image", "x", "-o", tmp_path / ("x" * 300)], ""),
        (["build", "--config", fifo, "-o", out], "is not a regular file"),
        (["build", "--config", nul_config], "contains a NUL character"),
        (["assemble", text, "-o", out], "is neither a directory nor a tar"),
        (["assemble", fifo, "-o", out], "is neither a directory nor a tar"),
        (["build", "-f", empty, "-o", out], "is a directory: pass the Containerfile itself"),
        (["build", "--secret", "garbage", "-o", out], "write it as id=ID,src=PATH"),
        (["assemble", empty, "-o", out, "--kernel-root", tmp_path / "nope"], ""),
        (["esp", "sync", esp_out, fifo], "is neither a directory, a FAT image file nor a partition device"),
    ]
    for name, directory in manifests.items():
        cases.append((["run", directory, "--direct"], "rebuild the outputs" if name != "list" else "not a container"))
    for args, message in cases:
        result = c2boot(*args, check=False)
        line = one_line_error(result)
        assert message in line, (args, line)
    assert not out.exists()
    verdict = c2boot("inspect", empty, "--app", "--cmd", "/x", "--user", "99999999999999999999", check=False)
    assert verdict.returncode == 1 and "ids go up to" in verdict.stdout.splitlines()[-1]
