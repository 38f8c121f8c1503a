"""One exception type for mistakes the user can fix: the CLI prints its message on one line."""


class UserError(Exception):
    """Bad config, bad data or a missing resource; the message says what is wrong and how to fix it."""
