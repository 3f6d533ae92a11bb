"""SELinux labelling: what the build decides, the label lookup in a policy's file_contexts (libselinux), the tar
stream the live root image is packed from, and the ext4 root partition; the labels are read back from the
squashfs and ext4 images the real tools make, not from the inputs."""

import io
import os
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from container2boot import selinux
from container2boot.bootcheck import BootReport, decide, parse_report
from container2boot.config import Config
from container2boot.errors import C2BootError
from container2boot.rootimage import TAR_CREATE
from container2boot.tree import Tree
from tests.conftest import require_host_tools

FILE_CONTEXTS = r"""/.*	system_u:object_r:default_t:s0
/	-d	system_u:object_r:root_t:s0
/etc(/.*)?	system_u:object_r:etc_t:s0
/etc/shadow.*	--	system_u:object_r:shadow_t:s0
/usr/bin(/.*)?	system_u:object_r:bin_t:s0
/usr/bin/passwd	--	system_u:object_r:passwd_exec_t:s0
/bin	-l	system_u:object_r:bin_t:s0
/proc	-d	<<none>>
/proc/.*	<<none>>
/lost\+found(/.*)?	system_u:object_r:lost_found_t:s0
/home/[^/]+	-d	unconfined_u:object_r:user_home_dir_t:s0
/home/[^/]+/.+	unconfined_u:object_r:user_home_t:s0
"""
LABEL = "system_u:object_r:{}_t:s0"


@pytest.fixture
def contexts(tmp_path: Path) -> Path:
    path = tmp_path / "contexts" / "file_contexts"
    path.parent.mkdir()
    path.write_text(FILE_CONTEXTS)
    return path


def test_decide_follows_the_setting_and_the_image() -> None:
    assert selinux.decide("auto", None, None, "img") is None, "no policy: nothing changes"
    off = selinux.decide("off", "default", "enforcing", "img")
    assert off == selinux.SELinux("disabled", None) and off.kernel_arguments() == "selinux=0"
    auto = selinux.decide("auto", "default", "permissive", "img")
    assert auto == selinux.SELinux("permissive", "default") and auto.labels_root
    assert auto.kernel_arguments() == "security=selinux selinux=1 enforcing=0"
    assert selinux.decide("enforcing", "targeted", "permissive", "img") == selinux.SELinux("enforcing", "targeted")
    assert selinux.decide("auto", "default", None, "img") == selinux.SELinux("permissive", "default")
    assert selinux.decide("auto", "default", "disabled", "img").kernel_arguments() == "selinux=0"  # type: ignore
    xfs = selinux.decide("auto", "default", "enforcing", "img", installed_fstype="xfs")
    assert xfs is not None and xfs.relabel_at_boot and not xfs.labels_root
    assert selinux.decide("auto", "default", "enforcing", "img", boots_own_init=False) is None


@pytest.mark.parametrize(("setting", "policy", "kwargs", "message"), [
    ("enforcing", None, {}, r"--selinux enforcing: img has no SELinux policy .*selinux-policy-default"),
    ("permissive", "default", {"boots_own_init": False}, r"application image, whose init loads no policy"),
    ("enforcing", "default", {"installed_fstype": "btrfs"}, r"a btrfs root partition cannot be labelled without "
     r"privileges: use --rootfs-type ext4"),
    ("permissive", "default", {"mode": "disabled"}, r"img's /etc/selinux/config says SELINUX=disabled"),
])
def test_decide_refuses_what_cannot_be_done(setting: str, policy: str | None, kwargs: dict[str, object],
                                            message: str) -> None:
    with pytest.raises(C2BootError, match=message):
        mode = str(kwargs.pop("mode", "enforcing"))
        selinux.decide(setting, policy, mode, "img", **kwargs)  # type: ignore[arg-type]


def test_image_mode() -> None:
    assert selinux.image_mode("# SELINUX=enforcing\nSELINUX=Permissive\nSELINUXTYPE=default\n") == "permissive"
    assert selinux.image_mode('SELINUX="enforcing"') == "enforcing"
    assert selinux.image_mode("SELINUX=maybe") is None


def test_lookup_by_path_and_type(contexts: Path) -> None:
    with selinux.labels(contexts) as found:
        assert found.lookup("/etc/shadow", stat.S_IFREG) == LABEL.format("shadow")
        assert found.lookup("/etc/shadow", stat.S_IFDIR) == LABEL.format("etc"), "-- means regular files only"
        assert found.lookup("/", stat.S_IFDIR) == LABEL.format("root")
        assert found.lookup("/bin", stat.S_IFLNK) == LABEL.format("bin")
        assert found.lookup("/proc", stat.S_IFDIR) is None
        assert found.lookup("/home/demo/.bashrc", stat.S_IFREG) == "unconfined_u:object_r:user_home_t:s0"


def test_a_broken_file_contexts_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "file_contexts").write_text("not a path and too many fields\n")
    with pytest.raises(C2BootError, match=r"libselinux could not read the image's file_contexts \(Invalid argument\)"):
        selinux.Labels(tmp_path / "file_contexts")


