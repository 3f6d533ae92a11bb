"""The one exception type users see: a message that says what went wrong and what to do about it."""


class C2BootError(Exception):
    """A failure the user can act on; the CLI prints it as one line and exits non-zero."""
