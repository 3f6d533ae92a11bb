"""The layers of an image made one root tar: the OCI rules (replacement, whiteouts, opaque directories), hardlinks
(also to a file a later layer removed), and owners, modes and xattrs, read back from the tar written; what the
registry module makes of an image's reference and configuration."""

import gzip
import io
import subprocess
import tarfile
from pathlib import Path

import pytest

from container2boot.errors import C2BootError
from container2boot.layers import write_root_tar
from container2boot.registry import FetchedImage, fetch_image, image_config, is_image_reference
from container2boot.tarmerge import merge

Member = tuple[str, str, bytes | str]  # name, kind (file, dir, link, symlink), contents or link target


def layer(path: Path, members: list[Member], compress: bool = False, **extra: object) -> Path:
    """A layer tar as a registry holds it (`extra`: header fields for every file member, e.g. uid)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, kind, value in members:
            info = tarfile.TarInfo(name)
            info.mtime = 1_700_000_000
            if kind == "dir":
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            elif kind in ("link", "symlink"):
                info.type = tarfile.LNKTYPE if kind == "link" else tarfile.SYMTYPE
                info.linkname = str(value)
                tar.addfile(info)
            else:
                data = value if isinstance(value, bytes) else value.encode()
                info.size, info.mode = len(data), 0o644
                for key, setting in extra.items():
                    if key == "xattrs":
                        info.pax_headers = dict(setting)  # type: ignore[call-overload]
                    else:
                        setattr(info, key, setting)
                tar.addfile(info, io.BytesIO(data))
    raw = buffer.getvalue()
    path.write_bytes(gzip.compress(raw, mtime=0) if compress else raw)
    return path


def merged(tmp_path: Path, *layers: Path) -> dict[str, tuple[tarfile.TarInfo, bytes | None]]:
    out = write_root_tar(layers, tmp_path / "root.tar")
    with tarfile.open(out) as tar:
        return {m.name: (m, tar.extractfile(m).read() if m.isreg() else None)  # type: ignore[union-attr]
                for m in tar.getmembers()}


def test_later_layers_replace_and_whiteouts_remove(tmp_path: Path) -> None:
    base = layer(tmp_path / "1", [("./", "dir", ""), ("./etc/", "dir", ""), ("./etc/hostname", "file", "old"),
                                  ("./etc/gone", "file", "x"), ("./var/", "dir", ""), ("./var/cache/", "dir", ""),
                                  ("./var/cache/a", "file", "a"), ("./var/cache/sub/", "dir", ""),
                                  ("./var/cache/sub/b", "file", "b")], compress=True)
    top = layer(tmp_path / "2", [("etc/", "dir", ""), ("etc/hostname", "file", "new"), ("etc/.wh.gone", "file", ""),
                                 ("var/.wh.cache", "file", ""), ("usr/bin/tool", "file", "implied parents")])
    root = merged(tmp_path, base, top)
    assert root["etc/hostname"][1] == b"new"
    assert "etc/gone" not in root and not any(name.startswith("var/cache") for name in root)
    assert not any(".wh." in name for name in root) and "." not in root and "" not in root
    assert root["usr/bin/tool"][1] == b"implied parents" and list(root).count("etc") == 1


def test_an_opaque_directory_hides_only_lower_layers(tmp_path: Path) -> None:
    base = layer(tmp_path / "1", [("opt/", "dir", ""), ("opt/old", "file", "o"), ("opt/deep/", "dir", ""),
                                  ("opt/deep/older", "file", "o")])
    top = layer(tmp_path / "2", [("opt/", "dir", ""), ("opt/new", "file", "n"), ("opt/deep/", "dir", ""),
                                 ("opt/.wh..wh..opq", "file", "")])
    root = merged(tmp_path, base, top)
    assert {name for name in root if name.startswith("opt/")} == {"opt/new", "opt/deep"}


def test_a_directory_over_a_file_and_a_file_over_a_directory(tmp_path: Path) -> None:
    base = layer(tmp_path / "1", [("a", "file", "file"), ("b/", "dir", ""), ("b/inside", "file", "x")])
    top = layer(tmp_path / "2", [("a/", "dir", ""), ("a/child", "file", "c"), ("b", "file", "now a file")])
    root = merged(tmp_path, base, top)
    assert root["a"][0].isdir() and root["a/child"][1] == b"c"
    assert root["b"][1] == b"now a file" and "b/inside" not in root


def test_owners_modes_and_xattrs_are_kept(tmp_path: Path) -> None:
    xattrs = {"SCHILY.xattr.security.capability": "\x01\x00\x00\x02 \x00\x00\x00"}
    base = layer(tmp_path / "1", [("usr/bin/ping", "file", "elf")], uid=0, gid=0, mode=0o4755, uname="root",
                 xattrs=xattrs)
    shadow = layer(tmp_path / "2", [("etc/shadow", "file", "root:*:")], uid=0, gid=42, mode=0o640)
    root = merged(tmp_path, base, shadow)
    ping, _ = root["usr/bin/ping"]
    assert ping.mode == 0o4755 and ping.uname == "root"
    assert ping.pax_headers["SCHILY.xattr.security.capability"] == xattrs["SCHILY.xattr.security.capability"]
    assert (root["etc/shadow"][0].gid, root["etc/shadow"][0].mode) == (42, 0o640)


def test_hardlinks_stay_hardlinks(tmp_path: Path) -> None:
    base = layer(tmp_path / "1", [("usr/bin/perl5", "file", "perl"), ("usr/bin/perl", "link", "usr/bin/perl5")])
    root = merged(tmp_path, base)
    assert root["usr/bin/perl"][0].islnk() and root["usr/bin/perl"][0].linkname == "usr/bin/perl5"
    assert root["usr/bin/perl5"][1] == b"perl"


def test_a_hardlink_to_a_removed_file_keeps_its_contents(tmp_path: Path) -> None:
    """Unpacking in order leaves the links with the old inode: the first link gets the contents, the rest link to
    it; a replaced target's new contents are its own."""
    base = layer(tmp_path / "1", [("lib/real", "file", "shared"), ("lib/one", "link", "lib/real"),
                                  ("lib/two", "link", "./lib/real"), ("lib/moved", "file", "old"),
                                  ("lib/keeps", "link", "lib/moved")])
    top = layer(tmp_path / "2", [("lib/.wh.real", "file", ""), ("lib/moved", "file", "replaced")])
    root = merged(tmp_path, base, top)
    assert "lib/real" not in root
    assert root["lib/one"][0].isreg() and root["lib/one"][1] == b"shared"
    assert root["lib/two"][0].islnk() and root["lib/two"][0].linkname == "lib/one"
    assert root["lib/keeps"][1] == b"old" and root["lib/moved"][1] == b"replaced"


