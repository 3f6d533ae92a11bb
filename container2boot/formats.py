"""Disk formats for hypervisors and clouds (qemu-img converts disk.img), the files each cloud imports, compressed
copies for downloads, and the SHA256SUMS file that lets a user check what they downloaded with `sha256sum -c`."""

import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from container2boot.disk import MiB
from container2boot.run import run

# format -> (file suffix, qemu-img output format, its options)
QEMU_IMG_FORMATS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "qcow2": ("qcow2", "qcow2", ()),
    "vmdk": ("vmdk", "vmdk", ()),
    "vdi": ("vdi", "vdi", ()),
    "vhdx": ("vhdx", "vhdx", ()),
    # Azure takes fixed VHDs whose size is a whole number of MiB: ALIGNMENTS grows the disk to one, force_size
    # keeps that exact size (no rounding to a CHS geometry).
    "vhd": ("vhd", "vpc", ("-o", "subformat=fixed,force_size=on")),
}
ALIGNMENTS = {"vhd": MiB}  # disk.img is grown to a multiple of this before the conversion
COMPRESSORS: dict[str, list[str]] = {
    "zst": ["zstd", "--quiet", "--threads=0", "--keep", "--force"],
    "xz": ["xz", "--threads=0", "--keep", "--force"],
    "gz": ["gzip", "--keep", "--force", "--no-name"],  # no name or time inside: the same disk gives the same file
}
CHECKSUMS = "SHA256SUMS"
GiB = 1024 * MiB
GPT_HEADER = (512, b"EFI PART")  # where a GPT's header is on a disk with 512-byte sectors, and its signature


def convert(disk: Path, formats: Sequence[str]) -> list[tuple[str, Path]]:
    """Write disk.img in each of `formats` beside it; raw is disk.img itself. Returns (format, file) pairs."""
    return [("raw", disk), *((name, _convert(disk, name)) for name in dict.fromkeys(formats) if name != "raw")]


def _convert(disk: Path, name: str) -> Path:
    suffix, qemu_format, options = QEMU_IMG_FORMATS[name]
    dest = disk.with_suffix(f".{suffix}")
    with _grown(disk, ALIGNMENTS.get(name, 1)) as source:
        run(["qemu-img", "convert", "-f", "raw", "-O", qemu_format, *options, source, dest])
    return dest


@contextmanager
def _grown(disk: Path, alignment: int) -> Iterator[Path]:
    """disk.img when its size is a multiple of `alignment`, else a sparse copy grown to one (removed afterwards),
    its backup GPT moved to the new end where the platform will look for it. disk.img itself stays as it is."""
    size = disk.stat().st_size
    if size % alignment == 0:
        yield disk
        return
    with tempfile.TemporaryDirectory(prefix=".c2boot-", dir=disk.parent) as tmp:
        copy = Path(tmp, "disk.raw")
        run(["qemu-img", "convert", "-f", "raw", "-O", "raw", disk, copy])  # holes stay holes
        os.truncate(copy, -(-size // alignment) * alignment)
        if _is_gpt(copy):
            run(["sfdisk", "--relocate", "gpt-bak-std", "--no-reread", "--no-tell-kernel", copy])
        yield copy


def _is_gpt(disk: Path) -> bool:
    offset, signature = GPT_HEADER
    with disk.open("rb") as f:
        f.seek(offset)
        return f.read(len(signature)) == signature


def cloud_disk(disk: Path, cloud: str) -> Path:
    """disk.img in the file `cloud` imports, written beside it (config.CLOUDS names the clouds)."""
    return CLOUD_DISKS[cloud](disk)


def _digitalocean(disk: Path) -> Path:
    """DigitalOcean imports raw images compressed with gzip or bzip2 (not xz): disk.img.gz."""
    return compress([disk], "gz")[0]


def _openstack(disk: Path) -> Path:
    """Glance takes qcow2 (sparse, smaller to upload): disk.qcow2."""
    return _convert(disk, "qcow2")


def _gce(disk: Path) -> Path:
    """GCE imports a gzip'ed tar in oldgnu format holding one file named disk.raw, a whole number of GiB large:
    disk.tar.gz. The tar is sparse, so the growth costs nothing."""
    dest = disk.with_name("disk.tar.gz")
    with _grown(disk, GiB) as source:
        run(["tar", "--create", "--format=oldgnu", "--sparse", "--gzip", "--file", dest,
             "--owner=0", "--group=0", "--numeric-owner", "--transform=s|.*|disk.raw|",
             "--directory", source.parent, source.name])
    return dest


def _azure(disk: Path) -> Path:
    """Azure takes a fixed VHD whose virtual size is a whole number of MiB: disk.vhd."""
    return _convert(disk, "vhd")


CLOUD_DISKS: dict[str, Callable[[Path], Path]] = {
    "digitalocean": _digitalocean,
    "openstack": _openstack,
    "gce": _gce,
    "azure": _azure,
}


def compress(files: Sequence[Path], compression: str) -> list[Path]:
    """A compressed copy of each file (disk.img -> disk.img.zst); the originals stay."""
    copies = []
    for path in files:
        run([*COMPRESSORS[compression], path])
        copies.append(path.with_name(f"{path.name}.{compression}"))
    return copies


def write_checksums(out: Path, artifacts: Sequence[dict[str, Any]]) -> Path:
    """SHA256SUMS in `sha256sum` format, from the manifest's artifact list (each file is hashed once)."""
    path = out / CHECKSUMS
    path.write_text("".join(f"{a['sha256']}  {a['path']}\n" for a in artifacts))
    return path
