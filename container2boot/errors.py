"""The one exception type users see: a message that says what went wrong and what to do about it."""


class C2BootError(Exception):
    """A failure the user can act on; the CLI prints it as one line and exits non-zero."""


ERROR_PREFIX = "c2boot: error: "  # how the CLI prints a C2BootError; the host recognises it in the rootbuilder's output
