"""Reproducible outputs: the same image built with the same settings gives the same bytes, so that anyone can check
a published disk by building it again. What would otherwise come from the clock or from chance comes from two
values decided once per build: the source date (SOURCE_DATE_EPOCH; `c2boot build` passes the image's creation time
when it is not set) and a seed derived from the image, that date and the settings.

Measured with systemd-repart 257 and e2fsprogs 1.47: the GPT's identifiers follow `--seed`; mcopy stamps FAT
entries with the files' times (clamped here) and the FAT's own with SOURCE_DATE_EPOCH; ext4 takes its UUID from
the seed but draws its directory hash seed at random unless given one.
"""

import os
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from container2boot.errors import C2BootError

NAMESPACE = uuid.UUID("5d3c8f42-6f0e-4b9e-9d7a-2c1b0a9e8f70")  # container2boot's, for uuid5


@dataclass(frozen=True)
class Reproducible:
    """The build's source date (seconds since the epoch) and seed."""

    epoch: int
    seed: uuid.UUID

    def uuid(self, purpose: str) -> uuid.UUID:
        """A UUID of its own for each `purpose` (a partition, a file system), the same in every rebuild."""
        return uuid.uuid5(self.seed, purpose)

    def environment(self, date: int | None = None) -> dict[str, str]:
        """The environment for tools that stamp times or draw random identifiers (repart, mkfs, mtools, dracut);
        `date` instead of the source date for what has a date of its own (the initrd: its kernel's)."""
        return {**os.environ, "SOURCE_DATE_EPOCH": str(self.epoch if date is None else date),
                "SYSTEMD_REPART_MKFS_OPTIONS_EXT4": f"-E hash_seed={self.uuid('ext4 hash seed')}"}

    def mbr_label_id(self) -> str:
        """The MBR's disk signature (four bytes; sfdisk would draw it at random)."""
        return f"0x{self.uuid('mbr label id').hex[:8]}"

    def clamp_times(self, tree: Path) -> None:
        """Give every file the build made itself the source date, as the files from the image have their own."""
        for directory, dirs, files in os.walk(tree):
            for name in (*dirs, *files):
                os.utime(os.path.join(directory, name), (self.epoch, self.epoch), follow_symlinks=False)
        os.utime(tree, (self.epoch, self.epoch))


def source_date_epoch(text: str) -> int:
    """SOURCE_DATE_EPOCH as the reproducible-builds convention defines it: whole seconds since 1970, UTC."""
    if not re.fullmatch(r"[0-9]{1,12}", text.strip()):
        raise C2BootError(f"SOURCE_DATE_EPOCH={text!r} is not a number of seconds since 1970: set it to one "
                          "(e.g. `date +%s`) or unset it")
    return int(text)


def default_source_date(given: Mapping[str, str], created: int | None) -> str:
    """The source date of an image's outputs: SOURCE_DATE_EPOCH as given, else the image's creation; "" for none."""
    return given.get("source_date_epoch") or ("" if created is None else str(created))


def image_created(created: str) -> int | None:
    """Seconds since the epoch of an image's creation time as podman reports it (RFC 3339, nanoseconds)."""
    match = re.fullmatch(r"(.+?T\d\d:\d\d:\d\d)(?:\.\d+)?(Z|[+-]\d\d:\d\d)", created.strip())
    if match is None:
        return None
    seconds = int(datetime.fromisoformat(match[1] + match[2].replace("Z", "+00:00")).timestamp())
    return seconds if seconds >= 0 else None  # Go's zero time (year 1): no date at all


def decide(epoch: int, image: str, settings: list[str]) -> Reproducible:
    """The seed from what determines the output: the image (its id or digest, else its name), the date and the
    assemble settings."""
    return Reproducible(epoch, uuid.uuid5(NAMESPACE, "\0".join([image, str(epoch), *settings])))
