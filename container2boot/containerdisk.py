"""KubeVirt's containerDisk: an OCI image that holds the disk as qcow2 under /disk/, owned by 107:107 (the qemu user
of KubeVirt's virt-launcher), made in podman's storage from the build's disk.qcow2 so that `podman push` takes it
to the registry a cluster pulls from. Dated by the build's source date: the same disk gives the same image id."""

import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from container2boot.log import logger
from container2boot.manifest import read_manifest, source_epoch
from container2boot.templates import render_to

if TYPE_CHECKING:
    from container2boot.podman import Session

DISK = "disk.qcow2"  # the --format qcow2 output that --containerdisk implies
CONTAINERFILE = "Containerfile.containerdisk"


def make_containerdisk(session: "Session", outputs: Path, name: str) -> dict[str, Any]:
    """Build the image `name` from outputs/disk.qcow2; returns what the manifest records of it."""
    created = source_epoch(read_manifest(outputs))
    context = session.scratch / "containerdisk"
    context.mkdir()
    try:
        os.link(outputs / DISK, context / DISK)  # the build only reads it
    except OSError:  # another file system
        shutil.copyfile(outputs / DISK, context / DISK)
    containerfile = render_to(context / CONTAINERFILE, f"{CONTAINERFILE}.j2", disk=DISK)
    session.build_image(context, containerfile, name, {}, timestamp=created)
    image = session.image(name)
    assert image is not None  # build_image checks that it is there
    logger.info("    %s holds /disk/%s for KubeVirt (`podman push %s` takes it to a registry)", name, DISK, name)
    return {"image": name, "id": image.image_id, "disk": f"/disk/{DISK}"}
