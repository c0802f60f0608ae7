"""Calibration by interpretation: statistics at graph nodes equal what the model computes there."""

from __future__ import annotations

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from dscompile.calibrate import Gram, record_grams


def _mlp_graph() -> tuple[torch.fx.GraphModule, torch.nn.Module]:
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    gm = make_fx(lambda x: mlp(x))(torch.randn(2, 4, 6))
    return gm, mlp


def test_grams_accumulate_the_values_at_the_node_over_every_call():
    gm, mlp = _mlp_graph()
    relu = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.relu.default)
    batches = [torch.randn(2, 4, 6), torch.randn(2, 4, 6)]  # make_fx traced static shapes
    with record_grams(gm, [relu]) as grams:
        outs = [gm(x) for x in batches]
    hidden = torch.cat([torch.relu(mlp[0](x)).reshape(-1, 5) for x in batches]).double()
    gram = grams[relu.name]
    assert gram.tokens == 16
    torch.testing.assert_close(gram.matrix, hidden.T @ hidden)
    torch.testing.assert_close(gram.covariance(), hidden.T @ hidden / 16)
    for x, out in zip(batches, outs):  # the graph still computes what it did
        torch.testing.assert_close(out, mlp(x))


def test_the_graph_runs_normally_after_recording():
    gm, _ = _mlp_graph()
    relu = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.relu.default)
    with record_grams(gm, [relu]) as grams:
        gm(torch.randn(2, 4, 6))
    gm(torch.randn(2, 4, 6))
    assert grams[relu.name].tokens == 8
    assert "forward" not in vars(gm)


def test_nodes_without_a_static_width_and_empty_grams_are_refused():
    gm, _ = _mlp_graph()
    output = next(n for n in gm.graph.nodes if n.op == "output")
    with pytest.raises(ValueError, match="no static last dimension"):
        with record_grams(gm, [output]):
            pass
    with pytest.raises(ValueError, match="no tokens"):
        Gram.empty(3).covariance()
