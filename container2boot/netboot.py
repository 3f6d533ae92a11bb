"""Network boot: serve esp/container2boot over HTTP, so that dracut's livenet module can fetch the root image (and a
PXE/iPXE loader the kernel and initrd), and say which kernel arguments make a machine boot from it."""

import functools
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from container2boot.bootloader import BOOT_DIR
from container2boot.errors import C2BootError
from container2boot.log import logger
from container2boot.rootimage import FILES

# The disk boot's arguments that name the root on the ESP; a network boot names a URL instead.
DISK_ROOT_ARGS = ("root=", "rd.live.dir=", "rd.live.squashimg=")


def netboot_cmdline(disk_cmdline: str, url: str, extra: str = "") -> str:
    """The built image's kernel arguments with the root fetched from `url` (dracut livenet) over DHCP."""
    kept = [arg for arg in disk_cmdline.split() if not arg.startswith(DISK_ROOT_ARGS)]
    return " ".join([f"root=live:{url}", "rd.neednet=1", "ip=dhcp", *kept, *extra.split()])


def root_image(directory: Path, cmdline: str = "") -> str:
    """The name of the live root image in `directory` (esp/container2boot): the one the build's kernel arguments
    (`cmdline`) name, else squashfs.img or erofs.img, whichever is there."""
    named = [arg.partition("=")[2] for arg in cmdline.split() if arg.startswith("rd.live.squashimg=")]
    candidates = [*named, *FILES.values()]
    return next((name for name in candidates if name and (directory / name).is_file()), "")


def boot_files(out: Path, manifest: dict[str, Any]) -> Path:
    """OUT/esp/container2boot, after checking that the build can boot over the network."""
    directory = out / "esp" / BOOT_DIR
    if not root_image(directory):
        raise C2BootError(f"{out} has no esp/{BOOT_DIR}/{' or '.join(FILES.values())}: network boots need the live "
                          "layout (`c2boot build --netboot`)")
    if not manifest.get("boot", {}).get("netboot"):
        raise C2BootError(f"{out} was built without --netboot, so its initrd cannot fetch the root over the network: "
                          "rebuild with `c2boot build --netboot`")
    return directory


class _Handler(SimpleHTTPRequestHandler):
    """Logs each request as progress (`c2boot serve`)."""

    def log_message(self, format: str, *args: Any) -> None:
        logger.info("    %s %s", self.address_string(), format % args)


class _QuietHandler(SimpleHTTPRequestHandler):
    """Logs requests only with --verbose (`run`/`test --netboot`, whose terminal shows the guest)."""

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("    %s %s", self.address_string(), format % args)


@contextmanager
def serving(directory: Path, address: str, port: int, quiet: bool = False) -> Iterator[ThreadingHTTPServer]:
    """An HTTP server for `directory` in a background thread; port 0 picks a free one (server.server_port)."""
    handler = functools.partial(_QuietHandler if quiet else _Handler, directory=str(directory))
    try:
        server = ThreadingHTTPServer((address, port), handler)
    except OSError as e:
        raise C2BootError(f"cannot serve on {address}:{port}: {e.strerror or e}; check --address and --port") from None
    thread = threading.Thread(target=server.serve_forever, name="c2boot-serve", daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def lan_address() -> str:
    """The address other machines reach this host at: the source address of the default route (no packet is
    sent), else the loopback address."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # TEST-NET-1: only the route is looked up
            return str(probe.getsockname()[0])
        except OSError:
            return "127.0.0.1"
