"""The one exception type for mistakes a user can fix: the CLI prints it without a traceback."""


class UserError(Exception):
    """A problem with the user's input or environment, worded so they know what to do."""
