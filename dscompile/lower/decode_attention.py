"""Decode-time attention as the native kernel ``dscompile::decode_attention``.

A decode step's attention has one query per sequence (or the few being verified) against a whole static cache.
Inductor lowers it to the CPU flash-attention kernel, which is built for long query blocks: at batch 8 it took
8.4 ms a step on SmolLM2 for caches that stream in about 3. The native kernel (``ops/decode_attention.cpp``)
scores all query heads of a KV head together, reads every cached key and value once, skips the slots the runtime's
mask excludes (the unfilled end of the cache), and splits long caches across threads. Like :mod:`thin_matmul` it
runs as a post-grad pass, on the decode steps only.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files
from torch.fx import Graph, Node

from ..capture import node_value
from ..ops import native
from .thin_matmul import THIN_ROWS, emit

_FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default


def _rewritable(node: Node) -> bool:
    """A float32 flash attention of at most :data:`THIN_ROWS` queries, no dropout, no causal flag, an additive
    float mask or none, and only its output read (not the log-sum-exp)."""
    if node.op != "call_function" or node.target is not _FLASH:
        return False
    q, k, v = (node_value(a) for a in node.args[:3])
    dropout = node.args[3] if len(node.args) > 3 else node.kwargs.get("dropout_p", 0.0)
    causal = node.args[4] if len(node.args) > 4 else node.kwargs.get("is_causal", False)
    mask = node.kwargs.get("attn_mask")
    mask_val = node_value(mask) if isinstance(mask, Node) else None
    if mask is not None and not (isinstance(mask_val, torch.Tensor) and mask_val.dtype == torch.float32
                                 and mask_val.dim() == 4):
        return False
    if not all(isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.dim() == 4 for t in (q, k, v)):
        return False
    rows = q.shape[2]
    users = {u.args[1] for u in node.users if u.target is operator.getitem}
    return (dropout == 0.0 and not causal and isinstance(rows, int) and rows <= THIN_ROWS
            and users == {0} and len(node.users) == 1 and q.shape[1] % k.shape[1] == 0)


class DecodeAttentionPass(CustomGraphPass):
    """Rewrites decode-sized CPU flash attentions into ``dscompile::decode_attention`` where the kernel is built."""

    def __init__(self, native_kernels: bool | None = None):
        self.native_kernels = native.load() if native_kernels is None else native_kernels

    def __call__(self, graph: Graph) -> None:
        if not self.native_kernels:
            return
        for node in list(graph.nodes):
            if not _rewritable(node):
                continue
            q, k, v = node.args[:3]
            scale = node.kwargs.get("scale")
            if scale is None:
                scale = node_value(q).shape[-1] ** -0.5
            (output,) = node.users
            with graph.inserting_before(node):
                new = emit(graph, torch.ops.dscompile.decode_attention.default, q, k, v, node.kwargs.get("attn_mask"),
                           float(scale))
            output.replace_all_uses_with(new)
            graph.erase_node(output)
            graph.erase_node(node)

    def uuid(self) -> Any:
        return (get_hash_for_files((__file__, *native.source_files())), self.native_kernels)
