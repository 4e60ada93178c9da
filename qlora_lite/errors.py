"""One exception type for bad user input: the CLI prints its message on one line and exits 2."""


class UserError(Exception):
    """Bad input (config, data, paths, arguments). The message names the problem and what was expected."""
