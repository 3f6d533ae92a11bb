"""Rootless podman through podman-py: the API service, the base image, the rootbuilder and machine images,
and the assemble container. Everything started here is stopped and removed again, also on Ctrl-C."""

import fnmatch
import getpass
import hashlib
import io
import json
import os
import re
import secrets
import shutil
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from podman import PodmanClient
from podman.errors import APIError, ImageNotFound, PodmanError

from container2boot import __version__, lifecycle
from container2boot.access import parse_secret
from container2boot.cache import default_directory as cache_directory
from container2boot.config import Config, command_line
from container2boot.errors import ERROR_PREFIX, C2BootError, KernelImageNeeded
from container2boot.log import (
    DONE_PREFIX,
    STAGE_PREFIX,
    TOOL_LINES_ENV,
    TOOL_PREFIX,
    StageProgress,
    StageTimer,
    logger,
)
from container2boot.plan import ImageConfig
from container2boot.reproducible import default_source_date, image_created
from container2boot.rootfs import Report, examine
from container2boot.run import check_version, require_tool, run
from container2boot.tree import Tree

ROOTBUILDER_REPO = "localhost/container2boot/rootbuilder"
KERNEL_REPO = "localhost/container2boot/kernel"
BASE_LABEL = "io.container2boot.base"  # on the rootbuilder and kernel images: the base they were built FROM
VERSION_LABEL = "io.container2boot.version"  # and the container2boot that built them
KERNEL_ROOT = "/kernel"  # where the assemble container sees the kernel image
INPUTS = "/run/c2boot-inputs"  # where it sees the files the settings name (keys, user-data, the password)
EXAMPLE_MACHINE_TAG = "localhost/container2boot/machine:latest"
CONTAINERFILE_NAMES = ("Containerfile", "Dockerfile")  # what podman build looks for in a context
CONTAINER_CACHE_HOME = "/cache"  # XDG_CACHE_HOME in the rootbuilder, where the host's cache is mounted
CUSTOM_MACHINE_TAG = "localhost/container2boot/custom:latest"
SERVICE_START_SECONDS = 30
GO_STRUCT = re.compile(r"\s*&[\w.]+\{.*$")  # e.g. ' &imagebuilder.Step{Env:[]string{...}, ...}'
CONTEXT_IGNORE = ("__pycache__", "*.pyc", ".mypy_cache", ".pytest_cache", ".ruff_cache")
DEMO_USER = "demo"


@dataclass(frozen=True)
class MachineImage:
    reference: str
    image_id: str
    digest: str | None
    created: int | None = None  # seconds since the epoch: the default source date of reproducible outputs
    size_bytes: int = 0  # podman's size of its layers, unpacked (files that later layers removed count too)

    def source_date(self, source: Mapping[str, str]) -> str:
        """The source date its outputs get: SOURCE_DATE_EPOCH as given, else the image's creation; "" for none."""
        return default_source_date(source, self.created)


def kernel_tag(config: Config) -> str:
    """The kernel image to use: --kernel-image, else the bundled one's tag (the hash of its Containerfile and base)."""
    if config.kernel_image:
        return config.kernel_image
    containerfile = containerfiles() / "Containerfile.kernel"
    return f"{KERNEL_REPO}:{hashlib.sha256(containerfile.read_bytes() + config.base_image.encode()).hexdigest()[:16]}"


def containerfiles() -> Path:
    return Path(str(resources.files("container2boot") / "containerfiles"))


def socket_candidates() -> list[str]:
    if host := os.environ.get("CONTAINER_HOST"):
        return [host]
    if os.geteuid() == 0:
        return ["unix:///run/podman/podman.sock"]
    runtime = os.environ.get("XDG_RUNTIME_DIR", f"/run/user/{os.geteuid()}")
    return [f"unix://{runtime}/podman/podman.sock"]


