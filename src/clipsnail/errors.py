"""Errors a user can act on. The CLI prints them as one line and exits with status 2."""


class ClipsnailError(Exception):
    """Base class for errors caused by user input (files, flags, configs), not by bugs."""


class DataError(ClipsnailError):
    """A data file or folder is missing, unreadable or malformed. The message names the file (and line)."""


class ConfigError(ClipsnailError):
    """A configuration key or value is invalid. The message names the key and lists the valid ones."""
