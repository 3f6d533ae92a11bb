"""container2boot: turn a container image into a bootable disk image, as a normal user.

    from container2boot import Config, build
    result = build(Config(output=Path("out"), diskimage=True))
    result.disk, result.manifest["kernel"]["version"]
"""

__version__ = "0.1.0"

from container2boot.config import Config
from container2boot.errors import C2BootError
from container2boot.pipeline import BuildResult, assemble, build

__all__ = ["BuildResult", "C2BootError", "Config", "__version__", "assemble", "build"]
