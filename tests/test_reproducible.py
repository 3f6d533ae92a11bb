"""Reproducible outputs: the source date and the seed, and what they fix (the unit parts; the e2e tests build the
same image twice and compare disk.img)."""

import os
import subprocess
from pathlib import Path

import pytest

from container2boot.config import Config
from container2boot.errors import C2BootError
from container2boot.manifest import build_manifest
from container2boot.pipeline import reproducibility
from container2boot.reproducible import decide, image_created, source_date_epoch
from container2boot.rootfs import examine_directory
from container2boot.rootimage import TAR_CREATE
from container2boot.rootpartition import prepare
from tests.test_plan import plan_of
from tests.test_rootfs import make_rootfs


def test_the_seed_follows_the_image_the_date_and_the_settings() -> None:
    same = decide(1700000000, "sha256:abc", ["--diskimage"])
    assert same == decide(1700000000, "sha256:abc", ["--diskimage"])
    assert same.seed != decide(1700000001, "sha256:abc", ["--diskimage"]).seed
    assert same.seed != decide(1700000000, "sha256:abd", ["--diskimage"]).seed
    assert same.seed != decide(1700000000, "sha256:abc", ["--diskimage", "--bios"]).seed
    assert same.uuid("root partition") != same.uuid("ext4 hash seed")
    assert same.mbr_label_id().startswith("0x") and len(same.mbr_label_id()) == 10


def test_tools_get_the_source_date_and_ext4_a_fixed_hash_seed() -> None:
    env = decide(1700000000, "image", []).environment()
    assert env["SOURCE_DATE_EPOCH"] == "1700000000" and env["PATH"] == os.environ["PATH"]
    assert env["SYSTEMD_REPART_MKFS_OPTIONS_EXT4"].startswith("-E hash_seed=")


@pytest.mark.parametrize("text", ["yesterday", "-1", "1.5", ""])
def test_a_bad_source_date_epoch_is_a_clear_error(text: str) -> None:
    with pytest.raises(C2BootError, match=r"SOURCE_DATE_EPOCH=.* is not a number of seconds since 1970"):
        source_date_epoch(text)


def test_the_source_date_comes_from_the_environment_or_from_now() -> None:
    given = reproducibility(Config(source={"source_date_epoch": "1700000000", "id": "sha256:abc"}))
    assert given == reproducibility(Config(source={"source_date_epoch": "1700000000", "id": "sha256:abc"}))
    assert given.epoch == 1700000000
    assert reproducibility(Config()).epoch > 1700000000


@pytest.mark.parametrize(("created", "epoch"), [
    ("2026-11-27T18:35:12.123456789Z", 1795804512),
    ("2026-11-27T19:35:12+01:00", 1795804512),
    ("2026-11-27T18:35:12Z", 1795804512),
    ("not a date", None),
])
def test_image_creation_times_as_podman_reports_them(created: str, epoch: int | None) -> None:
    assert image_created(created) == epoch


def test_clamping_gives_every_file_the_source_date(tmp_path: Path) -> None:
    (tmp_path / "tree/etc").mkdir(parents=True)
    (tmp_path / "tree/etc/hostname").write_text("web1\n")
    (tmp_path / "tree/etc/link").symlink_to("hostname")
    decide(1700000000, "image", []).clamp_times(tmp_path / "tree")
    for path in (tmp_path / "tree", tmp_path / "tree/etc", tmp_path / "tree/etc/hostname"):
        assert path.stat().st_mtime == 1700000000
    assert (tmp_path / "tree/etc/link").lstat().st_mtime == 1700000000


def test_the_root_partition_uuid_and_overlay_are_the_same_in_every_rebuild(tmp_path: Path) -> None:
    root = make_rootfs(tmp_path / "root")
    same = decide(1700000000, "image", [])
    first, second = (prepare(root, "ext4", tmp_path / name, same) for name in ("a", "b"))
    assert first.partuuid == second.partuuid == str(same.uuid("root partition"))
    assert (first.overlay / "etc/fstab").stat().st_mtime == 1700000000
    assert prepare(root, "ext4", tmp_path / "c", decide(1700000001, "image", [])).partuuid != first.partuuid


def test_the_tar_stream_lists_files_in_name_order_whatever_the_directory_order(tmp_path: Path) -> None:
    for names, tree in ((("b", "a", "c"), tmp_path / "one"), (("c", "a", "b"), tmp_path / "two")):
        tree.mkdir()
        for name in names:  # created in a different order
            (tree / name).write_text(name)
    listings = [subprocess.run([*TAR_CREATE, "--directory", tree, "."], capture_output=True, check=True).stdout
                for tree in (tmp_path / "one", tmp_path / "two")]
    members = [subprocess.run(["tar", "--list"], input=listing, capture_output=True, check=True).stdout.split()
               for listing in listings]
    assert members[0] == members[1] == [b"./", b"./a", b"./b", b"./c"]


def test_the_manifest_is_dated_by_the_source_date(tmp_path: Path) -> None:
    report = examine_directory(make_rootfs(tmp_path))
    manifest = build_manifest(report=report, plan=plan_of(report), supplied_kernel=None, source={}, cmdline="",
                              boot={}, disk_images=[], files=[], timings={}, created=1700000000)
    assert manifest["created"] == "2023-11-14T22:13:20+00:00"