def check_subordinate_ids(user: str, uid: int) -> None:
    """Rootless podman maps the image's users to the ranges in /etc/subuid and /etc/subgid."""
    for kind in ("subuid", "subgid"):
        path = Path(f"/etc/{kind}")
        lines = path.read_text().splitlines() if path.exists() else []
        if not any(line.split(":")[0] in (user, str(uid)) for line in lines if line.count(":") == 2):
            raise C2BootError(
                f"no {kind} range for {user} in {path}, which rootless podman needs: run `sudo usermod "
                f"--add-subuids 100000-165535 --add-subgids 100000-165535 {user}` and `podman system migrate`"
            )


def build_inputs(config: Config) -> tuple[Path, Path]:
    """The Containerfile and build context of the machine image, checked (with the --secret's) before anything
    starts; without --file, the bundled example's."""
    for spec in config.secrets:
        parse_secret(spec)
    if config.containerfile is None and config.context is None:
        return containerfiles() / "Containerfile.machine", containerfiles()
    if config.containerfile is None:
        assert config.context is not None
        found = [config.context / n for n in CONTAINERFILE_NAMES if (config.context / n).is_file()]
        if not config.context.is_dir() or not found:
            raise C2BootError(f"{config.context} is not a build context with a Containerfile or Dockerfile: pass "
                              "the directory that holds it, or name the file with --file")
        return found[0], config.context
    if config.containerfile.is_dir():
        raise C2BootError(f"--file {config.containerfile} is a directory: pass the Containerfile itself (its "
                          "directory is the build context)")
    if not config.containerfile.is_file():
        raise C2BootError(f"Containerfile {config.containerfile} not found: check the --file path")
    context = config.context or config.containerfile.parent
    if not context.is_dir():
        raise C2BootError(f"build context {context} is not a directory: pass the directory that the Containerfile's "
                          "COPY and ADD read from")
    return config.containerfile, context


def split_reference(reference: str) -> tuple[str, str]:
    """'host:5000/path/name:tag' -> ('host:5000/path/name', 'tag'); the tag is latest when none is given."""
    head, _, last = reference.rpartition("/")
    name, _, tag = last.partition(":")
    return (f"{head}/{name}" if head else name), tag or "latest"


def debian_suite(reference: str) -> str | None:
    """'docker.io/library/debian:trixie' -> 'trixie': the bases we can bootstrap with mmdebstrap."""
    name, _, tag = reference.rpartition(":")
    if "/" in tag or name.split("/")[-1] != "debian":
        return None
    return tag or None


def debian_bases(containerfile: str) -> list[str]:
    """The `FROM debian:SUITE` images of a Containerfile (no build arguments, no earlier stages), which
    ensure_base_image can bootstrap when no registry has them."""
    stages: set[str] = set()
    found = []
    for line in containerfile.splitlines():
        words = [w for w in line.split() if not w.startswith("--")]
        if len(words) >= 2 and words[0].upper() == "FROM":
            reference = words[1]
            if len(words) >= 4 and words[2].upper() == "AS":
                stages.add(words[3].lower())
            if reference.lower() not in stages and "$" not in reference and debian_suite(reference):
                found.append(reference)
    return list(dict.fromkeys(found))


