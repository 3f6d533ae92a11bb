"""cloud-init's NoCloud seed: the user's user-data and our meta-data on a small FAT volume labelled CIDATA, which
cloud-init finds by its label at boot (no network metadata service needed). Made with mtools: no root, no mount."""

import hashlib
import os
import tempfile
from pathlib import Path

from container2boot import templates
from container2boot.errors import C2BootError
from container2boot.run import run

SEED_LABEL = "CIDATA"  # cloud-init looks for cidata and CIDATA; a FAT label is upper case in the directory entry
# How user-data starts for each format cloud-init takes (it compares without case, after leading white space).
USER_DATA_STARTS = ("#cloud-config", "#!", "#include", "#cloud-boothook", "#part-handler", "## template: jinja",
                    "content-type: multipart")  # #cloud-config-archive and #include-once start like the others
MIME_MARK = b"mime-version:"  # cloud-init reads any MIME message (it looks in the first 4 KiB)
FAT_ROOM = 256 * 1024  # boot sector, FATs, root directory and cluster slack of a FAT12/16 volume
MiB = 1024 * 1024
FORMATS_HINT = ("start it with #cloud-config (YAML) or #! (a script); cloud-init also takes #include, "
                "#cloud-boothook, #part-handler, MIME multipart and gzip")


def read_user_data(path: Path) -> bytes:
    """The user-data file, checked here: cloud-init ignores data it cannot read, and says so only on the guest's
    console."""
    where = f"--cloud-init {path}"
    if not path.exists():
        raise C2BootError(f"{where}: no such file: give a cloud-init user-data file ({FORMATS_HINT})")
    if not path.is_file():
        raise C2BootError(f"{where} is not a regular file: save the user-data in a file and give that")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise C2BootError(f"{where} cannot be read ({e.strerror}): check its permissions") from None
    if not data.strip():
        raise C2BootError(f"{where} is empty: {FORMATS_HINT}")
    if not is_user_data(data):
        raise C2BootError(f"{where} is not cloud-init user-data: {FORMATS_HINT}")
    return data


def is_user_data(data: bytes) -> bool:
    """Whether cloud-init would act on `data`: gzip (it unpacks it first), a MIME message, or a known start."""
    if data[:2] == b"\x1f\x8b":
        return True
    head = data[:4096].lower()
    return MIME_MARK in head or head.lstrip().startswith(tuple(s.encode() for s in USER_DATA_STARTS))


def instance_id(user_data: bytes, hostname: str | None = None) -> str:
    """cloud-init runs its once-per-instance modules again only for a new instance-id: derive it from what the
    seed says, so new user-data (or a new hostname) is applied on the next boot."""
    digest = hashlib.sha256(user_data + (b"\0" + hostname.encode() if hostname else b"")).hexdigest()
    return f"c2boot-{digest[:16]}"


def meta_data(instance_id: str, hostname: str | None) -> bytes:
    """NoCloud meta-data: the instance-id, and the hostname when one is given."""
    return templates.render("meta-data.j2", instance_id=instance_id, hostname=hostname).encode()


def make_seed(user_data: bytes, meta: bytes, dest: Path) -> Path:
    """A FAT image file labelled CIDATA holding user-data and meta-data, sized to them. Its volume serial comes
    from the content, so the same seed is the same file (mtools takes file times from SOURCE_DATE_EPOCH)."""
    size = -(-(len(user_data) + len(meta) + FAT_ROOM) // MiB) * MiB
    serial = hashlib.sha256(user_data + meta).hexdigest()[:8]
    env = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}  # an image file need not have a floppy's geometry
    # The two files are staged beside `dest` (a directory the caller owns and removes), not in /tmp.
    with tempfile.TemporaryDirectory(prefix=".c2boot-seed-", dir=dest.parent) as tmp:
        files = [Path(tmp, "user-data"), Path(tmp, "meta-data")]
        files[0].write_bytes(user_data)
        files[1].write_bytes(meta)
        with dest.open("wb") as image:
            image.truncate(size)
        run(["mformat", "-i", dest, "-v", SEED_LABEL, "-N", serial, "::"], env=env)
        run(["mcopy", "-i", dest, *files, "::/"], env=env)
    return dest
