"""Decoupled RoPE for MLA's ``absorb`` mode: each layer keeps a few rotary dimensions, the rest lose their rotation.

A latent can be absorbed into the query (``q . U_k c = (U_k^T q) . c``) only where keys are not rotated by their
position. DeepSeek-V2 therefore splits each key into a RoPE-free part (from the latent, absorbed at decode) and a
small rotary part cached as it is. For a model trained with RoPE on every dimension (MHA2MLA's partial RoPE), a
layer keeps rotary the frequency pairs whose scores would move most without their rotation: the product of the
query's and the key's root-mean-square norm in the pair (MHA2MLA's 2-norm score, from calibration statistics),
times how far that pair turns over the distances of a calibration window. Norms alone favour low-frequency pairs,
which barely turn within a context and lose little when unrotated (on SmolLM2, keeping half the dims: +95%
perplexity by norms alone, +2.6% with the turn factor). The other pairs are left unrotated in queries and keys
alike, which changes the model; models without RoPE keep every dimension RoPE-free and absorb exactly.
"""

from __future__ import annotations

import torch
from torch.fx import Graph, Node

from ..patterns import AttentionMatch, ops

ROTATING_STYLES = ("rotate_half", "interleaved")
"""RoPE spellings the pass can leave partly unrotated (Meta's complex form has no per-dimension add to edit)."""
DISTANCE = 512
"""Query-key distances over which the cost of unrotating a pair is averaged (a calibration window)."""


def pair_dims(style: str, rotary_dim: int, pair: int) -> tuple[int, int]:
    """The two dimensions of a head that rotate together in frequency pair ``pair``."""
    if style == "interleaved":
        return 2 * pair, 2 * pair + 1
    return pair, pair + rotary_dim // 2


