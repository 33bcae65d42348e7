"""The one exception type for mistakes a user can fix (recipe, data, paths).

The CLI catches it once, prints the message without a traceback and exits with code 2.
"""

import errno


class UserError(Exception):
    """A problem in the user's input; the message says what is wrong and how to fix it."""


class Preempted(Exception):
    """SIGTERM arrived: a checkpoint was saved and the run stopped early on purpose (resume continues it)."""


def out_of_space(error: BaseException) -> bool:
    """A write failed for lack of disk space or quota. torch.save and safetensors do not raise OSError for it
    (a RuntimeError "file write failed", a SafetensorError "StorageFull"), so their messages are read too."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(error)
    return any(sign in text for sign in ("No space left", "StorageFull", "QuotaExceeded", "file write failed"))
