"""container2boot: turn a container image into a bootable disk image, as a normal user."""

__version__ = "0.1.0"
