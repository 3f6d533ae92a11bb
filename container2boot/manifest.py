"""manifest.json: what was built from what, with which tools, how long it took, and every artifact's checksum."""

import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from container2boot import __version__
from container2boot.plan import Plan
from container2boot.rootfs import Report
from container2boot.run import tool_version_line

MANIFEST_VERSION = 1
ASSEMBLE_TOOLS = ("systemd-repart", "tar2sqfs", "mkfs.erofs", "zstd", "grub-mkimage", "mcopy", "syslinux", "qemu-img")
NOT_ARTIFACTS = ("manifest.json", "SHA256SUMS")  # SHA256SUMS is made from the artifacts; the manifest lists it


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(4 * 1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


def artifacts(out: Path) -> list[dict[str, Any]]:
    """Every file under `out` except the manifest and SHA256SUMS, with size and sha256."""
    files = sorted(p for p in out.rglob("*") if p.is_file() and p.relative_to(out).parts[0] not in NOT_ARTIFACTS)
    return [{"path": str(p.relative_to(out)), "size": p.stat().st_size, "sha256": sha256(p)} for p in files]


def build_manifest(
    *,
    report: Report,
    plan: Plan,
    supplied_kernel: dict[str, str | None] | None,
    source: dict[str, str],
    cmdline: str,
    boot: dict[str, Any],
    disk_images: list[dict[str, str]],
    files: list[dict[str, Any]],
    timings: dict[str, float],
    created: int,
) -> dict[str, Any]:
    """`files` is the artifact list (see artifacts()); `disk_images` says which of them are disks, in which format."""
    tools: dict[str, str | None] = {name: tool_version_line(name) for name in ASSEMBLE_TOOLS}
    tools["dracut (image)"] = report.dracut_version
    return {
        "manifest_version": MANIFEST_VERSION,
        "container2boot": __version__,
        "created": datetime.fromtimestamp(created, UTC).isoformat(timespec="seconds"),  # the source date
        "source": source,
        "os_release": {k: report.os_release[k] for k in ("ID", "VERSION_ID", "PRETTY_NAME") if k in report.os_release},
        "image": {"init": report.init, "systemd_version": report.systemd_version, "sshd": report.sshd,
                  "cloud_init": report.cloud_init},
        "image_kind": plan.kind,
        "plan": plan.as_json(),
        "supplied_kernel": supplied_kernel,
        "kernel": {"version": plan.kernel_version, "source": plan.kernel, "cmdline": cmdline},
        "boot": boot,
        "selinux": plan.selinux and {"mode": plan.selinux.mode, "policy": plan.selinux.policy,
                                     "labelled": "at first boot" if plan.selinux.relabel_at_boot else
                                     "by container2boot" if plan.selinux.labels_root else None},
        "tools": tools,
        "disk_images": disk_images,
        "artifacts": files,
        "timings_seconds": timings,
    }


def write_manifest(out: Path, manifest: dict[str, Any]) -> Path:
    path = out / "manifest.json"
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path


def read_manifest(out: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((out / "manifest.json").read_text())
    return data


def source_epoch(manifest: dict[str, Any]) -> int:
    """The source date the outputs were made with, as seconds: the manifest's `created`. ValueError when absent or
    malformed."""
    return int(datetime.fromisoformat(str(manifest.get("created"))).timestamp())
