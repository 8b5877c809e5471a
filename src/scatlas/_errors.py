"""Exceptions raised by scatlas for problems a user can fix."""


class ScatlasError(Exception):
    """Base class of every error caused by user input or configuration.

    The CLI prints the message on one line and exits with a non-zero code; the
    message names the file, key and offending values.
    """


class InputError(ScatlasError):
    """The data (an ``.h5ad`` file, a table, a column) is unusable as given."""


class ConfigError(ScatlasError):
    """An experiment configuration is invalid."""
