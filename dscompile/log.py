"""The ``dscompile`` logger; its level comes from ``DSCOMPILE_LOG`` (debug, info, warning, error)."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


class CurrentStderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at emit time, so a replaced or closed stream is never kept."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        """Ignored: the stream is always the current ``sys.stderr``."""


def configure(level: str | None = None) -> logging.Logger:
    """Set the logger's level from ``level`` or ``DSCOMPILE_LOG``; add a stderr handler once when set."""
    log = logging.getLogger("dscompile")
    name = (level or os.environ.get("DSCOMPILE_LOG", "")).strip().lower()
    if not name:
        if not log.handlers:
            log.addHandler(logging.NullHandler())
        return log
    if name not in LEVELS:
        log.warning("DSCOMPILE_LOG=%r is not a level; use one of %s", name, ", ".join(LEVELS))
        return log
    log.setLevel(LEVELS[name])
    if not any(isinstance(h, logging.StreamHandler) and not isinstance(h, logging.NullHandler) for h in log.handlers):
        handler = CurrentStderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s dscompile %(levelname)s %(message)s"))
        log.addHandler(handler)
    return log


def progress_bar(progress: bool, total: int | None, desc: str) -> Any:
    """A tqdm bar over steps for long work (healing, refinement, MTP training), or None when ``progress`` is off."""
    if not progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="step")
