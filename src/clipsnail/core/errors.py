"""Errors a user can act on. The CLI prints them as one line and exits with status 2 (130 for `Interrupted`)."""


class ClipsnailError(Exception):
    """Base class for errors caused by user input (files, flags, configs), not by bugs."""


class DataError(ClipsnailError):
    """A data file or folder is missing, unreadable or malformed. The message names the file (and line)."""


class ConfigError(ClipsnailError, ValueError):
    """A configuration key or value is invalid. The message names the key and lists the valid ones. Also a
    ValueError: models check their arguments with it, and callers building them directly expect one."""


class Interrupted(KeyboardInterrupt):
    """Training stopped by Ctrl-C (SIGINT). The message says after which step, and what running the same command
    again resumes from. A KeyboardInterrupt, so code that catches those still does."""
