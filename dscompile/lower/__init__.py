"""Lowering of rewritten graphs: Inductor (default), eager, TensorRT; ONNX export lives in ``onnx``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch.fx import GraphModule

from ..errors import ConfigError

TARGETS = ("inductor", "eager", "tensorrt")


def lower_graph(
    gm: GraphModule, example_inputs: Sequence[Any], target: str = "inductor", *, mode: str | None = None,
    fallback: bool = False,
) -> Callable[..., Any]:
    """Turn a rewritten graph into a callable for ``target``."""
    if target == "eager":
        return gm.forward
    if target == "inductor":
        from .inductor import lower_inductor

        return lower_inductor(gm, example_inputs, mode)
    if target == "tensorrt":
        from .tensorrt import lower_tensorrt

        return lower_tensorrt(gm, example_inputs, fallback=fallback)
    raise ConfigError(f"unknown lowering target {target!r}; valid targets: {', '.join(TARGETS)}")
