"""The one exception type for bad user input: the CLI turns it into one line on stderr, exit 2."""


class UserError(Exception):
    """Input the user can fix (missing file, bad option, bad data); never a bug of ours."""
