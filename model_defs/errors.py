"""The one exception type for problems a user can cause (bad path, bad checkpoint, bad value)."""


class MoeEngineError(Exception):
    """A problem the user can fix; the message names the problem and the fix, on one line."""
