"""The CPU lowering of decode steps: Inductor with the thin-product and decode-attention passes, called without
Dynamo.

A decode step runs hundreds of times with the same shapes. Through ``torch.compile``, every call pays Dynamo's frame
evaluation, guards and argument handling: about 1.7 ms a step on SmolLM2 at batch 8 (34.0 against 32.3 ms).
:class:`StaticStep` hands the graph to Inductor directly, once per input signature, and calls the result as it is.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from copy import deepcopy
from typing import Any

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass
from torch.fx import Graph, GraphModule

from ..ops import native
from ..passes.moe_ops import NATIVE, moe_ffn
from .decode_attention import DecodeAttentionPass
from .thin_matmul import ThinMatmulPass

GATHERED = list(inspect.signature(moe_ffn).parameters).index("gathered")  # the argument that picks its form


class DecodeStepPasses(CustomGraphPass):
    """The decode step's post-grad passes in order, as the one custom pass Inductor takes (its key is theirs)."""

    def __init__(self, passes: Sequence[CustomGraphPass] | None = None):
        self.passes = list(passes) if passes is not None else [DecodeAttentionPass(), ThinMatmulPass()]

    def __call__(self, graph: Graph) -> None:
        for graph_pass in self.passes:
            graph_pass(graph)

    def uuid(self) -> Any:
        return tuple(graph_pass.uuid() for graph_pass in self.passes)


def native_experts(gm: GraphModule) -> GraphModule:
    """Switch ``gm``'s gathered MoE FFNs to the native experts kernel (in place), where the kernels are built."""
    if not native.load():
        return gm
    switched = [node for node in gm.graph.nodes
                if node.target is moe_ffn and len(node.args) > GATHERED and node.args[GATHERED] is True]
    for node in switched:
        node.update_arg(GATHERED, NATIVE)
    if switched:
        gm.recompile()
    return gm


def compile_decode_step(gm: GraphModule, example_inputs: Sequence[Any]) -> Callable[..., Any]:
    """A ``torch.compile`` backend for CPU decode steps: Inductor with :class:`DecodeStepPasses`, MoE experts as
    the native kernel."""
    from torch._inductor.compile_fx import compile_fx

    native_experts(gm)
    # Size asserts re-check every input and output on every call; callers (StaticStep, Dynamo) already key on shapes.
    patches = {"post_grad_custom_post_pass": DecodeStepPasses(), "size_asserts": False}
    return compile_fx(gm, list(example_inputs), config_patches=patches)


def signature(args: Sequence[Any]) -> tuple[Any, ...]:
    """What a static-shape compilation depends on: each tensor's shape, strides, dtype and device, other values as
    they are, whether the inputs alias one another, and grad mode."""
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    distinct = len({t.data_ptr() for t in tensors}) == len(tensors)
    return (*((tuple(a.shape), a.stride(), a.dtype, a.device) if isinstance(a, torch.Tensor) else a for a in args),
            distinct, torch.is_grad_enabled())


class StaticStep:
    """``gm`` compiled by Inductor for each input signature it is called with (:func:`signature`), without Dynamo.

    Weights stay attributes of ``gm`` that the compiled code reads in place, so training them (healing) is seen
    without compiling again. ``compiles`` counts compilations (tests check that warm-up leaves none to do).
    """

    def __init__(self, gm: GraphModule, backend: Callable[..., Callable[..., Any]] = compile_decode_step):
        self.gm = gm
        self.backend = backend
        self.compiled: dict[tuple[Any, ...], Callable[..., Any]] = {}
        self.compiles = 0

    def __call__(self, *args: Any) -> Any:
        key = signature(args)
        fn = self.compiled.get(key)
        if fn is None:
            # Inductor rewrites the graph it is given (its output becomes a tuple); the copy shares the weights.
            copy = GraphModule(self.gm, deepcopy(self.gm.graph))
            fn = self.compiled[key] = self.backend(copy, list(args))
            self.compiles += 1
        return fn(*args)
