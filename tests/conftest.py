"""Test setup shared by every test file.

Inductor's FX graph cache is off (DESIGN decision 6: a cached artefact would hide a pass that changed), and
``tests/`` is importable so tests can share the model zoo (``zoo.py``) and the tiny Llama (``tiny.py``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch._inductor.config

torch._inductor.config.fx_graph_cache = False

_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:  # parallel test workers (scripts/test.sh) share the cores instead of each taking them all
    torch.set_num_threads(max(1, int(os.environ.get("DSCOMPILE_TEST_CORES", os.cpu_count() or 1)) // _WORKERS))

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)


@pytest.fixture(scope="session")
def smollm2():
    """The embedded SmolLM2-135M and its tokenizer, loaded once per session from the user cache."""
    from dscompile import models

    return models.load("smollm2")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test starts with empty Dynamo caches: many tiny models of one class would reach its recompile limit."""
    torch._dynamo.reset()
    yield
