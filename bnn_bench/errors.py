"""The one exception type for bad input: the CLI prints its message alone."""


class UserError(Exception):
    """Bad input: says what was wrong and what to do. Printed without a traceback."""
