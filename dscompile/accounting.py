"""Exact bytes and parameter counts from shapes: KV cache per token, weights, parameters read per token."""

from __future__ import annotations

from .capture import CapturedGraph
from .patterns import AttentionMatch, MatchSet, ops
from .patterns.lm_head import token_embedding


def kv_bytes_per_token(matches: MatchSet) -> int:
    """Bytes one token adds to a KV cache: every attention's keys and values (or latent) at the weights' dtype."""
    total = 0
    for a in matches.attention:
        tensor = a.k.weight.tensor
        itemsize = tensor.element_size() if tensor is not None else 4
        total += cached_values(a) * itemsize
    return total


def cached_values(a: AttentionMatch) -> int:
    """Values per token a cache must keep for ``a``: K and V, or, when both are projected from one narrower
    projection (a latent, as the MLA pass makes), that latent."""
    shared = a.k.input is a.v.input and ops.is_op(a.k.input, ops.LINEAR)
    return a.k.in_features if shared and a.k.in_features < a.kv_width else a.kv_width


def active_params_per_token(captured: CapturedGraph, matches: MatchSet) -> int:
    """Parameters a token reads: all of them, except the embedding rows it does not look up."""
    params = captured.param_count()
    embedding = token_embedding(captured)
    tied = any(h.tied for h in matches.lm_head)
    if embedding is not None and embedding.tensor is not None and not tied:
        params -= embedding.tensor.numel() - embedding.tensor.shape[-1]
    return params
