"""Smoke test of examples/ and the notebook on a tiny random checkpoint: each runs to the end and prints what it
promises (the agreement checks inside them are real comparisons)."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest
from tiny import tiny_llama

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    tiny_llama().save_pretrained(path)
    return path


@pytest.fixture
def examples_path(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))


@pytest.mark.parametrize("script, expected", [
    ("backend.py", ["profile none: max |logit difference| 0.00e+00", "attention"]),
    ("mla_heal_save.py", ["KV bytes per token 512 -> 256", "saved and loaded models agree: True"]),
    ("mtp_speculative.py", ["held-out agreement by depth", "tokens/step"]),
    ("onnx_runtime.py", ["onnxruntime prefill", "onnxruntime decodes the same tokens: True"]),
])
def test_example_scripts_run(script, expected, checkpoint, tmp_path, monkeypatch, capsys, examples_path):
    monkeypatch.setattr(sys, "argv", [script, "--model", str(checkpoint), "--out", str(tmp_path), "--minutes",
                                      "0.05"])
    runpy.run_path(str(EXAMPLES / script), run_name="__main__")
    printed = capsys.readouterr().out
    for line in expected:
        assert line in printed, f"{script} did not print {line!r}:\n{printed}"


def test_notebook_cells_run_in_order(checkpoint, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DSCOMPILE_EXAMPLE_MODEL", str(checkpoint))
    monkeypatch.chdir(tmp_path)
    notebook = json.loads((EXAMPLES / "quickstart.ipynb").read_text(encoding="utf-8"))
    namespace: dict[str, object] = {}
    cells = [c for c in notebook["cells"] if c["cell_type"] == "code"]
    assert len(cells) >= 4
    for cell in cells:
        exec(compile("".join(cell["source"]), "quickstart.ipynb", "exec"), namespace)  # noqa: S102
    printed = capsys.readouterr().out
    assert "perplexity" in printed and "wrote" in printed
    assert (tmp_path / "example-output" / "report.html").is_file()
    assert namespace["out"].shape == (1, 32)
