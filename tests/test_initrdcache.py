"""The initrd cache on real trees: what an initrd was made of, what changes make it again, what does not. (The e2e
tests build changed images with the real dracut.)"""

import logging
from pathlib import Path

import pytest

from container2boot.initrd import InitrdJob
from container2boot.initrdcache import InitrdCache, fingerprint, inside, recipe, still_the_same

KVER = "6.12.1-amd64"
INITRD_PATHS = ["init", "usr", "usr/bin", "usr/bin/systemctl", "bin", "etc", "etc/os-release",
                f"usr/lib/modules/{KVER}", f"usr/lib/modules/{KVER}/kernel/virtio_blk.ko",
                "usr/lib/initrd-release"]  # init and initrd-release: made by dracut, not from the image


def make_tree(root: Path) -> Path:
    """A merged-/usr image with dracut, systemd, a kernel's modules and a web page."""
    for path, content in {"usr/bin/systemctl": "systemctl", "usr/bin/bash": "bash",
                          f"usr/lib/modules/{KVER}/kernel/virtio_blk.ko": "module",
                          "usr/lib/dracut/modules.d/90kernel-modules/module-setup.sh": "setup",
                          "etc/dracut.conf.d/10-debian.conf": "compress=zstd", "usr/lib/os-release": "ID=debian",
                          "var/www/index.html": "hello"}.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(content)
    (root / "bin").symlink_to("usr/bin")
    (root / "etc/os-release").symlink_to("/usr/lib/os-release")  # absolute: inside the tree, as when booted
    return root


def job_for(root: Path, **changes: object) -> InitrdJob:
    return InitrdJob(root, frozenset({"dmsquash-live"}), "106", KVER, **changes)  # type: ignore[arg-type]


def test_links_resolve_inside_the_tree(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "root")
    (root / "loop").symlink_to("loop")
    assert inside(root, "bin/systemctl") == root / "usr/bin/systemctl"
    assert inside(root, "etc/os-release") == root / "usr/lib/os-release"  # never the host's /usr/lib/os-release
    assert inside(root, "bin/../../etc/os-release") == root / "usr/lib/os-release"  # .. after the link: usr/
    assert inside(root, "usr/bin/missing") is None and inside(root, "loop/x") is None


@pytest.mark.parametrize(("change", "same"), [
    ("var/www/index.html", True),  # a new web page: not in the initrd
    ("usr/bin/systemctl", False),  # a binary the initrd holds
    ("usr/lib/os-release", False),  # through the etc/os-release link
    (f"usr/lib/modules/{KVER}/kernel/virtio_blk.ko", False),  # a module the initrd holds
    ("usr/bin/lvm", False),  # a new binary where dracut took binaries from: a module may want it now
    ("etc/modprobe.d/blacklist.conf", False),  # dracut takes every modprobe.d file, none were there before
])
def test_only_what_the_initrd_took_counts(tmp_path: Path, change: str, same: bool) -> None:
    root = make_tree(tmp_path / "root")
    recorded = fingerprint(job_for(root), INITRD_PATHS)
    assert "init" not in recorded and "etc/os-release" in recorded and "usr/bin/" in recorded
    (root / change).parent.mkdir(parents=True, exist_ok=True)
    (root / change).write_text("changed")
    assert still_the_same(job_for(root), recorded) is same


def test_a_changed_mode_or_link_also_counts(tmp_path: Path) -> None:
    """dracut-install copies modes and links as they are: a dropped setuid bit or a relinked file is a change."""
    root = make_tree(tmp_path / "root")
    recorded = fingerprint(job_for(root), INITRD_PATHS)
    (root / "usr/bin/systemctl").chmod(0o4755)
    assert not still_the_same(job_for(root), recorded)
    (root / "usr/bin/systemctl").chmod(0o644)
    (root / "etc/os-release").unlink()
    (root / "etc/os-release").symlink_to("../usr/lib/os-release")  # the same file through another link
    assert not still_the_same(job_for(root), recorded)


def test_another_trees_modules_are_read_from_that_tree(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "root")
    modules = tmp_path / "kernel/usr/lib/modules" / KVER
    (modules / "kernel").mkdir(parents=True)
    (modules / "kernel/virtio_blk.ko").write_text("the kernel image's module")
    job = job_for(root, kernel_modules=modules)
    recorded = fingerprint(job, INITRD_PATHS)
    (root / f"usr/lib/modules/{KVER}/kernel/virtio_blk.ko").write_text("the image's own: not used")
    assert still_the_same(job, recorded)
    (modules / "kernel/virtio_blk.ko").write_text("a rebuilt module")
    assert not still_the_same(job, recorded)


def test_the_recipe_follows_dracut_its_files_the_modules_and_the_date(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "root")
    first = recipe(job_for(root), 1700000000)
    (root / "var/www/index.html").write_text("a new page")
    assert recipe(job_for(root), 1700000000) == first
    assert recipe(job_for(root), 1700000001) != first
    assert recipe(job_for(root, root_fstype="ext4"), 1700000000) != first  # another dracut command line
    (root / "etc/dracut.conf.d/10-debian.conf").write_text("compress=xz")
    second = recipe(job_for(root), 1700000000)
    assert second != first
    (root / f"usr/lib/modules/{KVER}/kernel/new.ko").write_text("another module")
    assert recipe(job_for(root), 1700000000) != second


def test_an_initrd_comes_back_only_for_the_same_inputs(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = make_tree(tmp_path / "root")
    cache = InitrdCache(tmp_path / "cache")
    (tmp_path / "initrd.img").write_bytes(b"an initrd")
    cache.store(job_for(root), "recipe", tmp_path / "initrd.img", INITRD_PATHS)
    assert cache.restore(job_for(root), "recipe", tmp_path / "reused.img")
    assert (tmp_path / "reused.img").read_bytes() == b"an initrd"
    assert not cache.restore(job_for(root), "another recipe", tmp_path / "other.img")
    (root / "usr/bin/systemctl").write_text("a new systemctl")
    assert not cache.restore(job_for(root), "recipe", tmp_path / "stale.img")
    assert not (tmp_path / "stale.img").exists()
    (root / "usr/bin/systemctl").write_text("systemctl")
    [entry] = (tmp_path / "cache/initrd/recipe").iterdir()
    (entry / "initrd.img").write_bytes(b"damaged")
    with caplog.at_level(logging.WARNING):
        assert not cache.restore(job_for(root), "recipe", tmp_path / "damaged.img")
    assert "is damaged" in caplog.text and not entry.exists()


def test_a_few_initrds_are_kept_per_recipe(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "root")
    cache = InitrdCache(tmp_path / "cache")
    (tmp_path / "initrd.img").write_bytes(b"an initrd")
    for number in range(5):
        (root / "usr/bin/systemctl").write_text(f"systemctl {number}")
        cache.store(job_for(root), "recipe", tmp_path / "initrd.img", INITRD_PATHS)
    assert len([p for p in (tmp_path / "cache/initrd/recipe").iterdir() if not p.name.startswith(".")]) == 3
    assert cache.restore(job_for(root), "recipe", tmp_path / "newest.img")  # systemctl 4: the last one stored
