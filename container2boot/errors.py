"""The one exception type users see: a message that says what went wrong and what to do about it."""


class C2BootError(Exception):
    """A failure the user can act on; the CLI prints it as one line and exits with `exit_code`."""

    exit_code = 1


class KernelImageNeeded(C2BootError):
    """The rootfs boots only with a supplied kernel (or dracut) and no kernel image's root was given. Its own exit
    status tells the host, which offers the kernel image only when the plan needs one, to supply it and start again."""

    exit_code = 3


ERROR_PREFIX = "c2boot: error: "  # how the CLI prints a C2BootError; the host recognises it in the rootbuilder's output
