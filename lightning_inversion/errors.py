"""The error a user's own input causes: a value out of range, data or a file that does not fit. Plain Python."""

from __future__ import annotations


class InputError(ValueError):
    """Something the user gave (an option, a file, an image, an argument) cannot work; the message says what is
    allowed. The command line prints it as one line and exits with status 2, without a traceback."""
