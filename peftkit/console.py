"""What reaches the console: peftkit's own messages (what the user must act on) and progress bars.

Everything the libraries underneath log — bitsandbytes' kernel notices, DeepSpeed's accelerator choice,
transformers' load reports, Python warnings — goes to the run folder's log file instead (kept in memory until a
run folder is known; dropped by commands that have none). `-v` prints it all on the console as well.
"""

from __future__ import annotations

import logging
from pathlib import Path

PEFTKIT_FORMAT = "[peftkit] %(message)s"
FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Libraries that print through their own handler instead of propagating to the root logger.
_OWN_HANDLER_LOGGERS = ("DeepSpeed",)
# Libraries that print through their own console handler *and* propagate (the root logger already takes their records
# to the log file, or with -v to the console): huggingface_hub, whose retry notices come five per unreachable file.
_EXTRA_CONSOLE_LOGGERS = ("huggingface_hub",)


class _LogFile(logging.Handler):
    """Holds records until `attach` names a file, then writes them and every later record there."""

    def __init__(self, limit: int = 10_000):
        super().__init__(logging.INFO)
        self.setFormatter(logging.Formatter(FILE_FORMAT))
        self.pending: list[logging.LogRecord] = []
        self.limit = limit
        self.file: logging.FileHandler | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if self.file is not None:
            self.file.emit(record)
        elif len(self.pending) < self.limit:
            self.pending.append(record)

    def attach(self, path: Path) -> None:
        if self.file is not None and Path(self.file.baseFilename) == path.resolve():
            return
        if self.file is not None:
            self.file.close()
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = logging.FileHandler(path, encoding="utf-8")
        self.file.setFormatter(self.formatter)
        for record in self.pending:
            self.file.emit(record)
        self.pending = []


class _Reroute(logging.Filter):
    """On a library logger with its own console handler: hand each record to the log file and drop it there."""

    def __init__(self, log_file: _LogFile):
        super().__init__()
        self.log_file = log_file

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= self.log_file.level:
            self.log_file.handle(record)
        return False


_log_file: _LogFile | None = None
_installed: list[tuple[logging.Logger, logging.Handler | logging.Filter]] = []


def configure(verbose: bool) -> None:
    """Called by the command line before any library is imported (again per in-process call: replaces the last)."""
    global _log_file
    for logger, item in _installed:
        logger.removeHandler(item) if isinstance(item, logging.Handler) else logger.removeFilter(item)
    _installed.clear()
    logging.captureWarnings(True)  # `warnings.warn` from libraries becomes a record of the `py.warnings` logger
    peftkit = logging.getLogger("peftkit")
    peftkit.setLevel(logging.INFO)
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    console = logging.StreamHandler()
    import transformers.utils.logging as transformers_logging  # imports huggingface_hub, which adds its handler

    for name in _EXTRA_CONSOLE_LOGGERS:
        library = logging.getLogger(name)
        for handler in [h for h in library.handlers if type(h) is logging.StreamHandler]:
            library.removeHandler(handler)

    if verbose:
        _log_file = None
        console.setFormatter(logging.Formatter("[%(name)s] %(message)s"))
        _install(root, console)
        transformers_logging.enable_default_handler()
        transformers_logging.disable_propagation()
        return
    console.setFormatter(logging.Formatter(PEFTKIT_FORMAT))
    _install(peftkit, console)  # and, through the root logger, the log file
    _log_file = _LogFile()
    _install(root, _log_file)
    for name in _OWN_HANDLER_LOGGERS:
        _install(logging.getLogger(name), _Reroute(_log_file))
    transformers_logging.disable_default_handler()
    transformers_logging.enable_propagation()


def _install(logger: logging.Logger, item: logging.Handler | logging.Filter) -> None:
    logger.addHandler(item) if isinstance(item, logging.Handler) else logger.addFilter(item)
    _installed.append((logger, item))


def attach_log_file(path: Path) -> None:
    """From now on (and for everything held so far) library messages go to `path`."""
    if _log_file is not None:
        _log_file.attach(path)
