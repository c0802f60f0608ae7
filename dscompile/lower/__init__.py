"""Lowering of rewritten graphs: Inductor (default), eager, TensorRT; ONNX export lives in ``onnx``."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.fx import GraphModule

from ..errors import ConfigError

TARGETS = ("inductor", "eager", "tensorrt")


def lower_graph(
    gm: GraphModule, example_inputs: Sequence[Any], target: str = "inductor", *, mode: str | None = None,
    fallback: bool = False,
) -> Callable[..., Any]:
    """Turn a rewritten graph into a callable for ``target``.

    Weights that passes added as attributes (MLA's factors) are passed as trailing inputs instead: Dynamo hands a
    backend graphs whose weights all arrive as inputs, and the lowering expects no others. Their tensors are read
    at every call, so training them in place (healing) is seen without recompiling.
    """
    added = lift_parameters(gm)
    if not added:
        return _lower(gm, example_inputs, target, mode=mode, fallback=fallback)
    tensors = added[1]
    compiled = _lower(added[0], [*example_inputs, *_static_fakes(example_inputs, tensors)], target, mode=mode,
                      fallback=fallback)

    def with_weights(*args: Any) -> Any:
        return compiled(*args, *tensors)

    return with_weights


def lift_parameters(gm: GraphModule) -> tuple[GraphModule, list[torch.Tensor]] | None:
    """A copy of ``gm`` whose parameter attributes are trailing placeholders, and their tensors; None if none."""
    if not any(n.op == "get_attr" and isinstance(getattr(gm, str(n.target), None), torch.nn.Parameter)
               for n in gm.graph.nodes):
        return None
    graph = copy.deepcopy(gm.graph)
    last = [n for n in graph.nodes if n.op == "placeholder"][-1]
    tensors: list[torch.Tensor] = []
    for node in list(graph.nodes):
        value = getattr(gm, str(node.target), None) if node.op == "get_attr" else None
        if not isinstance(value, torch.nn.Parameter):
            continue
        with graph.inserting_after(last):
            last = graph.placeholder(f"lifted_{str(node.target).replace('.', '_')}")
        last.meta.update(node.meta)
        node.replace_all_uses_with(last)
        graph.erase_node(node)
        tensors.append(value)
    return GraphModule(gm, graph), tensors


def _static_fakes(example_inputs: Sequence[Any], tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Under Dynamo's fake mode, the added weights as fake tensors of fixed shape (real ones would be given
    symbolic sizes without a source to guard on)."""
    from torch._guards import detect_fake_mode

    fake_mode = detect_fake_mode(list(example_inputs))
    if fake_mode is None:
        return tensors
    return [fake_mode.from_tensor(t, static_shapes=True) for t in tensors]


def _lower(gm: GraphModule, example_inputs: Sequence[Any], target: str, *, mode: str | None,
           fallback: bool) -> Callable[..., Any]:
    if target == "eager":
        return gm.forward
    if target == "inductor":
        from .inductor import lower_inductor

        return lower_inductor(gm, example_inputs, mode)
    if target == "tensorrt":
        from .tensorrt import lower_tensorrt

        return lower_tensorrt(gm, example_inputs, fallback=fallback)
    raise ConfigError(f"unknown lowering target {target!r}; valid targets: {', '.join(TARGETS)}")
