"""Exceptions raised by scatlas for problems a user can fix."""


class ScatlasError(ValueError):
    """Base class of every error caused by user input or configuration.

    The CLI prints the message on one line and exits with code 2; the message names the
    file, key and offending values. A ``ValueError``, as scikit-learn's, scib-metrics' and
    copairs' input errors are, so code that catches those catches these too.
    """


class InputError(ScatlasError):
    """The data (an ``.h5ad`` file, a table, a column) is unusable as given."""


class ConfigError(ScatlasError):
    """An experiment configuration is invalid."""


class UnpairedError(InputError):
    """No positive (or no negative) pair exists under the retrieval's pair rules (copairs' ``UnpairedException``)."""
