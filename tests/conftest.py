"""Test setup shared by every test file.

Inductor's FX graph cache is off (DESIGN decision 6: a cached artefact would hide a pass that changed), and
``tests/`` is importable so tests can share the model zoo (``zoo.py``) and the tiny Llama (``tiny.py``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch._inductor.config

torch._inductor.config.fx_graph_cache = False

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