def context_tar(context: Path, containerfile: Path, dest: Path, extra: Mapping[str, Path]) -> str:
    """Tar the build context plus the Containerfile and `extra` files (under private names); returns the
    Containerfile's name. The API service resolves build secrets inside the context it receives (and moves them
    out of it before the build), so secret files travel as `extra`."""
    ignore = [*CONTEXT_IGNORE, *_containerignore(context)]
    name = ".c2boot-containerfile"

    def keep(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        parts = Path(info.name).parts
        return None if any(fnmatch.fnmatch(p, pat) for p in parts for pat in ignore) else info

    with tarfile.open(dest, "w") as tar:
        tar.add(context.resolve(), arcname=".", filter=keep)  # resolve: the packaged containerfiles/ is a link
        tar.add(containerfile, arcname=name)
        for arcname, path in extra.items():
            tar.add(path, arcname=arcname)
    return name


def build_error(error: str) -> str:
    """podman's build error on one line, without the Go data structures it appends to some of them."""
    text = GO_STRUCT.sub("", " ".join(error.split()))
    return text.replace("Build error: ", "")


def _containerignore(context: Path) -> list[str]:
    for name in (".containerignore", ".dockerignore"):
        path = context / name
        if path.is_file():
            return [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    return []


def tree_digest(root: Path, extra: str = "") -> str:
    """Content hash of a directory tree: the rootbuilder is rebuilt exactly when its build context changes."""
    digest = hashlib.sha256(extra.encode())
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def external_containers(check: bool = False) -> set[str]:
    """All containers, buildah's working containers included (the API does not list those; a failed build
    leaves one behind). Cleanup calls it unchecked, so that it cannot hide the error it is cleaning up after."""
    out = subprocess.run(["podman", "ps", "--all", "--external", "--quiet", "--no-trunc"],
                         capture_output=True, text=True, check=check).stdout
    return set(out.split())


class Session:
    """A connected podman client, plus the scratch space of one build."""

    def __init__(self, client: Any, scratch: Path) -> None:
        self.client = client
        self.scratch = scratch

    # Images -----------------------------------------------------------------------------------------------

    def image(self, reference: str) -> MachineImage | None:
        try:
            image = self.client.images.get(reference)
        except ImageNotFound:
            return None
        digests = image.attrs.get("RepoDigests") or []
        return MachineImage(reference, image.id, image.attrs.get("Digest") or (digests[0] if digests else None),
                            image_created(str(image.attrs.get("Created", ""))), int(image.attrs.get("Size") or 0))

    def pull(self, reference: str, policy: str = "missing") -> MachineImage | None:
        """The image as the pull `policy` (--pull) wants it: the one here, or pulled; None when neither. Only
        "always" makes a failed pull an error; localhost/ names no registry unless it does."""
        local = self.image(reference)
        if not wants_pull(reference, policy, local is not None):
            return local
        logger.info("    pulling %s", reference)
        error = self._pull(reference, "newer" if policy == "newer" else "always")
        if error is not None:
            if policy == "always":
                raise C2BootError(f"pulling {reference} failed (--pull always): {error}")
            logger.debug("    pull failed: %s", error)
        return self.image(reference)

    def _pull(self, reference: str, policy: str) -> str | None:
        """One pull through the API; the error podman reports, or None."""
        try:
            response = self.client.api.post("/images/pull", params={"reference": reference, "policy": policy},
                                            stream=True)
            if response.status_code >= 400:
                return str(json.loads(response.text or "{}").get("message", response.text))
            errors = [str(message["error"]) for raw in response.iter_lines() if raw
                      if "error" in (message := json.loads(raw))]
        except (APIError, PodmanError, OSError, ValueError, AttributeError) as e:  # the connection, odd JSON
            return str(e)
        return errors[-1] if errors else None

    def ensure_base_image(self, reference: str, mirror: str, policy: str = "missing") -> None:
        """The base of the bundled Containerfiles: present, pulled, or bootstrapped with mmdebstrap."""
        if self.pull(reference, policy):
            return
        suite = debian_suite(reference)
        if suite is None:
            raise C2BootError(f"base image {reference} is not present and cannot be pulled: pull it first, or "
                              "use --base-image with a Debian image (e.g. debian:trixie) to bootstrap it locally")
        logger.info("    no registry answered: bootstrapping Debian %s from %s with mmdebstrap", suite, mirror)
        argv = [require_tool("mmdebstrap"), "--variant=minbase", "--include=ca-certificates", "--quiet",
                suite, "-", mirror]
        with tempfile.TemporaryFile() as errors:
            process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=errors)
            try:
                # CMD as the registry's Debian images have it, so that the bootstrapped base runs like the real one.
                response = self.client.api.post("/images/import", params={"reference": reference,
                                                                           "changes": ['CMD ["bash"]']},
                                                data=process.stdout, headers={"Content-type": "application/x-tar"})
            except BaseException:
                process.kill()  # interrupted: do not wait for a bootstrap nobody reads any more
                raise
            finally:
                assert process.stdout is not None
                process.stdout.close()
                returncode = process.wait()
            if returncode != 0 or response.status_code >= 400:
                errors.seek(0)
                tail = errors.read().decode(errors="replace").strip().splitlines()[-3:]
                raise C2BootError(f"bootstrapping {reference} with mmdebstrap failed: {' | '.join(tail)} "
                                  f"(check that --mirror {mirror} is reachable)")

    def build_image(self, context: Path, containerfile: Path, tag: str, buildargs: Mapping[str, str],
                    secrets: Sequence[str] = (), pull: str = "missing",
                    labels: Mapping[str, str] | None = None, timestamp: int | None = None) -> None:
        """podman build through the API, printing each STEP as it starts; a failure names the failing step. `pull`
        is podman build's --pull policy for its FROM images; `timestamp` dates the image and its files (the same
        content then gives the same image id)."""
        tar_path = self.scratch / f"context-{secrets_token()}.tar"
        secret_files = {f".c2boot-secret-{i}": src for i, src in map(parse_secret, secrets)}
        name = context_tar(context, containerfile, tar_path, secret_files)
        params = {
            "dockerfile": name, "t": tag, "rm": True, "forcerm": True, "layers": True,
            "pullpolicy": "ifnewer" if pull == "newer" else pull,  # buildah's name for it
            "buildargs": json.dumps(dict(buildargs)),
            "secrets": json.dumps([f"id={n.removeprefix('.c2boot-secret-')},src={n}" for n in secret_files]),
            "labels": json.dumps(dict(labels or {})),
            **({} if timestamp is None else {"timestamp": timestamp}),
        }
        before = external_containers()
        last: list[str] = []
        with lifecycle.current().building():  # a killed build's working container is found by its time
            try:
                with tar_path.open("rb") as body:
                    response = self.client.api.post("/build", params=params, data=body, stream=True,
                                                    headers={"Content-type": "application/x-tar"})
                    if response.status_code >= 400:
                        answer = json.loads(response.text or "{}").get("message", response.text)
                        raise C2BootError(f"podman refused to build {tag}: {answer}")
                    for raw in response.iter_lines():
                        message = json.loads(raw)
                        if "error" in message:
                            for line in last[-10:]:
                                logger.debug("    podman build: %s", line)
                            raise C2BootError(f"building {tag} failed: {build_error(message['error'])}")
                        for line in message.get("stream", "").splitlines():
                            if line.startswith("STEP "):
                                logger.info("    %s", line[:140])
                            elif line.strip():
                                logger.debug("    %s", line)
                                last.append(line.strip())
                if self.image(tag) is None:
                    raise C2BootError(f"building {tag} produced no image (last output: {(last or ['none'])[-1]})")
            except BaseException:
                self._remove_new_external_containers(before)
                raise
            finally:
                tar_path.unlink(missing_ok=True)

    def _remove_new_external_containers(self, before: set[str]) -> None:
        for container in external_containers() - before:
            subprocess.run(["podman", "rm", "--force", container], capture_output=True, check=False)

    def rootbuilder_tag(self, base_image: str) -> str:
        """The toolbox image's tag: the hash of its build context (this container2boot and its Containerfile)."""
        context = self.scratch / "rootbuilder"
        if not context.exists():
            package = Path(str(resources.files("container2boot")))
            shutil.copytree(package, context / "container2boot", ignore=shutil.ignore_patterns(*CONTEXT_IGNORE))
            shutil.copyfile(containerfiles() / "Containerfile.rootbuilder", context / "Containerfile.rootbuilder")
        return f"{ROOTBUILDER_REPO}:{tree_digest(context, base_image)[:16]}"

    def rootbuilder_image(self, base_image: str, mirror: str) -> str:
        """The toolbox image with this container2boot inside, built when its tag is not there yet."""
        tag = self.rootbuilder_tag(base_image)
        context = self.scratch / "rootbuilder"
        if self.image(tag):
            logger.info("    %s is up to date", tag)
            return tag
        self.ensure_base_image(base_image, mirror)
        self.build_tool_image(context, context / "Containerfile.rootbuilder", tag, base_image)
        return tag

    def publish(self, image: str, reference: str, push: bool, tls_verify: bool) -> str:
        """Tag `image` as `reference` and, with `push`, push it (podman's auth file gives the credentials). Returns
        the name to pull: REFERENCE, or REFERENCE@DIGEST once pushed."""
        repository, tag = split_reference(reference)
        self.client.images.get(image).tag(repository, tag)
        if not push:
            return reference
        digest_file = self.scratch / "pushed-digest"
        try:
            run(["podman", "push", f"--tls-verify={str(tls_verify).lower()}", "--digestfile", digest_file, reference],
                name="podman push")
        except C2BootError as e:
            raise C2BootError(f"{e} (log in with `podman login {repository.split('/')[0]}`; a registry without "
                              "TLS needs --no-tls-verify)") from None
        return f"{repository}@{digest_file.read_text().strip()}"

    def build_tool_image(self, context: Path, containerfile: Path, tag: str, base_image: str) -> None:
        """Build one of container2boot's own images (tagged by the hash of what goes into it), then drop the tags
        an older container2boot or Containerfile made for the same base: nothing else would ever remove them, and
        each holds a few hundred MB."""
        self.build_image(context, containerfile, tag, {"BASE": base_image},
                         labels={BASE_LABEL: base_image, VERSION_LABEL: __version__})
        repository = split_reference(tag)[0]
        for image in self.client.images.list(filters={"reference": repository}):
            if (image.labels or {}).get(BASE_LABEL, base_image) != base_image:
                continue  # another --base-image's, still current
            for old in image.tags:
                if split_reference(old)[0] == repository and old != tag:
                    try:
                        self.client.images.remove(old)
                        logger.debug("    removed %s (superseded by %s)", old, tag)
                    except APIError as e:  # in use by another build's container: it stays
                        logger.debug("    kept %s: %s", old, _api_reason(e))

    def kernel_image(self, config: Config) -> str:
        """The image that supplies the kernel: --kernel-image as given (or pulled), else the bundled one (Debian's
        generic signed kernel, dracut, its live and network modules), built on first use and tagged by the hash of
        its Containerfile and base."""
        if config.kernel_image:
            found = self.pull(config.kernel_image, config.pull)
            if found is None:
                how = "is not here (--pull never)" if config.pull == "never" else \
                    "not found locally and could not be pulled"
                raise C2BootError(f"kernel image {config.kernel_image} {how}")
            return found.image_id
        containerfile = containerfiles() / "Containerfile.kernel"
        tag = kernel_tag(config)
        if self.image(tag):
            logger.info("    %s is up to date", tag)
            return tag
        logger.info("    building %s (Debian's linux-image-amd64 and dracut, once)", tag)
        self.ensure_base_image(config.base_image, config.mirror)
        context = self.scratch / "kernel"
        context.mkdir()
        self.build_tool_image(context, containerfile, tag, config.base_image)
        return tag

    def kernel_image_at_hand(self, config: Config) -> str | None:
        """The kernel image `kernel_image` would give when it is here already and the pull policy takes it as it
        is (nothing to build or pull); else None."""
        tag = kernel_tag(config)
        local = self.image(tag)
        if local is None or (config.kernel_image and wants_pull(tag, config.pull, True)):
            return None
        return local.image_id if config.kernel_image else tag

    def image_config(self, reference: str) -> ImageConfig:
        """How the image runs (ENTRYPOINT, CMD, ENV, WORKDIR, USER, STOPSIGNAL), from podman's metadata."""
        try:
            return ImageConfig.from_inspect(self.client.images.get(reference).attrs)
        except ImageNotFound:
            raise C2BootError(f"image {reference} not found: check the name with `podman images`") from None

    def machine_image(self, config: Config, timer: StageTimer) -> MachineImage:
        """The image to boot: --image as given (or pulled), else built from --file or the bundled example."""
        if config.image:
            with timer.stage("machine", f"Looking up {config.image}"):
                found = self.pull(config.image, config.pull)
            if found is None:
                how = "is not here (--pull never)" if config.pull == "never" else \
                    "not found locally and could not be pulled"
                raise C2BootError(f"image {config.image} {how}: check the name with `podman images`, or build it "
                                  "first")
            return found
        example = config.containerfile is None and config.context is None
        containerfile, context = build_inputs(config)
        tag = config.tag or (EXAMPLE_MACHINE_TAG if example else CUSTOM_MACHINE_TAG)
        build_secrets = list(config.secrets)
        with timer.stage("machine", f"Building the machine image {tag} from {containerfile}"):
            if example:
                self.ensure_base_image(config.base_image, config.mirror, config.pull)
                if not any(parse_secret(s)[0] == "chpass" for s in build_secrets):
                    build_secrets.append(self._demo_credentials())
            else:  # a Debian base that no registry serves here is bootstrapped, as the bundled images' is
                for reference in debian_bases(containerfile.read_text(errors="replace")):
                    self.ensure_base_image(reference, config.mirror, config.pull)
            build_args = {"BASE": config.base_image} if example else {}
            build_args |= dict(spec.split("=", 1) for spec in config.build_args)
            self.build_image(context, containerfile, tag, build_args, build_secrets, config.pull)
        found = self.image(tag)
        assert found is not None
        return found

    def _demo_credentials(self) -> str:
        """A fresh password for the example's demo user, shown once; it never enters an image layer."""
        password = secrets_token()
        creds = self.scratch / "chpass"
        creds.write_text(f"{DEMO_USER}:{password}\n")
        creds.chmod(0o600)
        logger.info("    no --secret id=chpass given: the demo user's password is %s", password)
        return f"id=chpass,src={creds}"

    def examine(self, reference: str, progress: StageProgress | None = None) -> Report:
        """Inspect an image's filesystem without building or mounting anything: one pass over the tar stream of a
        created (never started) container, plus the image's own metadata. `progress` hears of the bytes read."""
        try:
            image = self.client.images.get(reference)
        except ImageNotFound:
            raise C2BootError(f"image {reference} not found: check the name with `podman images`, or pass a "
                              "directory or a tar of a root filesystem") from None
        labels = {"io.container2boot.role": "inspect", **lifecycle.current().container_labels()}
        container = self.client.containers.create(image.id, command=["true"], labels=labels)
        try:
            if progress is not None:
                progress.size(int(image.attrs.get("Size") or 0))
            tree = Tree.from_tar(io.BufferedReader(ChunkReader(container.export(), progress), 1024 * 1024))
        finally:
            remove_container(container)
        return examine(tree, labels=image.attrs.get("Labels") or {},
                       architecture=image.attrs.get("Architecture"))

    # The assemble container ---------------------------------------------------------------------------------

    def assemble(self, rootbuilder: str, image: MachineImage, staging: Path, config: Config,
                 kernel_image: str | None = None, progress: StageProgress | None = None) -> None:
        """Run `c2boot assemble` in the rootbuilder with the machine image mounted at /rootfs (and the kernel
        image at /kernel); `progress` shows the step it is at."""
        volumes = [{"source": image.image_id, "destination": "/rootfs", "rw": False}]
        if kernel_image is not None:
            volumes.append({"source": kernel_image, "destination": KERNEL_ROOT, "rw": False})
            config = config.replace(kernel_root=Path(KERNEL_ROOT))
        inputs, config = container_inputs(config)
        args = command_line(config, "assemble", skip={"output", "force"})  # it writes to /out, staged here
        cache = cache_directory()  # the initrd cache: the host's, shared by every build
        try:
            cache.mkdir(mode=0o700, parents=True, exist_ok=True)
            cache_mounts = [{"type": "bind", "source": str(cache), "target": f"{CONTAINER_CACHE_HOME}/{cache.name}"}]
        except OSError as e:  # the rootbuilder's own /cache then, which goes with its container
            logger.warning("    warning: the build cache in %s cannot be used (%s)", cache, e.strerror or e)
            cache_mounts = []
        try:  # an HTTP error is an OSError too: it must not pass for a failed write
            container = self.client.containers.create(
                rootbuilder,
                command=args,
                image_volumes=volumes,
                mounts=[{"type": "bind", "source": str(staging), "target": "/out"},
                        *cache_mounts,
                        *({"type": "bind", "source": str(host), "target": inside, "read_only": True}
                          for host, inside in inputs)],
                environment={"C2BOOT_SOURCE_IMAGE": image.reference, "C2BOOT_SOURCE_DIGEST": image.digest or "",
                             "C2BOOT_SOURCE_ID": image.image_id, "C2BOOT_IMAGE_CONFIG": config.image_config,
                             "C2BOOT_KERNEL_IMAGE": kernel_image or "", "XDG_CACHE_HOME": CONTAINER_CACHE_HOME,
                             "SOURCE_DATE_EPOCH": image.source_date(config.source),
                             **({TOOL_LINES_ENV: "1"} if progress is not None and progress.live else {})},
                labels={"io.container2boot.role": "assemble", **lifecycle.current().container_labels()},
            )
        except APIError as e:
            raise C2BootError(f"podman cannot use {staging.parent} for the outputs ({_api_reason(e)}): choose an "
                              "--output on a local filesystem that podman can see") from None
        error, step = "", ""
        try:
            try:
                container.start()
                for chunk in container.logs(stream=True, follow=True):
                    for line in chunk.decode(errors="replace").splitlines():
                        if line.startswith(ERROR_PREFIX):
                            error = line.removeprefix(ERROR_PREFIX)  # the host reports it, once
                        elif line.startswith(DONE_PREFIX):
                            continue  # its /out is not where the outputs end up: the host says where
                        elif line.startswith(TOOL_PREFIX):
                            if progress is not None:  # only a live host asks for these
                                progress.now(f"{step}: {line.removeprefix(TOOL_PREFIX)}")
                        elif line.strip():
                            logger.info("%s", line)
                            if progress is not None and line.startswith(STAGE_PREFIX):
                                step = line.removeprefix(STAGE_PREFIX).partition("  [")[0]
                                progress.now(step)
                status = container.wait()
            except APIError as e:
                raise C2BootError(f"podman could not run the rootbuilder container: {_api_reason(e)} "
                                  "(`c2boot doctor` checks podman on this host)") from None
            code = status if isinstance(status, int) else status.get("StatusCode", 1)
            if code == KernelImageNeeded.exit_code and kernel_image is None:
                raise KernelImageNeeded(error)
            if code != 0:
                raise C2BootError(error or f"the assemble container exited with status {code}")
        finally:
            remove_container(container)


def wants_pull(reference: str, policy: str, local: bool) -> bool:
    """Whether --pull `policy` asks the registry for `reference` (localhost/ names none unless "always" says so)."""
    if policy == "never" or (policy == "missing" and local):
        return False
    return not reference.startswith("localhost/") or policy == "always"


def container_inputs(config: Config) -> tuple[list[tuple[Path, str]], Config]:
    """The files the settings name on the host (SSH keys, cloud-init user-data, the password secret), each mounted
    read-only into the assemble container, and the settings with the paths it sees them at."""
    inputs = [(path.expanduser().absolute(), f"{INPUTS}/ssh-key-{index}.pub")
              for index, path in enumerate(config.ssh_keys)]
    changes: dict[str, Any] = {"ssh_keys": tuple(Path(inside) for _, inside in inputs)}
    if config.cloud_init is not None:
        inputs.append((config.cloud_init.expanduser().absolute(), f"{INPUTS}/user-data"))
        changes["cloud_init"] = Path(inputs[-1][1])
    if config.password_secret is not None:
        secret_id, src = parse_secret(config.password_secret, "--password-secret")
        inputs.append((src, f"{INPUTS}/password"))
        changes["password_secret"] = f"id={secret_id},src={inputs[-1][1]}"
    return inputs, config.replace(**changes)


def remove_container(container: Any) -> None:
    """Remove a container we created, also after a failure; a failure to remove is worth a warning, not an error
    that would hide the first one."""
    try:
        container.remove(force=True)
        lifecycle.current().container_removed()
    except (APIError, PodmanError) as e:
        logger.warning("could not remove container %s: %s", container.id[:12], e)


def _api_reason(error: APIError) -> str:
    """podman's own explanation, without the HTTP status line that requests puts in front of it."""
    return str(error.explanation or error).strip().splitlines()[0][:300]


class ChunkReader(io.RawIOBase):
    """A readable file over an iterator of byte chunks (podman-py's export stream), for tarfile's stream mode;
    `progress` hears of each chunk's size."""

    def __init__(self, chunks: Iterable[bytes], progress: StageProgress | None = None) -> None:
        self.chunks = iter(chunks)
        self.pending = b""
        self.progress = progress

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self.pending:
            try:
                self.pending = next(self.chunks)
            except StopIteration:
                return 0
            if self.progress is not None:
                self.progress.advance(len(self.pending))
        size = min(len(buffer), len(self.pending))
        buffer[:size] = self.pending[:size]
        self.pending = self.pending[size:]
        return size


def secrets_token() -> str:
    return secrets.token_urlsafe(12)


@contextmanager
def api_service() -> Iterator[PodmanClient]:
    """A client for the user's podman API socket; when none answers, a private service for this build."""
    for url in socket_candidates():
        client = PodmanClient(base_url=url)
        try:
            if client.ping():
                yield client
                return
        except (APIError, PodmanError, OSError) as e:
            logger.debug("no podman API at %s: %s", url, e)
        client.close()  # type: ignore[no-untyped-call]
    with lifecycle.temporary_directory("c2boot-podman-") as tmp:
        socket = tmp / "podman.sock"
        log = (tmp / "service.log").open("w+")
        logger.debug("$ podman system service --time=0 unix://%s", socket)
        # Its own session: a Ctrl-C meant for c2boot must not stop the service before c2boot's cleanup used it.
        service = lifecycle.start_process(["podman", "system", "service", "--time=0", f"unix://{socket}"],
                                          stdout=log, stderr=log, start_new_session=True)
        client = PodmanClient(base_url=f"unix://{socket}")
        try:
            deadline = time.monotonic() + SERVICE_START_SECONDS
            while not _answers(client):
                if service.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    raise C2BootError(f"podman system service did not start: {log.read().strip()[-300:]} "
                                      "(run `c2boot` as the user whose podman storage you want to use)")
                time.sleep(0.2)
            yield client
        finally:
            client.close()  # type: ignore[no-untyped-call]
            lifecycle.stop_process(service)
            log.close()


def _answers(client: PodmanClient) -> bool:
    try:
        return bool(client.ping())
    except (APIError, PodmanError, OSError):
        return False


@contextmanager
def session() -> Iterator[Session]:
    """Check podman, connect (starting a service if needed), and clean up everything afterwards."""
    require_tool("podman")
    check_version("podman")
    if os.geteuid() != 0:
        check_subordinate_ids(getpass.getuser(), os.geteuid())
    with api_service() as client, lifecycle.temporary_directory("c2boot-build-") as scratch:
        yield Session(client, scratch)
