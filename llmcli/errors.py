"""The one exception type that means "the user asked for something we cannot do".

The CLI prints such errors as a single line and exits non-zero; anything else is a bug and keeps
its traceback.
"""


class UserError(Exception):
    """A problem with the user's input (config, files, options), reported without a traceback."""


class ConfigError(UserError):
    """A config value is unknown, of the wrong type or out of range."""