def member(tar: tarfile.TarFile, name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"",
           link: str = "", xattrs: dict[str, str] | None = None) -> None:
    info = tarfile.TarInfo(name)
    info.type, info.size, info.linkname, info.mode = kind, len(data), link, 0o755 if kind == tarfile.DIRTYPE else 0o640
    info.pax_headers = {f"SCHILY.xattr.{k}": v for k, v in (xattrs or {}).items()}
    tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def test_the_tar_filter_labels_what_tar2sqfs_packs(contexts: Path, tmp_path: Path) -> None:
    require_host_tools("tar2sqfs", "rdsquashfs")
    source = io.BytesIO()
    with tarfile.open(fileobj=source, mode="w", format=tarfile.PAX_FORMAT) as tar:
        member(tar, "./", tarfile.DIRTYPE)
        member(tar, "./etc", tarfile.DIRTYPE)
        member(tar, "./etc/shadow", data=b"root:*:1::::::\n",
               xattrs={"security.selinux": "system_u:object_r:wrong_t:s0", "user.kept": "yes"})
        member(tar, "./etc/shadow-", tarfile.LNKTYPE, link="./etc/shadow")
        member(tar, "./usr", tarfile.DIRTYPE)
        member(tar, "./usr/bin", tarfile.DIRTYPE)
        member(tar, "./usr/bin/passwd", data=b"\x7fELF")
        member(tar, "./bin", tarfile.SYMTYPE, link="usr/bin")
        member(tar, "./proc", tarfile.DIRTYPE)
    labelled = subprocess.run([sys.executable, "-m", "container2boot.selinux", contexts], input=source.getvalue(),
                              capture_output=True, check=True).stdout
    image = tmp_path / "root.sqfs"
    subprocess.run(["tar2sqfs", "--quiet", "--no-skip", "--force", image], input=labelled, check=True)

    def xattrs(path: str) -> list[str]:
        return subprocess.run(["rdsquashfs", "-x", path, image], capture_output=True, text=True,
                              check=True).stdout.split()

    assert sorted(xattrs("/etc/shadow")) == [f"security.selinux={LABEL.format('shadow')}", "user.kept=yes"]
    assert xattrs("/") == [f"security.selinux={LABEL.format('root')}"]
    assert xattrs("/usr/bin/passwd") == [f"security.selinux={LABEL.format('passwd_exec')}"]
    assert xattrs("/bin") == [f"security.selinux={LABEL.format('bin')}"]
    assert xattrs("/proc") == [], "the policy gives /proc no label"


def test_a_failing_label_lookup_stops_the_filter(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "container2boot.selinux", tmp_path / "missing"], input=b"",
                            capture_output=True, check=False)
    assert result.returncode == 1 and b"error: libselinux could not read" in result.stderr


def test_the_ext4_partition_is_labelled_in_place(contexts: Path, tmp_path: Path) -> None:
    require_host_tools("mkfs.ext4", "debugfs")
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc/shadow").write_text("root:*:1::::::\n")
    (tree / "home/demo/with space").mkdir(parents=True)
    (tree / 'home/demo/with space/q"uote').write_text("x")
    (tree / os.fsdecode(b"home/demo/caf\xe9")).write_text("a name that is not UTF-8")
    (tree / "bin").symlink_to("usr/bin")
    (tree / "etc/fstab").write_text("# new\n")
    partition = tmp_path / "part.img"
    with partition.open("wb") as f:
        f.truncate(64 * 1024 * 1024)
    subprocess.run(["mkfs.ext4", "-q", "-d", tree, partition], check=True)
    disk = tmp_path / "disk.img"
    offset = 1024 * 1024
    with disk.open("wb") as f:
        f.truncate(offset)
        f.seek(offset)
        f.write(partition.read_bytes())
    count = selinux.label_partition(disk, offset, contexts, tmp_path)
    assert count == 11, "every path of the file system (lost+found too) has a label in this policy"

    def label(path: str) -> str:
        quoted = '"' + path.replace('"', '""') + '"'
        result = subprocess.run(["debugfs", "-R", f"ea_get {quoted} security.selinux", f"{disk}?offset={offset}"],
                                capture_output=True, text=True, errors="surrogateescape", check=True)
        return result.stdout.strip().partition(" = ")[2].strip('"')

    assert label("/etc/shadow") == LABEL.format("shadow")
    assert label("/") == LABEL.format("root")
    assert label("/lost+found") == LABEL.format("lost_found")
    assert label('/home/demo/with space/q"uote') == "unconfined_u:object_r:user_home_t:s0"
    assert label("/bin") == LABEL.format("bin")
    assert label(os.fsdecode(b"/home/demo/caf\xe9")) == "unconfined_u:object_r:user_home_t:s0"


def test_what_debugfs_cannot_do_is_an_error(contexts: Path, tmp_path: Path) -> None:
    require_host_tools("debugfs")
    image = tmp_path / "part.img"
    with image.open("wb") as f:
        f.truncate(16 * 1024 * 1024)  # no file system
    with pytest.raises(C2BootError, match=r"^debugfs failed \(exit 1\): .*does not exist"):
        selinux.label_partition(image, 0, contexts, tmp_path)


