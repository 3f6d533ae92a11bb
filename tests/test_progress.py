"""Progress output on a terminal (a real pseudo-terminal) and in plain mode, the build summary and --json."""

import json
import os
import pty
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from container2boot.cli import build_result_json, build_summary
from container2boot.errors import C2BootError
from container2boot.log import TOOL_LINES_ENV, TOOL_PREFIX
from container2boot.pipeline import BuildResult
from container2boot.run import run

STAGES = """
import sys, time
from container2boot.log import StageTimer, logger, setup_logging
from container2boot.run import run
setup_logging(False, quiet=sys.argv[1] == "quiet")
timer = StageTimer()
with timer.stage("repart", "Assembling the disk"):
    run(["sh", "-c", "echo 'tool: first step'; sleep 0.8; echo 'tool: second step' >&2; sleep 0.8"], follow=True)
with timer.stage("initrd", "Building the initrd"):
    logger.info("    a line from inside the stage")
    time.sleep(2.2)
with timer.stage("rootimage", "Packing the root image"):
    pass
with timer.stage("check", "Reading the image") as progress:
    progress.size(300 * 10**6)
    progress.now("at the kernel")
    for _ in range(4):
        progress.advance(50 * 10**6)
        time.sleep(0.3)
"""


def on_a_terminal(*args: str) -> str:
    """Run STAGES with stderr on a pseudo-terminal; what the terminal received, escape codes removed."""
    leader, follower = pty.openpty()
    process = subprocess.Popen([sys.executable, "-c", STAGES, *args], stderr=follower, stdout=subprocess.DEVNULL,
                               env={**os.environ, "TERM": "xterm", "COLUMNS": "100"})
    os.close(follower)
    received = b""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        ready, _, _ = select.select([leader], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # the other side closed
                break
            if not chunk:
                break
            received += chunk
        elif process.poll() is not None:
            break
    process.wait()
    os.close(leader)
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", received.decode(errors="replace"))


def test_on_a_terminal_a_stage_shows_its_elapsed_time_and_ends_with_it() -> None:
    screen = on_a_terminal("normal")
    assert "0:00:01" in screen or "0:00:02" in screen, "no live elapsed time"
    assert re.search(r"==> Assembling the disk .*tool: first step", screen), "the tool's line is not shown"
    assert re.search(r"==> Assembling the disk .*tool: second step", screen)
    assert re.search(r"==> Assembling the disk \(1\.\d s\)", screen)
    assert re.search(r"==> Building the initrd \(2\.\d s\)", screen)
    assert "    a line from inside the stage" in screen  # printed above the live line
    assert re.search(r"==> Packing the root image \(0\.\d s\)", screen)
    assert re.search(r"==> Reading the image .*/300\.0 MB .*at the kernel", screen), "no bar with the bytes"
    assert "200.0/300.0 MB" in screen or "150.0/300.0 MB" in screen
    assert re.search(r"==> Reading the image \(1\.\d s\)", screen)


def test_elsewhere_each_stage_is_one_plain_line_with_its_time_of_day() -> None:
    result = subprocess.run([sys.executable, "-c", STAGES, "normal"], capture_output=True, text=True, check=True)
    lines = result.stderr.splitlines()
    assert lines.pop(0).startswith("==> Assembling the disk  [")  # the tool's lines are not in the log
    assert re.fullmatch(r"==> Building the initrd  \[\d\d:\d\d:\d\d\]", lines[0])
    assert lines[1] == "    a line from inside the stage" and lines[2].startswith("==> Packing the root image  [")
    assert lines[3].startswith("==> Reading the image  [") and len(lines) == 4  # no bar, no bytes
    assert "\x1b" not in result.stderr


def test_in_the_rootbuilder_of_a_live_host_the_tools_lines_are_passed_on() -> None:
    result = subprocess.run([sys.executable, "-c", STAGES, "normal"], capture_output=True, text=True, check=True,
                            env={**os.environ, TOOL_LINES_ENV: "1"})
    lines = result.stderr.splitlines()
    assert lines[:3] == [lines[0], f"{TOOL_PREFIX}tool: first step", f"{TOOL_PREFIX}tool: second step"]


def test_a_followed_tool_that_fails_says_its_last_line() -> None:
    with pytest.raises(C2BootError, match=r"^sh failed \(exit 3\): the reason$"):
        run(["sh", "-c", "echo working; echo 'the reason' >&2; exit 3"], follow=True)


def test_quiet_prints_nothing_but_warnings() -> None:
    assert on_a_terminal("quiet").strip() == ""


MANIFEST = {
    "cache": {"initrd": "reused", "outputs": "built"},
    "timings_seconds": {"machine": 0.4, "check": 5.2, "assemble": 30.1,
                        "assemble_stages": {"initrd": 0.6, "rootimage": 21.0}},
    "artifacts": [{"path": "disk.img", "size": 262 * 2**20, "sha256": "0" * 64},
                  {"path": "esp/container2boot/initrd.img", "size": 40 * 2**20, "sha256": "1" * 64},
                  {"path": "esp/EFI/BOOT/grub.cfg", "size": 900, "sha256": "2" * 64}],
    "source": {"image": "localhost/img:1"}, "image_kind": "machine",
}


def test_the_summary_names_stage_times_what_was_reused_and_sizes(tmp_path: Path) -> None:
    summary = build_summary(MANIFEST, tmp_path / "out")
    assert "machine 0.4 s" in summary and "initrd 0.6 s (reused)" in summary and "rootimage 21.0 s" in summary
    assert f"outputs (built) in {tmp_path / 'out'}: disk.img 262 MiB, esp/container2boot/initrd.img 40 MiB" in summary
    assert "grub.cfg" not in summary and "/out/esp" not in summary.replace(str(tmp_path), "")


def test_build_json_says_where_and_how(tmp_path: Path) -> None:
    result = BuildResult(tmp_path / "out", tmp_path / "out/esp", tmp_path / "out/disk.img",
                         tmp_path / "out/manifest.json", MANIFEST)
    data = json.loads(json.dumps(build_result_json(result)))
    assert data["status"] == "ok" and data["disk"] == str(tmp_path / "out/disk.img")
    assert data["cache"] == {"initrd": "reused", "outputs": "built"} and data["boot_test"] is None
    assert data["artifacts"][0]["path"] == "disk.img" and data["source"]["image"] == "localhost/img:1"
