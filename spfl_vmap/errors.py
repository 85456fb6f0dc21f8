"""User-facing errors.

Anything a user can cause (a bad flag, a missing dataset, an impossible combination) raises
:class:`SpflError`. The CLI prints its message on one line and exits with status 2; it never
shows a traceback for these.
"""


class SpflError(Exception):
    """An error whose message is meant for the user, without a traceback."""


class ConfigError(SpflError, ValueError):
    """An invalid configuration value or combination of values."""


class DataError(SpflError):
    """A dataset that is missing, unreadable, or too small for the requested partition."""
