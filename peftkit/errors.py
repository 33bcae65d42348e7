"""The one exception type for mistakes a user can fix (recipe, data, paths).

The CLI catches it once, prints the message without a traceback and exits with code 2.
"""

import errno
import os
import shutil


class UserError(Exception):
    """A problem in the user's input; the message says what is wrong and how to fix it."""


def first_line(exc: BaseException) -> str:
    """An exception's first message line (at most 300 characters), or its type when it has no message: what a
    UserError quotes of the library error it replaces."""
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


class Preempted(Exception):
    """SIGTERM arrived: a checkpoint was saved and the run stopped early on purpose (resume continues it)."""


# Free space below which a failed write is blamed on a full disk (torch.save's C++ writer reports it as
# "iostream error" or "unexpected pos", safetensors as "StorageFull", neither as an OSError).
NEARLY_FULL_BYTES = 16 * 2**20


def out_of_space(error: BaseException, folder: str | os.PathLike | None = None) -> bool:
    """A write failed for lack of disk space or quota: by errno, by message, or by the free space left in `folder`."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if any(sign in str(error) for sign in ("No space left", "StorageFull", "QuotaExceeded")):
        return True
    if folder is None:
        return False
    try:
        return shutil.disk_usage(folder).free < NEARLY_FULL_BYTES
    except OSError:
        return False
