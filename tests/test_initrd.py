"""The initrd's compression: zstd here when the kernel unpacks it, dracut's own otherwise; the early archive
(microcode) stays uncompressed in front."""

import shutil
import subprocess
from pathlib import Path

import pytest

from container2boot import initrd, pipeline
from container2boot.errors import C2BootError
from container2boot.initrd import (
    SANDBOX_REFUSED,
    InitrdJob,
    compress,
    compress_with_zstd,
    dracut_command,
    early_archive_end,
    elf_interpreter,
    loader_left_out,
    shell_loader,
)
from container2boot.tree import Tree

ZSTD_KERNEL = "CONFIG_RD_GZIP=y\nCONFIG_RD_ZSTD=y\n"


def newc(*files: tuple[str, bytes]) -> bytes:
    """A cpio archive in the newc format, as dracut writes it, padded to 512-byte blocks as cpio pads."""
    out = b""
    for number, (name, data) in enumerate([*files, ("TRAILER!!!", b"")], start=1):
        encoded = name.encode() + b"\0"
        fields = [number, 0o100644, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(encoded), 0]
        out += b"070701" + b"".join(b"%08X" % field for field in fields) + encoded
        out += b"\0" * (-len(out) % 4) + data
        out += b"\0" * (-len(out) % 4)
    return out + b"\0" * (-len(out) % 512)


def dracut_tree(tmp_path: Path, conf: str | None = None) -> Tree:
    (tmp_path / "usr/lib/dracut/dracut.conf.d").mkdir(parents=True, exist_ok=True)
    (tmp_path / "usr/lib/dracut/dracut.conf.d/01-dist.conf").write_text("hostonly=no\n")
    if conf is not None:
        (tmp_path / "etc/dracut.conf.d").mkdir(parents=True, exist_ok=True)
        (tmp_path / "etc/dracut.conf.d/10-mine.conf").write_text(conf)
    return Tree.from_directory(tmp_path)


def test_zstd_compresses_when_the_kernel_unpacks_it_and_the_image_chose_nothing(tmp_path: Path) -> None:
    assert compress_with_zstd(dracut_tree(tmp_path), ZSTD_KERNEL)
    assert not compress_with_zstd(dracut_tree(tmp_path), "CONFIG_RD_GZIP=y\n# CONFIG_RD_ZSTD is not set\n")
    assert not compress_with_zstd(dracut_tree(tmp_path), None)  # no configuration: dracut's own check decides


def test_a_compression_the_image_chose_is_kept(tmp_path: Path) -> None:
    tree = dracut_tree(tmp_path, conf='# ours\n  compress="xz"\n')
    assert not compress_with_zstd(tree, ZSTD_KERNEL)


