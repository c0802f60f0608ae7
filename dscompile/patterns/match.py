"""Typed results of the matchers: what was found, where, with which weights and properties."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch.fx import Node

from .walk import LinearInfo


@dataclass
class RopeInfo:
    """Rotary position embedding applied to queries and keys."""

    style: str  # "rotate_half", "interleaved" or "complex"
    rotary_dim: int
    base: float | None

    def to_dict(self) -> dict[str, Any]:
        return {"style": self.style, "rotary_dim": self.rotary_dim, "base": self.base}


@dataclass
class AttentionMatch:
    """One attention block: projections, head layout, positions and masking."""

    layer: str
    kind: str  # "sdpa" or "eager"
    anchor: Node  # the SDPA node, or the probs @ V matmul of the eager form
    q: LinearInfo
    k: LinearInfo
    v: LinearInfo
    o: LinearInfo | None
    n_heads: int
    n_kv_heads: int
    head_dim: int
    v_head_dim: int
    fused_qkv: bool
    rope: RopeInfo | None
    qk_norm: bool
    causal: bool | None
    window: int | None
    scale: float | None
    mask: Node | None = None
    nodes: list[Node] = field(default_factory=list)

    @property
    def kv_width(self) -> int:
        """Values per token the cache holds for this layer (keys plus values, all KV heads)."""
        return self.n_kv_heads * (self.head_dim + self.v_head_dim)

    @property
    def gqa(self) -> bool:
        return self.n_kv_heads < self.n_heads

    def to_dict(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "kind": self.kind,
            "q": self.q.to_dict(),
            "k": self.k.to_dict(),
            "v": self.v.to_dict(),
            "o": self.o.to_dict() if self.o else None,
            "n_heads": self.n_heads,
            "n_kv_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "v_head_dim": self.v_head_dim,
            "fused_qkv": self.fused_qkv,
            "rope": self.rope.to_dict() if self.rope else None,
            "qk_norm": self.qk_norm,
            "causal": self.causal,
            "window": self.window,
            "scale": self.scale,
            "nodes": [n.name for n in self.nodes],
        }


@dataclass
class FFNMatch:
    """One feed-forward block: ``down(act(gate(x)) * up(x))`` or ``down(act(up(x)))``."""

    layer: str
    activation: str  # "silu", "gelu", "gelu_tanh", "relu", ...
    gated: bool
    up: LinearInfo
    gate: LinearInfo | None
    down: LinearInfo
    fused_gate_up: bool
    hidden_size: int
    intermediate_size: int
    anchor: Node
    nodes: list[Node] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "activation": self.activation,
            "gated": self.gated,
            "up": self.up.to_dict(),
            "gate": self.gate.to_dict() if self.gate else None,
            "down": self.down.to_dict(),
            "fused_gate_up": self.fused_gate_up,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "nodes": [n.name for n in self.nodes],
        }


@dataclass
class LMHeadMatch:
    """The final vocabulary projection."""

    layer: str
    linear: LinearInfo
    vocab_size: int
    hidden_size: int
    tied: bool
    tied_to: str | None
    sliced: bool  # logits computed for a slice of positions (``logits_to_keep``)
    softcap: bool
    nodes: list[Node] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "linear": self.linear.to_dict(),
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "tied": self.tied,
            "tied_to": self.tied_to,
            "sliced": self.sliced,
            "softcap": self.softcap,
            "nodes": [n.name for n in self.nodes],
        }


@dataclass
class NearMiss:
    """An anchor that looked like a pattern but did not match, and why."""

    kind: str  # "attention", "ffn" or "lm_head"
    node: str
    layer: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {"kind": self.kind, "node": self.node, "layer": self.layer, "reason": self.reason}


@dataclass
class MatchSet:
    """Everything the matchers found in one or more graphs."""

    attention: list[AttentionMatch] = field(default_factory=list)
    ffn: list[FFNMatch] = field(default_factory=list)
    lm_head: list[LMHeadMatch] = field(default_factory=list)
    near_misses: list[NearMiss] = field(default_factory=list)

    def extend(self, other: MatchSet) -> None:
        self.attention += other.attention
        self.ffn += other.ffn
        self.lm_head += other.lm_head
        self.near_misses += other.near_misses

    @property
    def empty(self) -> bool:
        return not (self.attention or self.ffn or self.lm_head)

    def counts(self) -> dict[str, int]:
        return {"attention": len(self.attention), "ffn": len(self.ffn), "lm_head": len(self.lm_head)}

    def layers(self) -> list[str]:
        return [m.layer for m in self.attention] + [m.layer for m in self.ffn] + [m.layer for m in self.lm_head]

    def to_dict(self) -> dict[str, Any]:
        return {
            "counts": self.counts(),
            "attention": [m.to_dict() for m in self.attention],
            "ffn": [m.to_dict() for m in self.ffn],
            "lm_head": [m.to_dict() for m in self.lm_head],
            "near_misses": [m.to_dict() for m in self.near_misses],
        }

    def table(self) -> str:
        """A per-layer table of matches and near-misses, for people."""
        rows = [("kind", "layer", "details")]
        for a in self.attention:
            rope = f"rope={a.rope.style}/{a.rope.rotary_dim}/base={a.rope.base}" if a.rope else "no-rope"
            window = f" window={a.window}" if a.window else ""
            rows.append((
                "attention", a.layer,
                f"{a.kind} heads={a.n_heads} kv_heads={a.n_kv_heads} head_dim={a.head_dim}"
                f"{' fused-qkv' if a.fused_qkv else ''}{' qk-norm' if a.qk_norm else ''} {rope}"
                f" causal={a.causal}{window}",
            ))
        for f in self.ffn:
            rows.append((
                "ffn", f.layer,
                f"{'gated ' if f.gated else ''}{f.activation} {f.hidden_size}->{f.intermediate_size}"
                f"{' fused-gate-up' if f.fused_gate_up else ''}",
            ))
        for h in self.lm_head:
            rows.append((
                "lm_head", h.layer,
                f"vocab={h.vocab_size} hidden={h.hidden_size}{' tied' if h.tied else ''}"
                f"{' sliced' if h.sliced else ''}{' softcap' if h.softcap else ''}",
            ))
        for m in self.near_misses:
            rows.append((f"miss:{m.kind}", m.layer or m.node, m.reason))
        width = [max(len(r[i]) for r in rows) for i in range(2)]
        return "\n".join(f"{r[0]:<{width[0]}}  {r[1]:<{width[1]}}  {r[2]}" for r in rows)

    def __str__(self) -> str:
        c = self.counts()
        return (
            f"MatchSet(attention={c['attention']}, ffn={c['ffn']}, lm_head={c['lm_head']}, "
            f"near_misses={len(self.near_misses)})"
        )
