"""The error types chatforge raises for bad input; every layer may import them (they import nothing)."""

from __future__ import annotations


class ChatforgeError(Exception):
    """Bad input from the user (missing file, incompatible checkpoint...); the message names the problem.

    The CLI prints it as one line and exits with status 2, without a traceback.
    """


class ConfigError(ChatforgeError, ValueError):
    """A configuration value or file that cannot be used."""