def test_a_hardlink_to_nothing_and_a_broken_layer_are_clear_errors(tmp_path: Path) -> None:
    dangling = layer(tmp_path / "1", [("a", "link", "missing")])
    with pytest.raises(C2BootError, match="hardlink a to missing"):
        write_root_tar((dangling,), tmp_path / "root.tar")
    (tmp_path / "2").write_bytes(gzip.compress(b"not a tar at all" * 100))
    with pytest.raises(C2BootError, match="not a readable tar"):
        write_root_tar((tmp_path / "2",), tmp_path / "root.tar")
    assert not (tmp_path / "root.tar").exists()


def test_an_image_reference_is_told_from_a_path_and_its_config_read() -> None:
    assert is_image_reference("docker://registry.example.org/vms/web:1") and is_image_reference("oci-archive:a.tar")
    assert not is_image_reference("./rootfs.tar") and not is_image_reference("/rootfs")
    config = image_config({"architecture": "amd64", "config": {"Entrypoint": ["/srv/app"], "Env": ["A=1"],
                                                               "User": "www", "WorkingDir": "/srv"}})
    assert (config.entrypoint, config.env, config.user, config.working_dir, config.architecture) == \
        (("/srv/app",), ("A=1",), "www", "/srv", "amd64")
    image = FetchedImage("docker://r/x:1", "sha256:" + "a" * 64, "sha256:" + "b" * 64, 1_700_000_000, config, ())
    assert image.source({}) == {"image": "docker://r/x:1", "digest": "sha256:" + "a" * 64, "id": "b" * 64,
                                "source_date_epoch": "1700000000"}
    assert image.source({"source_date_epoch": "5"})["source_date_epoch"] == "5"


def test_a_missing_auth_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(C2BootError, match=r"--authfile .* is not a file"):
        fetch_image("docker://r/x:1", tmp_path / "image", True, tmp_path / "auth.json")