def test_no_zstd_here_leaves_it_to_dracut(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(initrd.shutil, "which", lambda name: None)
    assert not compress_with_zstd(dracut_tree(tmp_path), ZSTD_KERNEL)


def test_dracut_writes_it_uncompressed_only_for_zstd() -> None:
    job = InitrdJob(Path("/rootfs"), frozenset({"dmsquash-live"}), "106", "6.12.0", zstd=True)
    assert "--no-compress" in dracut_command(job)
    assert "--no-compress" not in dracut_command(InitrdJob(Path("/rootfs"), frozenset(), "106", "6.12.0"))


def test_the_early_archive_stays_uncompressed_in_front(tmp_path: Path) -> None:
    early = newc(("early_cpio", b"1\n"), ("kernel/x86/microcode/GenuineIntel.bin", b"\x01" * 1001))
    main = newc(("init", b"#!/bin/sh\n" * 500), ("etc/os-release", b"ID=debian\n"))
    path = tmp_path / "initrd.img"
    path.write_bytes(early + main)
    with path.open("rb") as f:
        assert early_archive_end(f) == len(early)
    compress(path)
    data = path.read_bytes()
    assert data[:len(early)] == early and data[len(early):len(early) + 4] == bytes.fromhex("28b52ffd")  # zstd
    rest = subprocess.run(["zstd", "-d", "-c"], input=data[len(early):], capture_output=True, check=True).stdout
    assert rest == main
    assert path.stat().st_mode & 0o777 == 0o644 and not (tmp_path / "initrd.img.zst").exists()


def test_what_is_no_cpio_archive_is_left_as_dracut_made_it(tmp_path: Path) -> None:
    path = tmp_path / "initrd.img"
    path.write_bytes(bytes.fromhex("1f8b0800") + b"\0" * 100)  # gzip: dracut compressed it after all
    compress(path)
    assert path.read_bytes() == bytes.fromhex("1f8b0800") + b"\0" * 100


def test_a_damaged_header_is_no_early_archive(tmp_path: Path) -> None:
    path = tmp_path / "initrd.img"
    path.write_bytes(b"070701" + b"zz" * 60)
    with path.open("rb") as f:
        assert early_archive_end(f) == 0


def test_without_an_early_archive_all_of_it_is_compressed(tmp_path: Path) -> None:
    main = newc(("init", b"x" * 3000))
    path = tmp_path / "initrd.img"
    path.write_bytes(main)
    with path.open("rb") as f:
        assert early_archive_end(f) == 0
    compress(path)
    assert subprocess.run(["zstd", "-d", "-c", path], capture_output=True, check=True).stdout == main


@pytest.mark.parametrize(("failure", "refused"), [
    ("chroot: cannot change root directory to '/out/w/initrd/root': Operation not permitted", True),
    ("unshare: unshare failed: Operation not permitted", True),
    ("mount: /out/w/initrd/root: permission denied.", True),
    ("dracut: Cannot find module directory /lib/modules/6.1/", False),
    ("cp: cannot open '/var/lib/x': Permission denied", False),
])
def test_a_sandbox_the_container_refuses_is_told_from_a_dracut_failure(failure: str, refused: bool) -> None:
    """A pod without CAP_SYS_CHROOT or a seccomp profile that allows the user namespace gets told what to give it."""
    message = f"dracut (of /rootfs, in a user namespace) failed (exit 1): {failure}"
    assert bool(SANDBOX_REFUSED.search(message)) is refused


# An initrd without the loader of its own programs -----------------------------------------------------------------

LOADER_PATHS = ["usr/bin/bash", "usr/lib64/ld-linux-x86-64.so.2", "usr/lib/x86_64-linux-gnu/libc.so.6"]


def dracut_root_with_bash(tmp_path: Path) -> InitrdJob:
    """A merged-/usr tree (bin -> usr/bin) with this host's bash, which names its loader."""
    (tmp_path / "usr/bin").mkdir(parents=True)
    (tmp_path / "bin").symlink_to("usr/bin")
    shutil.copy("/usr/bin/bash", tmp_path / "usr/bin/bash")
    return InitrdJob(tmp_path, frozenset(), "106", "6.12.1-amd64", loader=shell_loader(Tree.from_directory(tmp_path)))


def test_the_loader_is_read_from_the_elf_program_header(tmp_path: Path) -> None:
    assert elf_interpreter(Path("/usr/bin/bash")) == "/lib64/ld-linux-x86-64.so.2"
    (tmp_path / "script").write_text("#!/bin/sh\n")
    assert elf_interpreter(tmp_path / "script") is None


def test_an_initrd_without_the_loader_of_its_bash_is_told(tmp_path: Path) -> None:
    """Seen once in CI: dracut's ldd found nothing and the initrd held no library at all, without an error."""
    job = dracut_root_with_bash(tmp_path)
    assert job.loader == "/lib64/ld-linux-x86-64.so.2"
    assert loader_left_out(job, LOADER_PATHS) is None
    assert loader_left_out(job, ["usr/bin/bash", "usr/lib/x86_64-linux-gnu/libkmod.so.2"]) == \
        "/lib64/ld-linux-x86-64.so.2"


def test_dracut_makes_it_again_once_and_then_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    job = dracut_root_with_bash(tmp_path / "root")
    runs: list[list[str]] = [["usr/bin/bash"], LOADER_PATHS]

    def dracut(job: InitrdJob, dest: Path, scratch: Path, env: object, listing: Path) -> None:
        listing.write_text("\0".join(runs.pop(0)))

    monkeypatch.setattr(pipeline, "build_initrd", dracut)
    assert pipeline.built_initrd(job, tmp_path / "initrd.img", tmp_path, {}) == LOADER_PATHS
    assert "making it again" in caplog.text
    runs[:] = [["usr/bin/bash"], ["usr/bin/bash"]]
    with pytest.raises(C2BootError, match="dracut twice made an initrd without the shared libraries"):
        pipeline.built_initrd(job, tmp_path / "initrd.img", tmp_path, {})
