"""Anchored matchers for attention, FFN and LM-head subgraphs (they know nothing of the passes)."""

from __future__ import annotations

from ..capture import CapturedGraph
from .attention import match_attention
from .ffn import match_ffn
from .lm_head import match_lm_head
from .match import AttentionMatch, FFNMatch, LMHeadMatch, MatchSet, NearMiss, RopeInfo
from .walk import LinearInfo

__all__ = [
    "AttentionMatch", "FFNMatch", "LMHeadMatch", "LinearInfo", "MatchSet", "NearMiss", "RopeInfo",
    "match_all", "match_attention", "match_ffn", "match_lm_head",
]


def match_all(cg: CapturedGraph) -> MatchSet:
    """Run every matcher on one captured graph."""
    attention, a_miss = match_attention(cg)
    claimed = {n for m in attention for n in m.nodes}
    ffn, f_miss = match_ffn(cg, exclude=claimed)
    heads, h_miss = match_lm_head(cg)
    # A projection the FFN claimed as up/down cannot be the LM head, and vice versa.
    ffn_proj = {p.node for f in ffn for p in (f.up, f.gate, f.down) if p is not None}
    heads = [h for h in heads if h.linear.node not in ffn_proj]
    return MatchSet(attention=attention, ffn=ffn, lm_head=heads, near_misses=a_miss + f_miss + h_miss)
