"""`c2boot verify`: build a published output again from the image and the options its manifest records, and
compare every file. Reproducible outputs make this the check anyone can run on a disk they were handed."""

from contextlib import ExitStack
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from container2boot import __version__, lifecycle
from container2boot.config import Config, make_config, settings_from_command_line
from container2boot.errors import C2BootError
from container2boot.formats import CHECKSUMS
from container2boot.log import StageTimer, logger
from container2boot.manifest import artifacts, read_manifest, sha256

REBUILD_PREFIX = ".c2boot-verify-"
UNCOMPARED = ("timings_seconds", "cache")  # how long a build took and what it took from the cache


@dataclass(frozen=True)
class Verdict:
    """How the published outputs compare with the rebuilt ones (paths relative to the output directory)."""

    files: int  # how many files were compared
    different: tuple[str, ...] = ()
    only_published: tuple[str, ...] = ()
    only_rebuilt: tuple[str, ...] = ()
    manifest: tuple[str, ...] = ()  # the manifest's entries that differ (timings and cache aside)

    @property
    def ok(self) -> bool:
        return not (self.different or self.only_published or self.only_rebuilt or self.manifest)

    def details(self) -> list[str]:
        """One line per difference."""
        return ([f"    differs: {path}" for path in self.different]
                + [f"    not in the rebuild: {path}" for path in self.only_published]
                + [f"    only in the rebuild: {path}" for path in self.only_rebuilt]
                + [f"    manifest.json differs in: {', '.join(self.manifest)}"] * bool(self.manifest))


def recorded_build(out: Path) -> dict[str, Any]:
    """`out`'s manifest, checked to name the image and the build options it was made with."""
    try:
        manifest = read_manifest(out)
    except FileNotFoundError:
        raise C2BootError(f"{out} has no manifest.json: pass the output directory of `c2boot build`") from None
    except (OSError, ValueError) as e:
        raise C2BootError(f"{out}/manifest.json cannot be read ({e}): pass the output directory of `c2boot build`, "
                          "as it wrote it") from None
    source = manifest.get("source") or {}
    options = (manifest.get("build") or {}).get("options")
    if not isinstance(options, list) or not source.get("image") or not source.get("id"):
        raise C2BootError(f"{out}/manifest.json does not say how it was built (`c2boot assemble` and older "
                          f"container2boot do not record it): build it again the same way and compare with "
                          f"`sha256sum -c {out}/{CHECKSUMS}`")
    return manifest


def rebuild_config(manifest: dict[str, Any], output: Path, config: Config) -> Config:
    """The build that makes the outputs again: the recorded options, the recorded image as it is here (never
    pulled: a name may point elsewhere now), no cache, the recorded source date (the manifest's `created`)."""
    values = settings_from_command_line(manifest["build"]["options"], "build")
    epoch = int(datetime.fromisoformat(manifest["created"]).timestamp())
    return make_config({**values, "image": manifest["source"]["image"], "pull": "never", "no_cache": True,
                        "output": output, "verbose": config.verbose, "quiet": config.quiet},
                       source={"source_date_epoch": str(epoch)})


def check_image(manifest: dict[str, Any]) -> None:
    """The recorded image name must still name the recorded image here: a rebuild of another image proves nothing."""
    from container2boot import podman  # host side only

    reference, image_id = manifest["source"]["image"], manifest["source"]["id"]
    with podman.session() as session:
        found = session.image(reference)
    digest = manifest["source"].get("digest")
    if found is None:
        where = f"pull it by digest (`podman pull NAME@{digest}`) and tag it {reference}" if digest else \
            f"build or load it as {reference}"
        raise C2BootError(f"the image the outputs were built from, {reference} (id {image_id[:12]}), is not here: "
                          f"{where}")
    if found.image_id != image_id:
        raise C2BootError(f"{reference} is now image {found.image_id[:12]}, not {image_id[:12]} which the outputs "
                          f"were built from: tag that one as {reference} again (`podman tag {image_id[:12]} "
                          f"{reference}`)")


def compare(published: Path, rebuilt: Path) -> Verdict:
    """Every file of both directories by sha256 (the published ones hashed now, not trusted from their
    SHA256SUMS), and the manifests but for timings and cache."""
    ours = {a["path"]: a["sha256"] for a in artifacts(published)}
    theirs = {a["path"]: a["sha256"] for a in artifacts(rebuilt)}
    for directory, files in ((published, ours), (rebuilt, theirs)):
        if (directory / CHECKSUMS).is_file():
            files[CHECKSUMS] = sha256(directory / CHECKSUMS)
    mine, rebuilt_manifest = read_manifest(published), read_manifest(rebuilt)
    keys = [k for k in dict.fromkeys([*mine, *rebuilt_manifest]) if k not in UNCOMPARED]
    return Verdict(
        files=len(ours.keys() & theirs.keys()),
        different=tuple(sorted(p for p in ours.keys() & theirs.keys() if ours[p] != theirs[p])),
        only_published=tuple(sorted(ours.keys() - theirs.keys())),
        only_rebuilt=tuple(sorted(theirs.keys() - ours.keys())),
        manifest=tuple(k for k in keys if mine.get(k) != rebuilt_manifest.get(k)),
    )


def verify(out: Path, config: Config) -> Verdict:
    """Build `out` again as its manifest says (into --output, else a temporary directory beside it) and compare."""
    from container2boot.pipeline import build  # host side only

    manifest = recorded_build(out)
    check_image(manifest)
    if manifest.get("container2boot") != __version__:
        logger.warning("    warning: %s was built by container2boot %s; this is %s, whose outputs may differ for "
                       "that reason alone", out, manifest.get("container2boot"), __version__)
    options = " ".join(manifest["build"]["options"]) or "(none)"
    logger.info("c2boot: building %s again from %s, with the options it was built with: %s", out,
                manifest["source"]["image"], options)
    with ExitStack() as stack:
        rebuilt = config.rebuild_output or \
            stack.enter_context(lifecycle.temporary_directory(REBUILD_PREFIX, out.absolute().parent)) / "rebuild"
        build(rebuild_config(manifest, rebuilt, config))
        with StageTimer().stage("compare", f"Comparing {out} with the rebuild"):
            return compare(out, rebuilt)

