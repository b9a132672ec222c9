"""The one exception type a user can cause; the CLI prints it as a single line."""


class UserError(Exception):
    """Bad input from the user (path, list, column, flag, config): printed as one line, exit 2."""
