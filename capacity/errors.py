"""The errors of bad input. capscale's command line prints their message and exits with code 2."""


class InputError(ValueError):
    """Bad user input (a spec, a file, a row): the CLI prints the message and exits with code 2."""


class SpecError(InputError):
    """A format spec that cannot be built: the message names the problem."""