def test_every_member_of_a_multi_member_gzip_layer_is_read(tmp_path: Path) -> None:
    """eStargz layers (and concatenated gzip streams) are several gzip members in a row."""
    raw = layer(tmp_path / "plain", [("a", "file", "1"), ("b", "file", "2"), ("c", "file", "3")]).read_bytes()
    (tmp_path / "1").write_bytes(gzip.compress(raw[:1024]) + gzip.compress(raw[1024:]))
    assert {name: data for name, (_, data) in merged(tmp_path, tmp_path / "1").items()} == \
        {"a": b"1", "b": b"2", "c": b"3"}


def test_directories_only_implied_by_their_files(tmp_path: Path) -> None:
    """No layer lists a/ or a/b/: a whiteout of a/ still removes a/b/c, and an opaque a/ keeps this layer's a/b/new
    while hiding the lower a/b/old."""
    base = layer(tmp_path / "1", [("a/b/c", "file", "c"), ("d/e/old", "file", "o")])
    top = layer(tmp_path / "2", [(".wh.a", "file", ""), ("d/e/new", "file", "n"), ("d/.wh..wh..opq", "file", "")])
    assert set(merged(tmp_path, base, top)) == {"d/e/new"}


def test_a_whiteout_hides_lower_layers_only(tmp_path: Path) -> None:
    same = layer(tmp_path / "1", [("x", "file", "kept"), (".wh.x", "file", "")])
    assert merged(tmp_path, same)["x"][1] == b"kept"


def test_hardlinks_to_a_symlink_also_when_it_is_gone(tmp_path: Path) -> None:
    """Docker and containers/storage write a hardlink for any inode with more links: a symlink's too (ostree)."""
    base = layer(tmp_path / "1", [("s", "symlink", "target"), ("t", "link", "s"), ("u", "link", "s"),
                                  ("f", "file", "data"), ("g", "link", "f")])
    top = layer(tmp_path / "2", [(".wh.s", "file", ""), (".wh.f", "file", "")])
    root = merged(tmp_path, base, top)
    assert root["t"][0].issym() and root["t"][0].linkname == "target"
    assert root["u"][0].islnk() and root["u"][0].linkname == "t"
    assert root["g"][0].isreg() and root["g"][0].linkname == "" and root["g"][1] == b"data"


def test_a_sparse_file_is_written_whole_and_readable(tmp_path: Path) -> None:
    """GNU tar's PAX sparse records are tarfile's to apply, not to copy: the merged tar must stay readable."""
    source = tmp_path / "src"
    source.mkdir()
    with (source / "sparse").open("wb") as f:
        f.seek(1 << 20)
        f.write(b"end")
    subprocess.run(["tar", "--create", "--sparse", "--format=posix", "--file", tmp_path / "1", "--directory",
                    source, "sparse"], check=True)
    root = merged(tmp_path, tmp_path / "1")
    assert root["sparse"][1] == b"\0" * (1 << 20) + b"end"
    assert not any(key.startswith("GNU.sparse") for key in root["sparse"][0].pax_headers)
    subprocess.run(["tar", "--list", "--file", tmp_path / "root.tar"], check=True, capture_output=True)


def test_the_packed_stream_keeps_the_tars_owners_and_adds_the_builds_files(tmp_path: Path) -> None:
    """tarmerge: the rootfs tar's owners and setuid bits (which an unprivileged unpacking loses), without the paths
    the build replaces, then the build's files, owned by root when this user made them."""
    rootfs = layer(tmp_path / "rootfs.tar", [("./etc/", "dir", ""), ("./etc/machine-id", "file", "image's"),
                                             ("./usr/bin/passwd", "file", "elf"), ("./usr/bin/chfn", "link",
                                                                                   "./usr/bin/passwd")],
                   uid=0, gid=0, mode=0o4755)
    extra = tmp_path / "extra"
    (extra / "etc").mkdir(parents=True)
    (extra / "etc" / "machine-id").write_text("")
    (extra / "etc" / "added").write_text("new")
    with tarfile.open(tmp_path / "out.tar", "w", format=tarfile.PAX_FORMAT) as out:
        merge(rootfs, extra, {"etc/machine-id"}, out)
    with tarfile.open(tmp_path / "out.tar") as tar:
        members = {m.name: m for m in tar.getmembers()}
        assert [m.name for m in tar.getmembers()].count("etc") == 1
        assert tar.extractfile("etc/machine-id").read() == b""  # type: ignore[union-attr]
    assert (members["usr/bin/passwd"].mode, members["usr/bin/passwd"].uid) == (0o4755, 0)
    assert members["usr/bin/chfn"].islnk() and members["usr/bin/chfn"].linkname == "usr/bin/passwd"
    assert members["etc/added"].uid == 0 and members["etc/machine-id"].uid == 0
