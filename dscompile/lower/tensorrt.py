"""Lowering through torch_tensorrt, partitioned by converter support; unsupported ops stay in PyTorch."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from torch.fx import GraphModule

from ..errors import LoweringError

log = logging.getLogger("dscompile")


def lower_tensorrt(
    gm: GraphModule, example_inputs: Sequence[Any], *, fallback: bool = False
) -> Callable[..., Any]:
    """Build TensorRT engines for the supported partitions; on failure fall back to PyTorch if allowed."""
    try:
        from torch_tensorrt.dynamo.backend import torch_tensorrt_backend
    except ImportError as exc:
        message = (
            "lower='tensorrt' needs torch_tensorrt, which is not installed: pip install 'dscompile[tensorrt]' "
            "(a CUDA build of torch is required), or pass options={'fallback': True} to run in PyTorch"
        )
        if not fallback:
            raise LoweringError(message) from exc
        log.warning("%s; running the graph in PyTorch instead", message)
        return gm.forward
    try:
        return torch_tensorrt_backend(gm, list(example_inputs))
    except Exception as exc:  # engine builds fail in many ways; each is reported, none is silent
        if not fallback:
            raise LoweringError(f"TensorRT engine build failed: {exc}") from exc
        log.warning("TensorRT engine build failed (%s); running the graph in PyTorch instead", exc)
        return gm.forward
