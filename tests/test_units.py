"""Sizing, config, output staging, the run() helper and the host checks, without podman."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from container2boot.config import Config, command_line, load_config_file, make_config
from container2boot.disk import MIN_ESP, MiB, esp_size, tree_bytes
from container2boot.errors import C2BootError
from container2boot.output import _umask, check_output, staged_output
from container2boot.pipeline import output_settings, rebuild_options
from container2boot.podman import check_subordinate_ids, context_tar, debian_suite, parse_secret, split_reference
from container2boot.run import check_version, failure_message, parse_version, require_tool, run
from container2boot.templates import render

# Sizing --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("content", [200 * MiB, 1 * 1024 * MiB, 60 * MiB])
def test_esp_size_has_modest_headroom(content: int) -> None:
    size = esp_size(content)
    assert size % MiB == 0
    assert content < size <= content * 1.03 + 10 * MiB


def test_small_esp_stays_fat32_sized() -> None:
    assert esp_size(1024) == MIN_ESP


def test_tree_bytes_rounds_files_to_clusters(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"x")
    (tmp_path / "b").write_bytes(b"x" * (64 * 1024 + 1))
    assert tree_bytes(tmp_path) == 64 * 1024 + 64 * 1024 + 128 * 1024


# Config --------------------------------------------------------------------------------------------------------


def test_cli_values_win_over_config_file_over_defaults(tmp_path: Path) -> None:
    config_file = tmp_path / "c2boot.toml"
    config_file.write_text('compression = "xz"\ncmdline = "quiet"\nsecret = ["id=a,src=/x"]\n')
    file_values = load_config_file(config_file, "build")
    config = make_config({"compression": None, "cmdline": "debug", "secrets": []}, file_values)
    assert (config.compression, config.cmdline, config.secrets) == ("xz", "debug", ("id=a,src=/x",))
    assert config.output == Path("out") and config.diskimage is False


def test_config_file_unknown_key(tmp_path: Path) -> None:
    config_file = tmp_path / "c2boot.toml"
    config_file.write_text("compresion = 'xz'\n")
    with pytest.raises(C2BootError, match=r"unknown key 'compresion'; known keys: .*compression"):
        load_config_file(config_file, "build")


def test_invalid_settings() -> None:
    with pytest.raises(C2BootError, match="use one of zstd"):
        Config(compression="brotli")
    with pytest.raises(C2BootError, match="unknown --pull policy 'sometimes': use one of missing, always, newer"):
        Config(pull="sometimes")
    with pytest.raises(C2BootError, match="exclude each other"):
        Config(image="x", containerfile=Path("Containerfile"))
    with pytest.raises(C2BootError, match="unknown partition table 'msdos': use one of gpt, mbr"):
        Config(diskimage=True, bios=True, table="msdos")
    with pytest.raises(C2BootError, match=r"--table describes disk\.img: add --diskimage"):
        Config(bios=True, table="mbr")
    with pytest.raises(C2BootError, match=r"--table mbr is for BIOS machines: add --bios"):
        Config(diskimage=True, table="mbr")
    assert Config(bios=True).table == "gpt"  # --bios alone: the ESP tree gets syslinux's files


def test_command_line_reproduces_the_settings_for_the_rootbuilder() -> None:
    config = Config(output=Path("/x"), force=True, diskimage=True, bios=True, table="mbr", cmdline="a b",
                    compression="xz", containerfile=Path("Containerfile"), secrets=("id=a,src=b",))
    args = command_line(config, "assemble", skip={"output", "force"})
    assert args == ["--diskimage", "--bios", "--table", "mbr", "--compression", "xz", "--cmdline", "a b"]
    assert command_line(Config(), "assemble") == []
    boot_settings = Config(netboot=True, formats=("qcow2", "vhd"), compress="xz", test=True, firmware="secure-boot")
    assert command_line(boot_settings, "assemble") == [  # --test and --firmware are for the host's boot test
        "--diskimage", "--netboot", "--format", "qcow2", "--format", "vhd", "--compress", "xz"]


# Output staging ------------------------------------------------------------------------------------------------


def test_outputs_appear_only_on_success(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(RuntimeError), staged_output(out, force=False) as staging:
        (staging / "disk.img").write_text("half")
        raise RuntimeError("stage failed")
    assert list(tmp_path.iterdir()) == []
    with staged_output(out, force=False) as staging:
        (staging / "manifest.json").write_text("{}")
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (out / "manifest.json").is_file()
    assert (out.stat().st_mode & 0o777) == 0o777 & ~_umask()


def test_non_empty_output_needs_force(tmp_path: Path) -> None:
    (tmp_path / "old.txt").write_text("x")
    with pytest.raises(C2BootError, match="not empty: pass --force"):
        check_output(tmp_path, force=False)
    with staged_output(tmp_path, force=True) as staging:
        (staging / "old.txt").write_text("new")
    assert (tmp_path / "old.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.txt"]


def test_output_parent_must_exist_and_be_writable(tmp_path: Path) -> None:
    with pytest.raises(C2BootError, match="does not exist"):
        check_output(tmp_path / "missing" / "out", force=False)
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if os.geteuid() != 0:  # root may write anywhere; the test suite runs as a normal user (scripts/test)
        with pytest.raises(C2BootError, match="cannot write to"):
            check_output(locked / "out", force=False)


def test_disk_full_message() -> None:
    assert "free some space" in failure_message("mcopy", 1, "Disk full\nNo space left on device")


# run() and versions --------------------------------------------------------------------------------------------


def test_run_failure_names_tool_and_last_lines() -> None:
    with pytest.raises(C2BootError) as error:
        run(["sh", "-c", "for i in 1 2 3 4 5 6 7 8 9 10; do echo line$i >&2; done; exit 3"])
    assert str(error.value) == "sh failed (exit 3): line10"


def test_missing_tool_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(C2BootError, match="tar2sqfs not found: install squashfs-tools-ng"):
        run(["tar2sqfs", "--version"])
    with pytest.raises(C2BootError, match="systemd-repart not found: install systemd-repart"):
        require_tool("systemd-repart")


@pytest.mark.parametrize(("text", "version"), [
    ("systemd 257 (257.13-1~deb13u1)", (257,)), ("podman version 4.3.1", (4, 3, 1)),
    ("tar2sqfs (squashfs-tools-ng) 1.3.2", (1, 3, 2)), ("grub-mkimage (GRUB) 2.12-9", (2, 12)),
])
def test_parse_version(text: str, version: tuple[int, ...]) -> None:
    assert parse_version(text) == version


def test_old_tools_are_refused() -> None:
    with pytest.raises(C2BootError, match="systemd-repart 252 is too old, container2boot needs 254"):
        check_version("systemd-repart", (252,))
    with pytest.raises(C2BootError, match=r"podman 4\.2 is too old"):
        check_version("podman", (4, 2))
    assert check_version("podman", (4, 3, 1)) == (4, 3, 1)


# Host checks (real conditions) ---------------------------------------------------------------------------------


def test_user_without_subuid_range_is_told_what_to_run() -> None:
    with pytest.raises(C2BootError, match=r"no subuid range for nosuchuser-c2b .*usermod --add-subuids"):
        check_subordinate_ids("nosuchuser-c2b", 4242424)


def test_podman_missing_is_a_clear_error(tmp_path: Path) -> None:
    env = {**os.environ, "PATH": str(Path(sys.executable).parent)}  # python, but no podman
    result = subprocess.run([sys.executable, "-m", "container2boot", "build", "-o", str(tmp_path / "out")],
                            capture_output=True, text=True, env=env, check=False)
    assert result.returncode == 1
    assert result.stderr.strip() == "c2boot: error: podman not found: install podman (or run inside the " \
        "rootbuilder container)"
    assert list(tmp_path.iterdir()) == []


def test_secret_spec(tmp_path: Path) -> None:
    creds = tmp_path / "creds"
    creds.write_text("demo:pw\n")
    assert parse_secret(f"id=chpass,src={creds}") == ("chpass", creds)
    with pytest.raises(C2BootError, match="write it as id=ID,src=PATH"):
        parse_secret("chpass")
    with pytest.raises(C2BootError, match="is not a readable file"):
        parse_secret(f"id=x,src={tmp_path / 'missing'}")


def test_bootstrappable_bases() -> None:
    assert debian_suite("docker.io/library/debian:trixie") == "trixie"
    assert debian_suite("debian:bookworm") == "bookworm"
    assert debian_suite("quay.io/fedora/fedora:41") is None
    assert debian_suite("localhost:5000/debian") is None


def test_context_tar_keeps_user_context_untouched(tmp_path: Path) -> None:
    import tarfile

    context = tmp_path / "ctx"
    (context / "__pycache__").mkdir(parents=True)
    (context / "__pycache__/x.pyc").write_bytes(b"")
    (context / "file").write_text("x")
    (context / ".containerignore").write_text("file\n")
    containerfile = tmp_path / "Containerfile"
    containerfile.write_text("FROM scratch\n")
    secret = tmp_path / "s"
    secret.write_text("pw")
    link = tmp_path / "link"
    link.symlink_to(context)  # the packaged containerfiles/ directory is a symlink into the checkout
    name = context_tar(link, containerfile, tmp_path / "c.tar", {".c2boot-secret-s": secret})
    with tarfile.open(tmp_path / "c.tar") as tar:
        names = set(tar.getnames())
    assert name in names and ".c2boot-secret-s" in names
    assert "./.containerignore" in names
    assert "./file" not in names and not any("__pycache__" in n for n in names)
    assert sorted(p.name for p in context.iterdir()) == [".containerignore", "__pycache__", "file"]


def test_python_api_is_the_cli_pipeline() -> None:
    import container2boot
    from container2boot import pipeline

    assert container2boot.build is pipeline.build and container2boot.assemble is pipeline.assemble
    assert container2boot.Config().output == Path("out")


def test_shell_completion_completes_commands_and_options() -> None:
    """Typer's completion, as bash asks for it (`c2boot --install-completion` sets that up)."""
    def complete(words: str) -> list[str]:
        env = {**os.environ, "_C2BOOT_COMPLETE": "complete_bash", "COMP_WORDS": words,
               "COMP_CWORD": str(len(words.split()) - 1)}
        code = "from container2boot.cli import main; main()"
        return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True).stdout.split()
    assert "build" in complete("c2boot bui")
    assert complete("c2boot build --diskim") == ["--diskimage"]


