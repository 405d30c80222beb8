"""User-facing errors: one line naming the file or setting, plus the fix."""


class DsalError(Exception):
    """A problem with the user's input. The CLI prints it on one line and exits with code 2."""

    exit_code = 2
