"""The outputs cache on real files: store, verified restore, damaged and half-written entries, eviction, keys. (The
e2e tests show a real rebuild reusing the outputs.)"""

import logging
import os
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from container2boot.cache import Cache, output_key
from container2boot.errors import C2BootError
from container2boot.manifest import artifacts, sha256, write_manifest
from container2boot.pipeline import cache_trouble
from tests.conftest import c2boot

MiB = 1024 * 1024


def make_outputs(out: Path, content: bytes = b"kernel") -> Path:
    """A small output directory as a build leaves it: esp/, a sparse disk.img, SHA256SUMS, manifest.json."""
    (out / "esp/container2boot").mkdir(parents=True)
    (out / "esp/container2boot/vmlinuz").write_bytes(content)
    with (out / "disk.img").open("wb") as disk:
        disk.truncate(64 * MiB)  # a hole, as most of an installed disk is
        disk.write(b"GPT")
    files = artifacts(out)
    (out / "SHA256SUMS").write_text("".join(f"{a['sha256']}  {a['path']}\n" for a in files))
    files.append({"path": "SHA256SUMS", "size": 0, "sha256": sha256(out / "SHA256SUMS")})
    write_manifest(out, {"artifacts": files, "cache": "built"})
    return out


def listing(out: Path) -> dict[str, str]:
    return {str(p.relative_to(out)): sha256(p) for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.fixture
def cache(tmp_path: Path) -> Cache:
    return Cache(tmp_path / "cache", 1024 * MiB)


def test_stored_outputs_come_back_identical_and_sparse(cache: Cache, tmp_path: Path) -> None:
    outputs = make_outputs(tmp_path / "out")
    cache.store("k1", outputs, "localhost/img:1", "--diskimage")
    assert not cache.restore("k2", tmp_path / "miss")
    (tmp_path / "again").mkdir()
    assert cache.restore("k1", tmp_path / "again")
    assert listing(tmp_path / "again") == listing(outputs)
    assert (tmp_path / "again/disk.img").stat().st_blocks * 512 < MiB, "the hole was filled in"
    [entry] = cache.entries()
    assert (entry.key, entry.image, entry.settings) == ("k1", "localhost/img:1", "--diskimage")
    assert (cache.directory.stat().st_mode & 0o777) == 0o700  # an entry may hold a password's hash


@pytest.mark.parametrize("damage", ["changed", "missing", "added", "entry"])
def test_a_damaged_entry_is_removed_and_not_used(cache: Cache, tmp_path: Path, damage: str,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    cache.store("k1", make_outputs(tmp_path / "out"), "img", "")
    stored = cache.entries_directory / "k1"
    if damage == "changed":
        (stored / "outputs/esp/container2boot/vmlinuz").write_bytes(b"kernel, but not the same")
    elif damage == "missing":
        (stored / "outputs/disk.img").unlink()
    elif damage == "added":
        (stored / "outputs/esp/extra").write_text("")
    else:
        (stored / "entry.json").write_text("{")
    (tmp_path / "again").mkdir()
    with caplog.at_level(logging.WARNING):
        assert not cache.restore("k1", tmp_path / "again")
    assert "are damaged" in caplog.text and "building them again" in caplog.text
    assert list((tmp_path / "again").iterdir()) == [] and cache.entries() == []


def test_half_written_entries_are_never_used_and_pruned(cache: Cache, tmp_path: Path) -> None:
    cache.store("k1", make_outputs(tmp_path / "out"), "img", "")
    partial = cache.entries_directory / ".c2boot-partial-killed"
    (partial / "outputs").mkdir(parents=True)  # a build killed while storing, an hour ago
    os.utime(partial, (time.time() - 3601,) * 2)
    storing = cache.entries_directory / ".c2boot-partial-storing"
    storing.mkdir()  # another build storing now
    assert [e.key for e in cache.entries()] == ["k1"]
    cache.prune()
    assert not partial.exists() and storing.exists() and [e.key for e in cache.entries()] == ["k1"]


def test_the_same_key_stored_again_replaces_the_entry(cache: Cache, tmp_path: Path) -> None:
    """A --no-cache build (or a concurrent one) stores the same key again: one intact entry, the newer."""
    cache.store("k1", make_outputs(tmp_path / "out"), "img", "")
    cache.store("k1", make_outputs(tmp_path / "newer", b"rebuilt kernel"), "img", "")
    (tmp_path / "again").mkdir()
    assert cache.restore("k1", tmp_path / "again") and len(cache.entries()) == 1
    assert (tmp_path / "again/esp/container2boot/vmlinuz").read_bytes() == b"rebuilt kernel"
    assert not list(cache.entries_directory.glob(".c2boot-*"))


def test_the_least_recently_used_go_first_beyond_the_limit(tmp_path: Path) -> None:
    small = Cache(tmp_path / "cache", 1024 * MiB)
    for number in range(3):
        small.store(f"k{number}", make_outputs(tmp_path / f"out{number}", b"x" * MiB), "img", "")
        os.utime(small.entries_directory / f"k{number}/last-used", (time.time() - 100 + number,) * 2)
    (tmp_path / "use").mkdir()
    small.restore("k0", tmp_path / "use")  # used now: the most recent
    one_entry = small.entries()[0].size
    removed = small.prune(limit=2 * one_entry)
    assert [e.key for e in removed] == ["k1"] and {e.key for e in small.entries()} == {"k0", "k2"}


@pytest.mark.parametrize("free_mib, kept", [(150, ["k1", "k0"]), (90, ["k1"]), (60, [])])
def test_the_cache_leaves_a_tenth_of_its_disk_free(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  free_mib: int, kept: list[str]) -> None:
    """Far below --cache-size, on a 1000 MiB disk with `free_mib` free after storing: entries go, newest kept
    longest, until 100 MiB are free (with 60 MiB free even the new entry goes; the build's outputs are in OUT)."""
    cache = Cache(tmp_path / "cache", 1024 * MiB)
    for number in range(2):
        cache.store(f"k{number}", make_outputs(tmp_path / f"out{number}", b"x" * 20 * MiB), "img", "")
    assert [e.key for e in cache.entries()] == ["k1", "k0"] and cache.entries()[0].size > 20 * MiB
    monkeypatch.setattr(os, "statvfs", lambda path: SimpleNamespace(
        f_frsize=4096, f_blocks=1000 * MiB // 4096, f_bavail=free_mib * MiB // 4096))
    cache.prune(limit=cache.room())
    assert [e.key for e in cache.entries()] == kept


def test_prune_by_age_and_everything(cache: Cache, tmp_path: Path) -> None:
    for number in range(2):
        cache.store(f"k{number}", make_outputs(tmp_path / f"out{number}"), "img", "")
    os.utime(cache.entries_directory / "k0/last-used", (time.time() - 10 * 86400,) * 2)
    assert [e.key for e in cache.prune(unused_for=7 * 86400)] == ["k0"]
    assert [e.key for e in cache.prune(everything=True)] == ["k1"] and cache.entries() == []


def test_the_key_follows_the_content_of_the_files_the_settings_name(tmp_path: Path) -> None:
    key_file = tmp_path / "id.pub"
    key_file.write_text("ssh-ed25519 AAAA one\n")
    parts = {"image_id": "sha256:1", "settings": ["--diskimage"]}
    first = output_key(parts, [key_file])
    assert output_key(parts, [key_file]) == first
    assert output_key({**parts, "settings": ["--diskimage", "--bios"]}, [key_file]) != first
    key_file.write_text("ssh-ed25519 AAAA two\n")
    assert output_key(parts, [key_file]) != first


def test_cache_list_and_prune_on_the_command_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    Cache(tmp_path / "xdg/container2boot", 1024 * MiB).store(
        "0123456789abcdef", make_outputs(tmp_path / "out"), "localhost/img:1", "--diskimage --bios")
    listed = c2boot("cache", "list").stdout.splitlines()
    assert listed[0].startswith("0123456789ab ") and listed[0].endswith("localhost/img:1 --diskimage --bios")
    assert listed[1].startswith("1 cached build(s)") and str(tmp_path / "xdg/container2boot") in listed[1]
    assert "removed 1 cached build(s)" in c2boot("cache", "prune", "--all").stderr
    assert c2boot("cache", "list").stdout.startswith("0 cached build(s)")
    bad = c2boot("cache", "prune", "--older-than", "-1", check=False)
    assert bad.returncode == 1 and "--older-than -1: give a number of days" in bad.stderr


def test_a_cache_that_cannot_be_used_costs_time_not_the_build(tmp_path: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "a-file").write_text("")
    unusable = Cache(tmp_path / "a-file/container2boot", 1024 * MiB)  # a home that is not a directory
    with caplog.at_level(logging.WARNING):
        with cache_trouble(unusable):
            assert not unusable.restore("k1", tmp_path)
        with cache_trouble(unusable, storing=True):
            unusable.store("k1", make_outputs(tmp_path / "out"), "img", "")
    assert caplog.text.count("cannot be used") == 2 and "going on without it" in caplog.text
    with pytest.raises(C2BootError), cache_trouble(unusable):  # a failed copy into the outputs stops the build
        raise C2BootError("cp failed")