def default_rope_dims(attn: AttentionMatch, kv_ratio: float) -> int:
    """Half the layer's rotary dims, or fewer where their cached keys would take over half of the layer's share
    of the KV budget (the latent keeps the rest)."""
    if attn.rope is None:
        return 0
    share = kv_ratio * attn.kv_width / 2 / attn.n_kv_heads
    return 2 * max(0, min(attn.rope.rotary_dim // 4, int(share) // 2))


def rope_reason(attn: AttentionMatch, rope_dims: int | None) -> str | None:
    """Why ``attn`` cannot keep ``rope_dims`` rotary dims per head in absorb mode, or None if it can (``rope_dims``
    None stands for the default)."""
    if attn.qk_norm:
        return "queries and keys are normalised per head (keys are not linear in a latent)"
    if attn.rope is None:
        return None
    if attn.rope.style not in ROTATING_STYLES:
        return f"{attn.rope.style} RoPE (absorb mode edits rotate_half and interleaved RoPE)"
    if rope_dims is not None and rope_dims > attn.rope.rotary_dim:
        return f"{rope_dims} rotary dims do not fit its rotary width {attn.rope.rotary_dim}"
    return None


def choose_rope_dims(attn: AttentionMatch, covariance: torch.Tensor | None, rope_dims: int) -> tuple[int, ...]:
    """The ``rope_dims`` dimensions of each head (sorted) that stay rotary: the frequency pairs with the largest
    query norm x key norm x mean turn (``covariance`` of the projection input gives the norms; the weights alone
    without it). Empty for a layer without RoPE."""
    if attn.rope is None or rope_dims == 0:
        return ()
    rotary, d = attn.rope.rotary_dim, attn.head_dim
    q_w, k_w = attn.q.weight.tensor, attn.k.weight.tensor
    assert q_w is not None and k_w is not None, "absorb mode needs the projection weights"
    cov = covariance if covariance is not None and attn.q.input is attn.k.input else None

    def head_pair_energy(weight: torch.Tensor, heads: int) -> torch.Tensor:
        w = weight.detach().to(torch.float64).view(heads, d, -1)
        rows = (w @ cov.to(torch.float64) * w).sum(-1) if cov is not None else (w * w).sum(-1)  # [heads, d]
        return torch.stack([rows[:, list(pair_dims(attn.rope.style, rotary, p))].sum(-1)  # type: ignore[union-attr]
                            for p in range(rotary // 2)], -1)  # [heads, pairs]

    q_energy = head_pair_energy(q_w, attn.n_heads).view(attn.n_kv_heads, -1, rotary // 2)
    k_energy = head_pair_energy(k_w, attn.n_kv_heads).unsqueeze(1)
    score = (q_energy.sqrt() * k_energy.sqrt()).sum((0, 1)) * _rotation_effect(attn.rope.base, rotary)
    pairs = score.topk(rope_dims // 2).indices.tolist()
    return tuple(sorted(dim for p in pairs for dim in pair_dims(attn.rope.style, rotary, p)))


def _rotation_effect(base: float | None, rotary: int, distance: int = DISTANCE) -> torch.Tensor:
    """Per pair, the mean of ``|R(theta * t) - I| = 2 |sin(theta * t / 2)|`` over distances ``t`` up to
    ``distance``: how much a score moves when that pair loses its rotation. A low-frequency pair barely turns
    within a context, so unrotating it costs little however large its norms (ones when the base is unknown)."""
    if base is None:
        return torch.ones(rotary // 2, dtype=torch.float64)
    theta = base ** (-torch.arange(0, rotary, 2, dtype=torch.float64) / rotary)
    t = torch.arange(1, distance + 1, dtype=torch.float64)
    return (2 * torch.sin(theta[:, None] * t / 2).abs()).mean(-1)


def keep_rotary(graph: Graph, start: Node, projection: Node, dims: tuple[int, ...], rotary_dim: int,
                register: object) -> bool:
    """Leave every rotary dimension outside ``dims`` unrotated on the path from ``projection`` to ``start``:
    the RoPE sum ``x*cos + rot(x)*sin`` there becomes ``where(keep, sum, x)``. ``register(name, tensor)`` adds
    the mask to the graph's module and returns its node. False when no RoPE sum is on the path."""
    found = rope_sum(start, projection)
    if found is None:
        return False
    rotated, plain = found
    keep = torch.zeros(rotary_dim, dtype=torch.bool)
    keep[list(dims)] = True
    with graph.inserting_after(rotated):
        mask = register(keep)  # type: ignore[operator]
    with graph.inserting_after(mask):
        partial = graph.call_function(torch.ops.aten.where.self, (mask, rotated, plain))
    rotated.replace_all_uses_with(partial, delete_user_cb=lambda user: user is not partial)
    if "val" in rotated.meta:
        partial.meta["val"] = rotated.meta["val"]
    return True


def rope_sum(start: Node, projection: Node, limit: int = 256) -> tuple[Node, Node] | None:
    """The ``x*cos + rot(x)*sin`` add between ``projection`` and ``start``, and its unrotated ``x``."""
    frontier, seen = [start], set()
    while frontier and len(seen) < limit:
        node = frontier.pop(0)
        if node in seen:
            continue
        seen.add(node)
        plain = _unrotated(node, projection)
        if plain is not None:
            return node, plain
        frontier.extend(node.all_input_nodes)
    return None


def _unrotated(node: Node, projection: Node) -> Node | None:
    if ops.op_class(node) != ops.ADD or not all(ops.is_op(a, ops.MUL) for a in node.args[:2]):
        return None
    operands = [a for mul in node.args[:2] for a in mul.args[:2] if isinstance(a, Node)]  # type: ignore[union-attr]
    on_path = [a for a in operands if reaches(a, projection)]
    for candidate in on_path:
        if all(other is candidate or reaches(other, candidate) for other in on_path):
            return candidate
    return None


def reaches(target: object, source: Node, limit: int | None = 64) -> bool:
    """Whether ``target`` is computed from ``source``, looking at most ``limit`` nodes back (None: no limit)."""
    frontier, seen = ([target] if isinstance(target, Node) else []), set()
    while frontier and (limit is None or len(seen) < limit):
        node = frontier.pop()
        if node is source:
            return True
        if node not in seen:
            seen.add(node)
            frontier.extend(node.all_input_nodes)
    return False
