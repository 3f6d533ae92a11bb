"""cloud-init's NoCloud seed, the disk files each cloud imports, what an image lacks for a cloud, and the image
facts those checks read. Every file is read back with the tools that read it for real (mtools, tarfile, gzip,
qemu-img, sfdisk) on small disks made here. Fast, no privileges, no boots."""

import gzip
import io
import json
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

from container2boot import config, formats, seed
from container2boot.cli import format_report
from container2boot.clouds import CLOUDS, cloud_warnings
from container2boot.disk import MiB, read_table
from container2boot.errors import C2BootError
from container2boot.rootfs import Report, examine, parse_datasource_list
from container2boot.tree import Entry, Tree
from tests.conftest import require_host_tools
from tests.test_inspect import tar_of
from tests.test_rootfs import ELF_X86_64, make_rootfs

GiB = 1024 * MiB
ODD_SIZE = 3 * MiB + 20 * 1024  # systemd-repart's disks end 20 KiB past a MiB (GPT and alignment)
PART_START = MiB
PART_SIZE = 2 * MiB


def mtools(*argv: str | Path) -> bytes:
    return subprocess.run([str(a) for a in argv], check=True, capture_output=True).stdout


# The NoCloud seed ------------------------------------------------------------------------------------------------


def test_seed_is_a_fat_volume_labelled_cidata_with_user_data_and_meta_data(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    require_host_tools("mformat", "mcopy", "mlabel", "mdir", "mtype")
    user_data = b"#cloud-config\nruncmd:\n  - touch /root/seeded\n"
    meta = seed.meta_data(seed.instance_id(user_data), "web1")
    image = seed.make_seed(user_data, meta, tmp_path / "seed.img")
    assert image.stat().st_size == MiB
    assert mtools("mlabel", "-s", "-i", image, "::").decode().split() == ["Volume", "label", "is", "CIDATA"]
    assert mtools("mdir", "-b", "-i", image, "::/").decode().split() == ["::/user-data", "::/meta-data"]
    assert mtools("mtype", "-i", image, "::/user-data") == user_data
    assert mtools("mtype", "-i", image, "::/meta-data") == meta
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")  # the same seed is the same file
    first = seed.make_seed(user_data, meta, tmp_path / "a.img").read_bytes()
    assert seed.make_seed(user_data, meta, tmp_path / "b.img").read_bytes() == first


def test_seed_grows_with_large_user_data(tmp_path: Path) -> None:
    user_data = b"#cloud-config\nwrite_files:\n  - path: /big\n    content: " + os.urandom(1536 * 1024).hex().encode()
    image = seed.make_seed(user_data, seed.meta_data("i-1", None), tmp_path / "seed.img")
    assert image.stat().st_size == 4 * MiB
    assert mtools("mtype", "-i", image, "::/user-data") == user_data


def test_meta_data_and_an_instance_id_that_follows_the_user_data() -> None:
    first = seed.instance_id(b"#cloud-config\n")
    assert first == seed.instance_id(b"#cloud-config\n") and first.startswith("c2boot-")
    assert seed.instance_id(b"#cloud-config\nhostname: a\n") != first
    assert seed.instance_id(b"#cloud-config\n", "web1") != first  # a new hostname is applied too
    assert seed.meta_data(first, "web1").decode() == f'instance-id: "{first}"\nlocal-hostname: "web1"\n'
    assert seed.meta_data(first, None).decode() == f'instance-id: "{first}"\n'
    assert seed.meta_data("i", "123").decode().endswith('local-hostname: "123"\n')  # a string, not a YAML number


@pytest.mark.parametrize("data", [
    b"#cloud-config\nusers: []\n", b"#!/bin/sh\ntouch /x\n", b"#include\nhttps://example.org/ud\n",
    b"#cloud-boothook\n#!/bin/sh\n", b"#part-handler\n", b"#cloud-config-archive\n- type: text/x-shellscript\n",
    b"## template: jinja\n#cloud-config\n", b"Content-Type: multipart/mixed; boundary=x\n",
    b"MIME-Version: 1.0\nContent-Type: multipart/mixed\n", b"\n  #Cloud-Config\n", gzip.compress(b"#cloud-config\n"),
])
def test_user_data_in_every_format_cloud_init_takes(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "user-data"
    path.write_bytes(data)
    assert seed.read_user_data(path) == data


@pytest.mark.parametrize(("content", "message"), [
    (None, "no such file: give a cloud-init user-data file (start it with #cloud-config (YAML) or #! (a script)"),
    ("dir", "is not a regular file: save the user-data in a file and give that"),
    (b"", "is empty: start it with #cloud-config"),
    (b" \n\n", "is empty: start it with #cloud-config"),
    (b"users:\n  - name: alice\n", "is not cloud-init user-data: start it with #cloud-config (YAML) or #! (a script)"),
    (b"\xef\xbb\xbf#cloud-config\n", "is not cloud-init user-data"),  # a byte-order mark: cloud-init ignores it too
])
def test_user_data_errors_say_what_to_do(tmp_path: Path, content: bytes | str | None, message: str) -> None:
    path = tmp_path / "user-data.yaml"
    if content == "dir":
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    with pytest.raises(C2BootError) as error:
        seed.read_user_data(path)
    assert str(error.value).startswith(f"--cloud-init {path}") and message in str(error.value)
    assert "\n" not in str(error.value)


def test_unreadable_user_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "user-data"
    path.write_bytes(b"#cloud-config\n")

    def denied(self: Path) -> bytes:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "read_bytes", denied)
    with pytest.raises(C2BootError, match=r"cannot be read \(Permission denied\): check its permissions"):
        seed.read_user_data(path)


# The disk each cloud imports -------------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Path:
    """A GPT disk of systemd-repart's odd size, one partition full of recognisable bytes."""
    require_host_tools("sfdisk", "qemu-img", "gzip", "tar")
    out = tmp_path / "out"
    out.mkdir()
    disk = out / "disk.img"
    with disk.open("wb") as f:
        f.truncate(ODD_SIZE)
    subprocess.run(["sfdisk", "--quiet", disk], check=True, text=True,
                   input=f"label: gpt\nstart={PART_START // 512}, size={PART_SIZE // 512}, type=uefi, name=C2BOOT\n")
    with disk.open("r+b") as f:
        f.seek(PART_START)
        f.write(os.urandom(PART_SIZE // 2))
    return disk


def partition(data: bytes) -> bytes:
    return data[PART_START:PART_START + PART_SIZE]


def files_beside(disk: Path) -> set[str]:
    """What the output directory holds: no staging copy may be left behind."""
    return {p.name for p in disk.parent.iterdir()}


def test_every_cloud_has_a_disk_and_a_check() -> None:
    assert set(config.CLOUDS) == set(formats.CLOUD_DISKS) == set(CLOUDS)


def test_digitalocean_gets_gzip(small_disk: Path) -> None:
    out = formats.cloud_disk(small_disk, "digitalocean")
    assert out == small_disk.with_name("disk.img.gz") and files_beside(small_disk) == {"disk.img", "disk.img.gz"}
    data = out.read_bytes()
    assert data[:2] == b"\x1f\x8b" and not data[3] & 0x08  # gzip, without a file name inside
    assert gzip.decompress(data) == small_disk.read_bytes()


def test_openstack_gets_qcow2(small_disk: Path) -> None:
    out = formats.cloud_disk(small_disk, "openstack")
    assert out.name == "disk.qcow2" and out.read_bytes()[:4] == b"QFI\xfb"
    subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", small_disk, out], check=True,
                   capture_output=True)


def test_gce_gets_disk_raw_in_a_sparse_oldgnu_tar_a_whole_gib_large(small_disk: Path, tmp_path: Path) -> None:
    out = formats.cloud_disk(small_disk, "gce")
    assert out.name == "disk.tar.gz" and files_beside(small_disk) == {"disk.img", "disk.tar.gz"}
    assert out.stat().st_size < 2 * MiB  # the GiB of zeros is a hole, not data
    with gzip.open(out) as stream:
        assert stream.read(512)[257:265] == b"ustar  \0"  # GNU's header magic, not POSIX's "ustar\0" "00"
    with tarfile.open(out, "r:gz") as tar:
        [member] = tar.getmembers()
        assert (member.name, member.type, member.size) == ("disk.raw", tarfile.GNUTYPE_SPARSE, GiB)
        tar.extract(member, tmp_path / "gce")
    raw = tmp_path / "gce/disk.raw"
    with raw.open("rb") as f:
        assert partition(f.read(ODD_SIZE)) == partition(small_disk.read_bytes())
    subprocess.run(["sfdisk", "--verify", raw], check=True, capture_output=True)  # backup GPT moved to the end
    assert read_table(raw).partitions == read_table(small_disk).partitions


def test_azure_gets_a_fixed_vhd_whole_mib_large(small_disk: Path) -> None:
    out = formats.cloud_disk(small_disk, "azure")
    assert out.name == "disk.vhd" and files_beside(small_disk) == {"disk.img", "disk.vhd"}
    data = out.read_bytes()
    footer = data[-512:]
    assert footer[:8] == b"conectix"
    assert int.from_bytes(footer[60:64], "big") == 2  # disk type: fixed
    size = int.from_bytes(footer[48:56], "big")  # current size
    assert size == len(data) - 512 == 4 * MiB and size % MiB == 0
    checksum = ~sum(footer[:64] + bytes(4) + footer[68:]) & 0xFFFFFFFF
    assert int.from_bytes(footer[64:68], "big") == checksum
    assert partition(data) == partition(small_disk.read_bytes())
    raw = small_disk.with_name("vhd-data.raw")  # a fixed VHD is the raw disk and the footer
    raw.write_bytes(data[:-512])
    subprocess.run(["sfdisk", "--verify", raw], check=True, capture_output=True)


def test_vhd_format_is_azure_ready_too_and_an_aligned_disk_is_not_copied(small_disk: Path) -> None:
    assert formats.convert(small_disk, ["vhd"])[1][1].stat().st_size == 4 * MiB + 512
    aligned = small_disk.with_name("aligned.img")
    with aligned.open("wb") as f:
        f.truncate(2 * MiB)
    assert formats.cloud_disk(aligned, "azure").stat().st_size == 2 * MiB + 512
    assert files_beside(small_disk) == {"disk.img", "disk.vhd", "aligned.img", "aligned.vhd"}


# What an image lacks for a cloud ---------------------------------------------------------------------------------


def tree_of(files: dict[str, bytes]) -> Tree:
    """A tree with these files and their directories, as Tree.from_tar reads one."""
    entries: dict[str, Entry] = {}
    for path, data in files.items():
        parts = path.split("/")
        for depth in range(1, len(parts)):
            entries.setdefault("/".join(parts[:depth]), Entry("dir", 0))
        entries[path] = Entry("file", len(data))
    return Tree(entries, dict(files))


def image(*files: dict[str, bytes], os_id: str = "debian") -> Report:
    """A systemd machine image with these more files."""
    tree = {"usr/lib/os-release": f'ID={os_id}\nPRETTY_NAME="Test {os_id}"\n'.encode(),
            "usr/lib/systemd/systemd": ELF_X86_64}
    for more in files:
        tree.update(more)
    return examine(tree_of(tree))


READY = {"usr/bin/cloud-init": b"", "usr/sbin/sshd": b"", "usr/sbin/dhclient": b""}
CLOUD_CFG = "etc/cloud/cloud.cfg"


def test_an_image_without_cloud_init_sshd_or_dhcp_is_told_the_packages() -> None:
    warnings = cloud_warnings(image(), "digitalocean")
    assert warnings == [
        "Test debian has no cloud-init, which sets up SSH keys, users and the hostname from DigitalOcean's "
        "metadata (its datasource DigitalOcean): add `cloud-init` to the image (e.g. in its Containerfile)",
        "Test debian has no SSH server, so nobody can log in to it over DigitalOcean's network: add "
        "`openssh-server` to the image (e.g. in its Containerfile)",
        "Test debian has no DHCP client or network manager, so it gets no address on DigitalOcean's network: add "
        "`ifupdown isc-dhcp-client` to the image (e.g. in its Containerfile)",
    ]


@pytest.mark.parametrize(("os_id", "sshd", "network"), [
    ("fedora", "`openssh-server`", "`NetworkManager`"),
    ("arch", "`openssh`", "`dhcpcd`"),
    ("gentoo", "`openssh-server` (Debian/Ubuntu), `openssh-server` (Fedora), `openssh` (Arch)",
     "`ifupdown isc-dhcp-client` (Debian/Ubuntu), `NetworkManager` (Fedora), `dhcpcd` (Arch)"),
])
def test_packages_are_named_per_family(os_id: str, sshd: str, network: str) -> None:
    warnings = cloud_warnings(image({"usr/bin/cloud-init": b""}, os_id=os_id), "gce")
    assert len(warnings) == 2
    assert f"add {sshd} to the image" in warnings[0] and f"add {network} to the image" in warnings[1]


@pytest.mark.parametrize("dhcp", ["usr/sbin/dhclient", "sbin/dhcpcd", "sbin/udhcpc", "usr/sbin/NetworkManager",
                                  "usr/lib/systemd/systemd-networkd"])
def test_a_ready_image_gets_no_warning(dhcp: str) -> None:
    report = image({"usr/bin/cloud-init": b"", "usr/sbin/sshd": b"", dhcp: b""})
    assert report.dhcp_client
    for cloud in ("digitalocean", "openstack", "gce"):
        assert cloud_warnings(report, cloud) == []


def test_azure_hints_at_its_agent_only_when_it_is_missing() -> None:
    [hint] = cloud_warnings(image(READY), "azure")
    assert hint == "hint: Test debian has no Azure Linux agent; cloud-init provisions the VM without it, but " \
        "Azure's VM extensions need it: add `waagent` if you use them"
    assert cloud_warnings(image(READY, {"usr/sbin/waagent": b""}), "azure") == []


def test_a_datasource_list_without_the_clouds_datasource_is_a_warning() -> None:
    report = image(READY, {CLOUD_CFG: b"#cloud-config\ndatasource_list: [ NoCloud, None ]\n"})
    assert report.cloud_datasources == ("NoCloud", "None")
    [warning] = cloud_warnings(report, "openstack")
    assert warning == "cloud-init in Test debian only tries the datasources NoCloud, None (datasource_list in " \
        "/etc/cloud/cloud.cfg or cloud.cfg.d/*.cfg), so it ignores OpenStack's metadata: add OpenStack or " \
        "ConfigDrive to datasource_list"
    config_drive = image(READY, {CLOUD_CFG: b"datasource_list: ['ConfigDrive', 'None']\n"})
    assert cloud_warnings(config_drive, "openstack") == []
    assert "add GCE to datasource_list" in cloud_warnings(config_drive, "gce")[0]


def test_the_last_cloud_cfg_d_file_that_sets_datasource_list_decides() -> None:
    report = image(READY, {
        CLOUD_CFG: b"datasource_list: [GCE]\n",
        "etc/cloud/cloud.cfg.d/10_gce.cfg": b"datasource_list:\n  - GCE\n  - None\n",
        "etc/cloud/cloud.cfg.d/90_dpkg.cfg": b"# debconf\ndatasource_list:\n  - NoCloud  # local\n\n",
        "etc/cloud/cloud.cfg.d/95_other.cfg": b"datasource:\n  NoCloud:\n    fs_label: cidata\n",
        "etc/cloud/cloud.cfg.d/99_readme.txt": b"datasource_list: [Azure]\n",  # not a .cfg: cloud-init skips it
    })
    assert report.cloud_datasources == ("NoCloud",)
    assert cloud_warnings(report, "gce")[0].startswith("cloud-init in Test debian only tries the datasources NoCloud")


@pytest.mark.parametrize(("text", "datasources"), [
    ("datasource_list: [ NoCloud, ConfigDrive, None ]\n", ("NoCloud", "ConfigDrive", "None")),
    ('datasource_list: ["Ec2", \'GCE\']  # two\n', ("Ec2", "GCE")),
    ("datasource_list: [\n  NoCloud,\n  # OpenStack,\n  None\n]\n", ("NoCloud", "None")),
    ("datasource_list:\n- Azure\n- None\nsystem_info: {}\n", ("Azure", "None")),
    ("datasource_list: []\n", ()),
    ("# datasource_list: [GCE]\nusers: [default]\n", None),
    ("datasource:\n  datasource_list: [GCE]\n", None),  # not at the top level
])
def test_datasource_list_parsing(text: str, datasources: tuple[str, ...] | None) -> None:
    assert parse_datasource_list(text) == datasources


# The image facts behind them ---------------------------------------------------------------------------------------


def test_new_report_fields_read_the_same_from_a_directory_and_a_tar(tmp_path: Path) -> None:
    root = make_rootfs(tmp_path / "root")
    for path, data in {
        "usr/sbin/sshd": b"", "usr/lib/python3/dist-packages/cloudinit/__init__.py": b"",
        "etc/cloud/cloud.cfg": b"#cloud-config\ndatasource_list:\n  - NoCloud\n  - GCE\n",
        "usr/lib/x86_64-linux-gnu/systemd/libsystemd-shared-252.so": ELF_X86_64,
        "usr/lib/systemd/systemd-networkd": b"",
    }.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(data)
    (root / "sbin").symlink_to("usr/sbin")
    report = examine(Tree.from_directory(root))
    assert (report.sshd, report.cloud_init, report.cloud_datasources, report.dhcp_client, report.systemd_version) \
        == (True, True, ("NoCloud", "GCE"), True, 252)
    data = report.as_json()
    assert {k: data[k] for k in ("sshd", "cloud_init", "cloud_datasources", "dhcp_client", "systemd_version")} == {
        "sshd": True, "cloud_init": True, "cloud_datasources": ["NoCloud", "GCE"], "dhcp_client": True,
        "systemd_version": 252}
    assert json.loads(json.dumps(data)) == examine(Tree.from_tar(tar_of(root))).as_json()


def test_a_bare_image_has_none_of_them(tmp_path: Path) -> None:
    report = examine(Tree.from_directory(make_rootfs(tmp_path / "root", init=False)))
    assert (report.sshd, report.cloud_init, report.cloud_datasources, report.dhcp_client, report.systemd_version) \
        == (False, False, None, False, None)


DPKG_STATUS = b"""Package: systemd-sysv
Status: install ok installed
Version: 257.9-1

Package: systemd
Status: install ok installed
Priority: important
Version: 252.39-1~deb12u1

Package: zlib1g
Status: install ok installed
Version: 1:1.2.13.dfsg-1
"""


@pytest.mark.parametrize(("files", "version"), [
    ({"usr/lib/x86_64-linux-gnu/systemd/libsystemd-shared-257.so": b""}, 257),  # Debian 12 and 13
    ({"usr/lib/aarch64-linux-gnu/systemd/libsystemd-shared-257.so": b""}, 257),
    ({"usr/lib64/systemd/libsystemd-shared-256.11-1.fc41.so": b""}, 256),  # Fedora
    ({"usr/lib/systemd/libsystemd-shared-255.4-1-arch.so": b""}, 255),  # Arch
    ({"usr/lib/systemd/libsystemd-shared-254.so": b""}, 254),
    ({"var/lib/dpkg/status": DPKG_STATUS}, 252),  # no versioned library: the package's version
    ({"var/lib/dpkg/status": DPKG_STATUS.replace(b"ok installed\nPriority", b"ok config-files\nPriority")}, None),
    ({}, None),
])
def test_systemd_version(files: dict[str, bytes], version: int | None) -> None:
    assert image(files).systemd_version == version


def test_no_systemd_version_when_the_init_is_not_systemd() -> None:
    tree = tree_of({"sbin/init": ELF_X86_64, "usr/lib/x86_64-linux-gnu/systemd/libsystemd-shared-257.so": b""})
    assert examine(tree).systemd_version is None


def test_dpkg_status_of_a_big_image_is_read_whole(tmp_path: Path) -> None:
    """dpkg lists packages by name, so systemd comes late in a status file of several MB."""
    root = make_rootfs(tmp_path / "root")
    filler = b"".join(b"Package: pkg%05d\nStatus: install ok installed\nVersion: 1.0\nDescription: %s\n\n"
                      % (n, b"x" * 200) for n in range(12000))
    (root / "var/lib/dpkg").mkdir(parents=True)
    (root / "var/lib/dpkg/status").write_bytes(filler + DPKG_STATUS)
    assert examine(Tree.from_tar(tar_of(root))).systemd_version == 252


def test_inspect_report_rows_for_ssh_and_cloud_init() -> None:
    def rows(report: Report) -> dict[str, str]:
        lines = format_report(report, "live", None, "x").splitlines()[:-1]
        return {line[2:14].strip(): line[14:].strip() for line in lines}

    bare = rows(image())
    assert (bare["ssh"], bare["cloud-init"]) == ("no sshd", "no")
    ready = rows(image(READY))
    assert (ready["ssh"], ready["cloud-init"]) == ("yes (sshd)", "yes")
    limited = rows(image(READY, {CLOUD_CFG: b"datasource_list: [NoCloud, None]\n"}))
    assert limited["cloud-init"] == "yes, datasources: NoCloud, None"


def test_tar_stream_keeps_cloud_configs_and_dpkg_status_but_not_other_etc_files() -> None:
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w") as tar:
        for name, content in (("etc/cloud/cloud.cfg.d/90_dpkg.cfg", b"datasource_list: [GCE]\n"),
                              ("etc/cloud/templates/hosts.tmpl", b"127.0.0.1 x\n"),
                              ("var/lib/dpkg/status", DPKG_STATUS)):
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    data.seek(0)
    assert Tree.from_tar(data).contents == {"etc/cloud/cloud.cfg.d/90_dpkg.cfg": b"datasource_list: [GCE]\n",
                                            "var/lib/dpkg/status": DPKG_STATUS}


def test_the_build_warns_about_settings_that_do_not_fit_a_cloud(tmp_path: Path) -> None:
    from container2boot.pipeline import cloud_warnings as build_warnings

    report = examine(Tree.from_directory(make_rootfs(tmp_path / "root")))
    assert build_warnings(report, config.Config()) == []
    warnings = build_warnings(report, config.Config(cloud="gce", cloud_init=tmp_path / "user-data"))
    assert any("embeds a NoCloud seed, which cloud-init may prefer to Google Compute Engine's own" in w
               for w in warnings)
    assert any("add --bios so that the disk boots either way" in w for w in warnings)
    assert not any("--bios" in w for w in build_warnings(report, config.Config(cloud="gce", bios=True)))
    assert config.Config(cloud="azure").diskimage  # a cloud file is made from disk.img
