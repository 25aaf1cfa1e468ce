"""The one exception type for mistakes a user can fix (bad config, bad data, bad paths).

The CLI turns it into a single `jaxtune: error: ...` line and exit status 2; anything else is a
bug and keeps its traceback. It subclasses ValueError so library callers can catch it plainly.
"""


class UserError(ValueError):
    """A problem in the user's input: the message names the file/record/key and what was expected."""
