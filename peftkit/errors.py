"""The one exception type for mistakes a user can fix (recipe, data, paths).

The CLI catches it once, prints the message without a traceback and exits with code 2.
"""


class UserError(Exception):
    """A problem in the user's input; the message says what is wrong and how to fix it."""


class Preempted(Exception):
    """SIGTERM arrived: a checkpoint was saved and the run stopped early on purpose (resume continues it)."""
