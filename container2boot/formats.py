"""Disk formats for hypervisors and clouds (qemu-img converts disk.img), compressed copies for downloads, and the
SHA256SUMS file that lets a user check what they downloaded with `sha256sum -c`."""

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from container2boot.run import run

# format -> (file suffix, qemu-img output format, its options)
QEMU_IMG_FORMATS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "qcow2": ("qcow2", "qcow2", ()),
    "vmdk": ("vmdk", "vmdk", ()),
    "vdi": ("vdi", "vdi", ()),
    "vhdx": ("vhdx", "vhdx", ()),
    # Azure takes fixed VHDs whose size is a whole number of MiB; force_size keeps that exact size.
    "vhd": ("vhd", "vpc", ("-o", "subformat=fixed,force_size=on")),
}
COMPRESSORS: dict[str, list[str]] = {
    "zst": ["zstd", "--quiet", "--threads=0", "--keep", "--force"],
    "xz": ["xz", "--threads=0", "--keep", "--force"],
}
CHECKSUMS = "SHA256SUMS"


def convert(disk: Path, formats: Sequence[str]) -> list[tuple[str, Path]]:
    """Write disk.img in each of `formats` beside it; raw is disk.img itself. Returns (format, file) pairs."""
    outputs = [("raw", disk)]
    for name in dict.fromkeys(formats):
        if name == "raw":
            continue
        suffix, qemu_format, options = QEMU_IMG_FORMATS[name]
        dest = disk.with_suffix(f".{suffix}")
        run(["qemu-img", "convert", "-f", "raw", "-O", qemu_format, *options, disk, dest])
        outputs.append((name, dest))
    return outputs


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