# KubeVirt containerDisk ---------------------------------------------------------------------------------------------


def test_containerdisk_implies_the_qcow2_it_holds_and_names_are_checked() -> None:
    config = Config(containerdisk="registry.example.org:5000/vms/web:1")
    assert config.formats == ("qcow2",) and config.diskimage
    assert Config(containerdisk="web", formats=("vhd", "qcow2")).formats == ("vhd", "qcow2")
    # The outputs are those of --format qcow2: the same cache entry and the same recorded rebuild, which makes no image
    assert output_settings(config) == output_settings(Config(formats=("qcow2",)))
    assert "--containerdisk" not in rebuild_options(config)
    for bad in ("Web", "web:", "a//b", "web:1 2", ""):
        with pytest.raises(C2BootError, match=r"is not an image name: use lower-case \[REGISTRY/\]PATH\[:TAG\]"):
            Config(containerdisk=bad)


def test_the_containerdisk_containerfile_puts_the_disk_where_kubevirt_looks() -> None:
    text = render("Containerfile.containerdisk.j2", disk="disk.qcow2")
    assert "FROM scratch\nCOPY --chown=107:107 --chmod=0440 disk.qcow2 /disk/disk.qcow2\n" in text


def test_publishing_the_rootbuilder_needs_a_name_to_push() -> None:
    assert split_reference("127.0.0.1:5000/c2boot/rootbuilder:1.0") == ("127.0.0.1:5000/c2boot/rootbuilder", "1.0")
    assert split_reference("registry.example.org:5000/rootbuilder") == ("registry.example.org:5000/rootbuilder",
                                                                         "latest")
    with pytest.raises(C2BootError, match=r"--push pushes the --tag name: add --tag REGISTRY/PATH:TAG"):
        Config(push=True)
    with pytest.raises(C2BootError, match=r"--tag 'Rootbuilder' is not an image name"):
        Config(publish_tag="Rootbuilder")
