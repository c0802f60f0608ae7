"""ONNX export: checked in onnxruntime at two shapes before the file appears; nothing half-written."""

from __future__ import annotations

import pytest
import torch
from tiny import ids, tiny_llama

import dscompile
from dscompile import ConfigError, LoweringError, UnsupportedError
from dscompile.lower import onnx as onnx_lower


def test_export_matches_pytorch_at_two_shapes(tmp_path):
    target = tmp_path / "sub" / "tiny.onnx"
    checks = dscompile.export_onnx(tiny_llama(), target, example_inputs=ids(1, 6))
    assert [c.shape for c in checks] == [(1, 7), (2, 12)]
    assert all(c.max_abs_diff < 1e-4 for c in checks)
    assert target.is_file() and sorted(p.name for p in target.parent.iterdir()) == ["tiny.onnx"]


def test_failed_check_leaves_nothing(tmp_path, monkeypatch):
    def reject(*args, **kwargs):
        raise LoweringError("onnxruntime output differs")

    monkeypatch.setattr(onnx_lower, "_check", reject)
    with pytest.raises(LoweringError, match="differs"):
        dscompile.export_onnx(tiny_llama(), tmp_path / "x.onnx", example_inputs=ids())
    assert list(tmp_path.iterdir()) == []


def test_tolerance_is_enforced(tmp_path):
    with pytest.raises(LoweringError, match="differs from PyTorch"):
        dscompile.export_onnx(tiny_llama(), tmp_path / "x.onnx", example_inputs=ids(), atol=-1.0)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kwargs, error, message", [
    ({"example_inputs": None}, ConfigError, "needs example_inputs"),
    ({"example_inputs": ids(), "check_shapes": [(1, 4)]}, ConfigError, "two or more shapes"),
    ({"example_inputs": ids(), "profile": "mla"}, UnsupportedError, "profile='none'"),
])
def test_bad_arguments(tmp_path, kwargs, error, message):
    with pytest.raises(error, match=message):
        dscompile.export_onnx(tiny_llama(), tmp_path / "x.onnx", **kwargs)


def test_exporter_failure_is_reported(tmp_path):
    class Broken(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(3))

        def forward(self, input_ids):
            if input_ids.sum() > 0:  # data-dependent control flow: the exporter refuses it
                return self.w * input_ids.float().sum()
            return self.w

    with pytest.raises(LoweringError, match="ONNX export of Broken failed"):
        dscompile.export_onnx(Broken(), tmp_path / "x.onnx", example_inputs=ids())
