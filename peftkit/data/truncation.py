"""How many texts truncation cut: a run says how much of its data the model never sees (or, for a cut target,
where it learns to stop)."""

from __future__ import annotations

import logging
from typing import Callable

log = logging.getLogger("peftkit")


def warn_cut(split: str, what: str, ids: list[list[int]], key: str, limit: int,
             encode_whole: Callable[[list[int]], list[list[int]]]) -> None:
    """Warn with the count of rows whose truncated token ids (`ids`) lost tokens. Only rows that reached the limit
    are tokenized again, whole (`encode_whole(positions)`), so the common case costs nothing."""
    at_limit = [i for i, row in enumerate(ids) if len(row) >= limit]
    if not at_limit:
        return
    cut = sum(len(row) > limit for row in encode_whole(at_limit))
    if cut:
        log.warning("data.%s: %d of %d %s are longer than %s=%d tokens and are cut; raise it to keep them whole",
                    split, cut, len(ids), what, key, limit)
