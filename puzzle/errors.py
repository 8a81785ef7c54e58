"""The one error type the CLI turns into a one-line message (no traceback unless --debug)."""


class PuzzleError(Exception):
    """A problem the user can fix: the message names the problem and what to change."""
