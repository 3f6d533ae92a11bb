"""`c2boot verify`: build a published output again from the image and the options its manifest records, and
compare every file. Reproducible outputs make this the check anyone can run on a disk they were handed."""

from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from container2boot import __version__, lifecycle
from container2boot.config import Config, make_config, settings_from_command_line
from container2boot.errors import C2BootError
from container2boot.formats import CHECKSUMS
from container2boot.log import StageTimer, logger
from container2boot.manifest import artifacts, read_manifest, sha256, source_epoch

REBUILD_PREFIX = ".c2boot-verify-"
# How long a build took, what it took from the cache, and the image it also made in podman's storage
UNCOMPARED = ("timings_seconds", "cache", "containerdisk")


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


@dataclass(frozen=True)
class Recorded:
    """What a manifest says of how its outputs were made."""

    image: str
    image_id: str
    digest: str | None
    epoch: int  # the source date
    options: tuple[str, ...]
    values: dict[str, Any]  # the options as settings
    version: str | None  # container2boot's
    rootbuilder: str | None  # its image id


def recorded_build(out: Path) -> Recorded:
    """How `out` was built, from its manifest: the image, the options and the source date."""
    where = f"{out}/manifest.json"
    try:
        manifest = read_manifest(out)
    except FileNotFoundError:
        raise C2BootError(f"{out} has no manifest.json: pass the output directory of `c2boot build`") from None
    except (OSError, ValueError) as e:
        raise C2BootError(f"{where} cannot be read ({e}): pass the output directory of `c2boot build`, as it wrote "
                          "it") from None
    manifest = manifest if isinstance(manifest, dict) else {}
    source, build = manifest.get("source"), manifest.get("build")
    source = source if isinstance(source, dict) else {}
    options = build.get("options") if isinstance(build, dict) else None
    if not isinstance(options, list) or not all(isinstance(o, str) for o in options) or \
            not isinstance(source.get("image"), str) or not isinstance(source.get("id"), str):
        raise C2BootError(f"{where} does not say how it was built (`c2boot assemble` and older container2boot do "
                          f"not record it): build it again the same way and compare with `sha256sum -c "
                          f"{out}/{CHECKSUMS}`")
    try:
        epoch = source_epoch(manifest)
        values = settings_from_command_line(options, "build")
    except (ValueError, C2BootError) as e:
        raise C2BootError(f"{where} cannot be rebuilt from: {e}") from None
    assert isinstance(build, dict)
    return Recorded(source["image"], source["id"], source.get("digest"), epoch, tuple(options), values,
                    manifest.get("container2boot"), build.get("rootbuilder"))


def rebuild_config(recorded: Recorded, output: Path, config: Config) -> Config:
    """The build that makes the outputs again: the recorded options, the recorded image as it is here (never
    pulled: a name may point elsewhere now, and so may a --kernel-image), no cache, the recorded source date."""
    return make_config({**recorded.values, "image": recorded.image, "pull": "never", "no_cache": True,
                        "output": output, "verbose": config.verbose, "quiet": config.quiet},
                       source={"source_date_epoch": str(recorded.epoch)})


def check_sources(recorded: Recorded, rebuild: Config) -> None:
    """The recorded image name must still give the recorded image here (a rebuild of another image proves
    nothing); another rootbuilder is worth a warning, as differences may come from its tools."""
    from container2boot import podman  # host side only

    reference, image_id = recorded.image, recorded.image_id
    with podman.session() as session:
        found = session.image(reference)
        rootbuilder = session.image(session.rootbuilder_tag(rebuild.base_image))
    if found is None:
        where = f"pull it by digest (`podman pull NAME@{recorded.digest}`) and tag it {reference}" \
            if recorded.digest else f"build or load it as {reference}"
        raise C2BootError(f"the image the outputs were built from, {reference} (id {image_id[:12]}), is not here: "
                          f"{where}")
    if found.image_id != image_id:
        raise C2BootError(f"{reference} is now image {found.image_id[:12]}, not {image_id[:12]} which the outputs "
                          f"were built from: tag that one as {reference} again (`podman tag {image_id[:12]} "
                          f"{reference}`)")
    if recorded.rootbuilder and (rootbuilder is None or rootbuilder.image_id != recorded.rootbuilder):
        logger.warning("    warning: the rootbuilder here (%s) is not the one the outputs were built with (%s): "
                       "differences may come from its tools", rootbuilder.image_id[:12] if rootbuilder else
                       "not built yet", recorded.rootbuilder[:12])
    if recorded.version != __version__:
        logger.warning("    warning: the outputs were built by container2boot %s; this is %s, whose outputs may "
                       "differ for that reason alone", recorded.version, __version__)


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

    recorded = recorded_build(out)
    if config.rebuild_output is not None and config.rebuild_output.exists():
        raise C2BootError(f"--output {config.rebuild_output} exists: name a new directory for the rebuild")
    with ExitStack() as stack:
        rebuilt = config.rebuild_output or \
            stack.enter_context(lifecycle.temporary_directory(REBUILD_PREFIX, out.absolute().parent)) / "rebuild"
        rebuild = rebuild_config(recorded, rebuilt, config)
        check_sources(recorded, rebuild)
        logger.info("c2boot: building %s again from %s, with the options it was built with: %s", out,
                    recorded.image, " ".join(recorded.options) or "(none)")
        build(rebuild)
        with StageTimer().stage("compare", f"Comparing {out} with the rebuild"):
            return compare(out, rebuilt)
