"""An image taken straight from a registry or an OCI layout (`c2boot assemble docker://...`), for where there is no
podman to mount it: a Kubernetes pod or a CI job running the rootbuilder. skopeo copies the image as it is (its
manifest's bytes unchanged, so their sha256 is the digest the registry serves) into a directory; the layers module
then makes its root filesystem one tar. Neither needs privileges."""

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from container2boot.errors import C2BootError
from container2boot.manifest import sha256
from container2boot.plan import ImageConfig
from container2boot.reproducible import default_source_date, image_created
from container2boot.run import run

TRANSPORTS = ("docker://", "oci:", "oci-archive:")
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def is_image_reference(source: str) -> bool:
    """Whether `assemble`'s ROOTFS names an image by transport rather than a directory or tar on this system."""
    return source.startswith(TRANSPORTS)


@dataclass(frozen=True)
class FetchedImage:
    """An image copied to this system: what the manifest says of its source, how it runs, and its layers (paths of
    their blobs, the lowest first)."""

    reference: str
    digest: str
    config_digest: str
    created: int | None
    image_config: ImageConfig
    layers: tuple[Path, ...]

    def source(self, given: Mapping[str, str]) -> dict[str, str]:
        """The manifest's `source`: this image, and the source date (SOURCE_DATE_EPOCH if given, else its creation)."""
        date = default_source_date(given, self.created)
        return {"image": self.reference, "digest": self.digest, "id": self.config_digest.removeprefix("sha256:"),
                **({"source_date_epoch": date} if date else {})}


def fetch_image(reference: str, directory: Path, tls_verify: bool, authfile: Path | None) -> FetchedImage:
    """Copy the image `reference` names into `directory` (skopeo's dir: layout: manifest.json, blobs by digest).
    For a multi-architecture image skopeo takes this machine's; the digest recorded is that image's own."""
    # Only the refusal is passed: skopeo's default verifies, and respects a registry registries.conf calls insecure.
    options = ["--src-tls-verify=false"] if reference.startswith("docker://") and not tls_verify else []
    if authfile is not None:
        if not authfile.is_file():
            raise C2BootError(f"--authfile {authfile} is not a file: pass the auth file `podman login` or "
                              "`docker login` wrote (e.g. a mounted dockerconfigjson secret)")
        options.append(f"--src-authfile={authfile}")
    try:
        # Its temporary files (an oci-archive unpacked, blobs on their way) beside the outputs too, not in /var/tmp,
        # which in a pod is the container's own small layer.
        run(["skopeo", "copy", "--quiet", *options, reference, f"dir:{directory}"],
            env={**os.environ, "TMPDIR": str(directory.parent)})
    except C2BootError as e:
        raise C2BootError(f"cannot fetch {reference}: {e} (check the name, the registry's credentials "
                          "(--authfile) and, for a registry without TLS, --no-tls-verify)") from None
    try:
        manifest = json.loads((directory / "manifest.json").read_text())
        if not isinstance(manifest, dict) or "layers" not in manifest or "config" not in manifest:
            kind = manifest.get("mediaType", "an unknown kind") if isinstance(manifest, dict) else "not an object"
            raise C2BootError(f"{reference} is not a container image (its manifest: {kind}): pass an image, not an "
                              "artifact")
        config = json.loads(blob(directory, manifest["config"]["digest"]).read_bytes())
        layers = tuple(plain_or_gzip(blob(directory, layer["digest"])) for layer in manifest["layers"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise C2BootError(f"{reference} as skopeo copied it is not an image this tool can read ({e}): check it "
                          "with `skopeo inspect`") from None
    return FetchedImage(
        reference=reference,
        digest=f"sha256:{sha256(directory / 'manifest.json')}",
        config_digest=manifest["config"]["digest"],
        created=image_created(str(config.get("created", ""))),
        image_config=image_config(config),
        layers=layers,
    )


def blob(directory: Path, digest: str) -> Path:
    """skopeo's dir: layout names a blob by its digest's hex part (sha256 only)."""
    return directory / digest.partition(":")[2]


def plain_or_gzip(layer: Path) -> Path:
    """A zstd-compressed layer decompressed beside itself (Python reads gzip only), the compressed one removed."""
    with layer.open("rb") as f:
        if f.read(4) != ZSTD_MAGIC:
            return layer
    plain = layer.with_name(f"{layer.name}.tar")
    run(["zstd", "--decompress", "--quiet", "--rm", layer, "-o", plain])
    return plain


def image_config(config: Mapping[str, Any]) -> ImageConfig:
    """How the image runs, from its OCI configuration (the same fields podman's inspect shows)."""
    return ImageConfig.from_inspect({"Config": config.get("config") or {}, "Architecture": config.get("architecture")})
