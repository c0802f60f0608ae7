"""At log level debug, every graph the backend compiles is written before and after the passes to a folder, so a
user can read exactly what a rewrite did to their model (``DSCOMPILE_LOG=debug``; the folder is
``DSCOMPILE_DEBUG_DIR``, default ``./dscompile_debug``)."""

from __future__ import annotations

import itertools
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .session import CompiledGraph

log = logging.getLogger("dscompile")

DEFAULT_DIR = "dscompile_debug"
_counter = itertools.count()


def debug_dir() -> Path:
    return Path(os.environ.get("DSCOMPILE_DEBUG_DIR") or DEFAULT_DIR)


def dump_compiled(compiled: CompiledGraph) -> Path | None:
    """Write ``compiled``'s graphs (code and node table, before and after), its passes and its diff when the
    ``dscompile`` logger is at debug; returns the folder, or None when not at debug."""
    if not log.isEnabledFor(logging.DEBUG):
        return None
    folder = debug_dir() / f"graph_{os.getpid()}_{next(_counter):03d}"
    folder.mkdir(parents=True, exist_ok=True)
    for name, captured in (("before", compiled.before), ("after", compiled.after)):
        (folder / f"{name}.py").write_text(captured.gm.code, encoding="utf-8")
        (folder / f"{name}.txt").write_text(str(captured.graph), encoding="utf-8")
    (folder / "passes.json").write_text(json.dumps([p.to_dict() for p in compiled.passes], indent=2),
                                        encoding="utf-8")
    (folder / "diff.txt").write_text(str(compiled.diff()), encoding="utf-8")
    log.debug("deepseek_opt: graphs before and after the passes written to %s", folder)
    return folder
