"""Logging: DSCOMPILE_LOG sets the level, and at debug the backend writes each graph before and after the passes."""

from __future__ import annotations

import io
import json
import logging
import sys

import pytest
import torch
from tiny import ids, tiny_llama

from dscompile.log import CurrentStderrHandler, configure


@pytest.fixture
def restore_logger():
    log = logging.getLogger("dscompile")
    level, handlers = log.level, list(log.handlers)
    yield log
    log.setLevel(level)
    log.handlers[:] = handlers


@pytest.mark.parametrize("name, level", [("debug", logging.DEBUG), ("INFO", logging.INFO),
                                         (" warning ", logging.WARNING), ("error", logging.ERROR)])
def test_levels_come_from_the_environment(monkeypatch, restore_logger, name, level):
    monkeypatch.setenv("DSCOMPILE_LOG", name)
    assert configure().level == level
    streams = [h for h in restore_logger.handlers if isinstance(h, CurrentStderrHandler)]
    configure()
    assert len([h for h in restore_logger.handlers if isinstance(h, CurrentStderrHandler)]) == len(streams) == 1


def test_the_handler_writes_to_the_stderr_of_the_moment(monkeypatch, restore_logger):
    """A stream captured when the handler was made may be closed later; the handler must not keep it."""
    restore_logger.handlers[:] = []
    first = io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    configure("info")
    first.close()
    second = io.StringIO()
    monkeypatch.setattr(sys, "stderr", second)
    restore_logger.info("after the swap")
    assert "dscompile INFO after the swap" in second.getvalue()


def test_a_bad_level_is_reported_and_ignored(monkeypatch, restore_logger, caplog):
    restore_logger.setLevel(logging.WARNING)
    monkeypatch.setenv("DSCOMPILE_LOG", "chatty")
    with caplog.at_level(logging.WARNING, logger="dscompile"):
        configure()
    assert "DSCOMPILE_LOG='chatty' is not a level" in caplog.text


def test_debug_writes_graphs_before_and_after_the_passes(monkeypatch, restore_logger, tmp_path):
    monkeypatch.setenv("DSCOMPILE_DEBUG_DIR", str(tmp_path / "graphs"))
    configure("debug")
    model = tiny_llama()
    calibration = torch.randint(0, 128, (2, 300), generator=torch.Generator().manual_seed(0))
    import dscompile

    dscompile.optimize(model, {"mla": {"kv_ratio": 0.5}}, calibration, example_inputs=ids(), lower="eager")
    (folder,) = sorted((tmp_path / "graphs").iterdir())
    assert sorted(p.name for p in folder.iterdir()) == ["after.py", "after.txt", "before.py", "before.txt",
                                                      "diff.txt", "passes.json"]
    before, after = (folder / "before.py").read_text(), (folder / "after.py").read_text()
    assert "mla_0_down" not in before and "mla_0_down" in after
    passes = json.loads((folder / "passes.json").read_text())
    assert passes[0]["name"] == "mla" and passes[0]["rewrites"] == 2
    assert "attention" in (folder / "diff.txt").read_text()


def test_nothing_is_written_below_debug(monkeypatch, restore_logger, tmp_path):
    monkeypatch.setenv("DSCOMPILE_DEBUG_DIR", str(tmp_path / "graphs"))
    configure("info")
    import dscompile

    dscompile.optimize(tiny_llama(), "none", example_inputs=ids(), lower="eager")
    assert not (tmp_path / "graphs").exists()
