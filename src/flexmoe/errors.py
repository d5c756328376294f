"""User-facing errors: the CLI prints these as one line, never as a traceback."""


class FlexMoEError(Exception):
    """A problem with the user's input that names what is wrong and how to fix it."""


class Terminated(BaseException):
    """SIGTERM arrived: a command stops as it does on Ctrl-C (``KeyboardInterrupt``)."""