def test_the_boot_report_carries_the_mode_and_the_denials() -> None:
    text = "\n".join(["c2boot-report-begin", "reached 20.0", "state running", "default_target multi-user.target",
                      "target_state active", "selinux 1",
                      "audit(1.2:3): avc:  denied  { read } for  pid=5 comm=\"x\" name=\"/\" tclass=dir", "end"])
    text = text.replace("audit(1.2", "avc_count 7\navc audit(1.2")
    values = parse_report(text)
    report = BootReport(ok=False, verdict="", boot="disk", verdict_kind="report", firmware="uefi",
                        accelerator="tcg", image="d")
    result = decide(report, values, "", None, 20.0, 300)
    assert (result.ok, result.selinux, result.avc_denials) == (True, "enforcing", 7)
    assert result.avc_examples == ['audit(1.2:3): avc:  denied  { read } for  pid=5 comm="x" name="/" tclass=dir']
    assert "warning: 7 SELinux AVC denial(s) during the boot" in result.summary()


def test_enforcing_with_an_erofs_root_warns() -> None:
    enforcing = selinux.SELinux("enforcing", "default")
    assert "--root-format squashfs" in enforcing.warnings("erofs")[0]
    assert enforcing.warnings("squashfs") == enforcing.warnings(None) == []
    assert selinux.SELinux("permissive", "default").warnings("erofs") == []


def test_the_live_root_gets_a_unit_that_labels_its_top_directory(tmp_path: Path) -> None:
    image = tmp_path / "image"
    (image / "usr/sbin").mkdir(parents=True)
    (image / "usr/sbin/restorecon").write_text("")
    added = tmp_path / "added"
    selinux.add_root_relabel(added, Tree.from_directory(image))
    unit = (added / "etc/systemd/system" / selinux.LIVE_ROOT_UNIT).read_text()
    assert "ExecStart=-/usr/sbin/restorecon /\n" in unit and "Before=sysinit.target systemd-journald.service" in unit
    assert "Before=kmod-static-nodes.service" in unit  # it ran first once, and its loader could not search /
    assert os.readlink(added / "etc/systemd/system/sysinit.target.wants" / selinux.LIVE_ROOT_UNIT) == \
        f"../{selinux.LIVE_ROOT_UNIT}"
    (image / "usr/sbin/restorecon").unlink()
    selinux.add_root_relabel(tmp_path / "none", Tree.from_directory(image))
    assert not (tmp_path / "none").exists()


def test_the_setting_is_checked() -> None:
    with pytest.raises(C2BootError, match="unknown --selinux setting 'on': use one of auto, off, permissive"):
        Config(selinux="on")


def test_the_files_added_for_selinux(tmp_path: Path) -> None:
    image = tmp_path / "image"
    (image / "sbin").mkdir(parents=True)
    (image / "sbin/restorecon").write_text("")
    (image / ".autorelabel").write_text("")
    labelled = selinux.SELinux("enforcing", "default")
    live = tmp_path / "live"
    assert selinux.add_files(live, Tree.from_directory(image), labelled, live=True) == [".autorelabel"]
    assert "ExecStart=-/sbin/restorecon /" in (live / "etc/systemd/system" / selinux.LIVE_ROOT_UNIT).read_text()
    installed = tmp_path / "installed"
    installed.mkdir()
    assert selinux.add_files(installed, Tree.from_directory(image), labelled, live=False) == [".autorelabel"]
    assert not any(installed.iterdir()), "an installed root is labelled whole: no unit"
    xfs = tmp_path / "xfs"
    xfs.mkdir()
    relabel = selinux.SELinux("enforcing", "default", relabel_at_boot=True)
    assert selinux.add_files(xfs, Tree.from_directory(image), relabel, live=False) == []
    assert (xfs / ".autorelabel").is_file()
    assert selinux.add_files(xfs, Tree.from_directory(image), selinux.SELinux("disabled", None), live=True) == []


def test_a_sparse_file_from_gnu_tar_goes_through_the_filter(contexts: Path, tmp_path: Path) -> None:
    require_host_tools("tar", "tar2sqfs", "rdsquashfs")
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    with (root / "etc/sparse").open("wb") as f:
        f.seek(1024 * 1024)
        f.write(b"end")
    packed = subprocess.run([*TAR_CREATE, "--directory", root, "."], capture_output=True, check=True).stdout
    labelled = subprocess.run([sys.executable, "-m", "container2boot.selinux", contexts], input=packed,
                              capture_output=True, check=True).stdout
    image = tmp_path / "root.sqfs"
    subprocess.run(["tar2sqfs", "--quiet", "--no-skip", "--force", image], input=labelled, check=True)
    listing = subprocess.run(["rdsquashfs", "-c", "/etc/sparse", image], capture_output=True, check=True).stdout
    assert len(listing) == 1024 * 1024 + 3 and listing.endswith(b"end")
