"""`c2boot verify` without podman: the recorded build options, the rebuild's settings, the comparison, the errors."""

import json
from pathlib import Path

import pytest

from container2boot.config import Config, make_config, settings_from_command_line
from container2boot.errors import C2BootError
from container2boot.formats import write_checksums
from container2boot.manifest import artifacts
from container2boot.pipeline import output_settings, rebuild_options
from container2boot.verify import compare, rebuild_config, recorded_build
from tests.conftest import c2boot

BUILT = make_config({"diskimage": True, "bios": True, "layout": "installed", "size": "3G", "formats": ["qcow2", "vhd"],
                     "compress": "zst", "cmdline": "quiet splash", "ssh_keys": [Path("/k/a.pub"), Path("/k/b.pub")],
                     "hostname": "web1", "base_image": "docker.io/library/debian:bookworm", "image": "localhost/m",
                     "test": True, "cpus": 4, "pull": "always", "output": Path("elsewhere"),
                     "no_cache": True})


def test_the_recorded_options_give_the_same_outputs_settings() -> None:
    """What the manifest records reads back into the same settings, but those that name or test the image."""
    options = rebuild_options(BUILT)
    assert "--image" not in options and "--test" not in options and "--pull" not in options
    assert "--output" not in options and "--no-cache" not in options and "--cpus" not in options
    assert options[options.index("--base-image") + 1] == "docker.io/library/debian:bookworm"
    again = make_config(settings_from_command_line(options, "build"))
    assert output_settings(again) == output_settings(BUILT)
    assert again.ssh_keys == BUILT.ssh_keys and again.base_image == BUILT.base_image


def test_files_are_recorded_by_absolute_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = make_config({"ssh_keys": [Path("key.pub")], "cloud_init": Path("user-data"),
                          "password_secret": "id=pw,src=secret.txt"})
    options = rebuild_options(config)
    assert options[options.index("--ssh-key") + 1] == str(tmp_path / "key.pub")
    assert options[options.index("--cloud-init") + 1] == str(tmp_path / "user-data")
    assert options[options.index("--password-secret") + 1] == f"id=pw,src={tmp_path / 'secret.txt'}"


def test_options_that_do_not_read_back_are_refused() -> None:
    with pytest.raises(C2BootError, match="--nonsense"):
        settings_from_command_line(["--nonsense"], "build")
    with pytest.raises(C2BootError, match="--size"):
        settings_from_command_line(["--size"], "build")  # a value is missing
    with pytest.raises(C2BootError, match="--ssh-port"):
        settings_from_command_line(["--ssh-port", "22"], "build")  # run's, not build's
    with pytest.raises(C2BootError, match="not a whole number"):
        settings_from_command_line(["--timeout", "soon"], "build")


def manifest_for(out: Path, **extra: object) -> dict[str, object]:
    files = artifacts(out)
    write_checksums(out, files)
    manifest = {"container2boot": "0.1.0", "created": "2026-11-27T18:27:49+00:00", "artifacts": files,
                "source": {"image": "localhost/m:1", "id": "ab" * 32}, "build": {"options": ["--diskimage"]},
                "timings_seconds": {"assemble": 1.0}, "cache": {"outputs": "built"}, **extra}
    (out / "manifest.json").write_text(json.dumps(manifest))
    return manifest


def outputs(root: Path, grub: str = "set timeout=0", **manifest: object) -> Path:
    (root / "esp/EFI/BOOT").mkdir(parents=True)
    (root / "esp/EFI/BOOT/grub.cfg").write_text(grub)
    (root / "disk.img").write_bytes(b"\0" * 4096)
    manifest_for(root, **manifest)
    return root


def test_identical_outputs_verify(tmp_path: Path) -> None:
    published = outputs(tmp_path / "a")
    rebuilt = outputs(tmp_path / "b", timings_seconds={"assemble": 99.0}, cache={"outputs": "reused"})
    verdict = compare(published, rebuilt)
    assert verdict.ok and verdict.files == 3 and verdict.details() == []  # SHA256SUMS is compared too


def test_every_file_is_hashed_again_not_trusted_from_its_checksums(tmp_path: Path) -> None:
    published = outputs(tmp_path / "a", grub="set timeout=5")
    rebuilt = outputs(tmp_path / "b")
    (published / "extra").write_text("x")
    (rebuilt / "disk.img").write_bytes(b"\1" * 4096)
    (rebuilt / "manifest.json").write_text((rebuilt / "manifest.json").read_text().replace("0.1.0", "0.2.0"))
    verdict = compare(published, rebuilt)
    assert not verdict.ok
    assert verdict.different == ("SHA256SUMS", "disk.img", "esp/EFI/BOOT/grub.cfg")  # disk.img's sum is old
    assert verdict.only_published == ("extra",)
    assert "artifacts" in verdict.manifest and "container2boot" in verdict.manifest
    assert "timings_seconds" not in verdict.manifest
    assert "    differs: esp/EFI/BOOT/grub.cfg" in verdict.details()


def test_the_rebuild_takes_the_recorded_image_date_and_options(tmp_path: Path) -> None:
    published = outputs(tmp_path / "a")
    recorded = recorded_build(published)
    config = rebuild_config(recorded, tmp_path / "rebuilt", Config(quiet=True))
    assert config.image == "localhost/m:1" and config.pull == "never" and config.no_cache and config.diskimage
    assert config.source == {"source_date_epoch": "1795804069"} and config.quiet
    assert config.output == tmp_path / "rebuilt"


@pytest.mark.parametrize(("manifest", "error"), [
    (None, "has no manifest.json"),
    ("{not json", "cannot be read"),
    (json.dumps({"source": {"image": "x", "id": "y"}}), r"does not say how it was built .*sha256sum -c"),
    (json.dumps(["a list"]), "does not say how it was built"),
    (json.dumps({"source": {"image": "x", "id": "y"}, "build": {"options": [1]}}), "does not say how it was built"),
    (json.dumps({"source": {"image": "x", "id": "y"}, "build": {"options": []}}), "cannot be rebuilt from: Invalid"),
    (json.dumps({"source": {"image": "x", "id": "y"}, "build": {"options": ["--size"]}, "created": "2026-11-27"}),
     "cannot be rebuilt from: '--size' is not an option"),
])
def test_outputs_that_cannot_be_verified_say_why(tmp_path: Path, manifest: str | None, error: str) -> None:
    if manifest is not None:
        (tmp_path / "manifest.json").write_text(manifest)
    with pytest.raises(C2BootError, match=error):
        recorded_build(tmp_path)


def test_verify_of_a_directory_without_a_manifest_is_one_line(tmp_path: Path) -> None:
    result = c2boot("verify", tmp_path, check=False)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [f"c2boot: error: {tmp_path} has no manifest.json: pass the output "
                                                  "directory of `c2boot build`"]
