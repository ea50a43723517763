"""Errors that are the user's mistake rather than a bug in meshguard."""


class UserError(Exception):
    """A user's mistake (bad key, missing file, unknown name, unwritable directory).

    The CLI prints the message as one line, ``meshguard: error: <message>``, with no traceback,
    and exits with status 2. Code that raises it must not have changed any file.
    """
