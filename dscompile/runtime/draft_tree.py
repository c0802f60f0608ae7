"""Draft trees: several drafted continuations verified in one call, the longest the model agrees with kept.

A chain of ``depth`` drafts is kept only as far as every draft is the model's choice; on SmolLM2 the heads' first
draft is the model's next token half the time, but their second or third choice is, another 14% of the time. A
tree drafts those alternatives too: node ``j`` is the ``rank``-th most likely token of head ``depth(j)`` after its
parent's token (the root is the step's last known token). One verification call scores every node, each attending
only to its ancestors, and greedy acceptance walks from the root down the child equal to the model's argmax.

A tree of ``n`` nodes is chosen from each head's rank distribution (how often the model's token is the head's
``r``-th choice, measured by :func:`dscompile.train_mtp` on held-out text): the ``n`` paths of highest estimated
probability, each path's probability the product of its ranks' shares. The chain is the tree whose every node has
rank 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .sampling import greedy

DEFAULT_RANK_SHARES = (0.5, 0.1, 0.06, 0.04, 0.03, 0.02, 0.015, 0.01)
"""Rank shares assumed for heads without measured ones (heads saved before the measurement, untrained heads): close
to what trained SmolLM2 heads measure on held-out text (0.53, 0.11, 0.06, 0.03, ... for the first head). Only their
order matters to :meth:`DraftTree.best`."""


@dataclass(frozen=True)
class DraftTree:
    """Nodes ``1..n`` (node 0 is the root), each after its parent: each node's parent and its rank among its
    parent's children (0: the head's first choice)."""

    parents: tuple[int, ...]
    ranks: tuple[int, ...]
    depths: tuple[int, ...] = field(init=False, compare=False, repr=False)
    """Depth of every node, the root's (0) first."""

    def __post_init__(self) -> None:
        if len(self.parents) != len(self.ranks) or not self.parents:
            raise ValueError("a draft tree needs one parent and one rank per node, and at least one node")
        depths = [0]
        for j, p in enumerate(self.parents, start=1):
            if not 0 <= p < j:
                raise ValueError(f"node {j}: its parent {p} must come before it")
            depths.append(depths[p] + 1)
        object.__setattr__(self, "depths", tuple(depths))  # frozen: set once here (drafting compiles, so no lock)
        seen = set(zip(self.parents, self.ranks))
        if len(seen) != len(self.parents):
            raise ValueError("two nodes share a parent and a rank")

    @classmethod
    def chain(cls, depth: int) -> DraftTree:
        return cls(tuple(range(depth)), (0,) * depth)

    @classmethod
    def best(cls, shares: list[list[float]] | tuple[tuple[float, ...], ...], nodes: int) -> DraftTree:
        """The ``nodes`` most probable paths, at most ``len(shares)`` deep: ``shares[d][r]`` is how often head
        ``d``'s ``r``-th choice is the model's token. Ties keep the shallower, lower-ranked path (the chain first)."""
        depth = len(shares)
        chosen: list[tuple[int, ...]] = []
        frontier = {(r,): float(shares[0][r]) for r in range(len(shares[0]))}
        while len(chosen) < nodes and frontier:
            path = max(frontier, key=lambda p: (frontier[p], -len(p), [-r for r in p]))
            probability = frontier.pop(path)
            chosen.append(path)
            if len(path) < depth:
                frontier.update({(*path, r): probability * float(shares[len(path)][r])
                                 for r in range(len(shares[len(path)]))})
        chosen.sort(key=lambda p: (len(p), p))  # parents before children, by depth
        index = {p: j for j, p in enumerate(chosen, start=1)}
        return cls(tuple(index.get(p[:-1], 0) for p in chosen), tuple(p[-1] for p in chosen))

    @property
    def size(self) -> int:
        """Drafted tokens per step (the verification scores these plus the root)."""
        return len(self.parents)

    @property
    def depth(self) -> int:
        return max(self.depths)

    @property
    def is_chain(self) -> bool:
        return self.parents == tuple(range(self.size)) and not any(self.ranks)

    def levels(self) -> list[list[int]]:
        """Nodes by depth: ``levels()[d]`` holds the nodes at depth ``d + 1``."""
        return [[j for j in range(1, self.size + 1) if self.depths[j] == d] for d in range(1, self.depth + 1)]

    def ancestors(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """``[size + 1, size + 1]`` bool: ``[j, i]`` when node ``i`` is ``j`` or an ancestor of ``j`` (what ``j``
        attends to within the step)."""
        out = torch.eye(self.size + 1, dtype=torch.bool)
        for j, p in enumerate(self.parents, start=1):
            out[j] |= out[p]
        return out.to(device)

    def step_mask(self, device: torch.device | str = "cpu") -> torch.Tensor | None:
        """What the verification's attention bias needs beyond causality: :meth:`ancestors` for a tree, None for a
        chain (whose nodes see their ancestors by causality)."""
        return None if self.is_chain else self.ancestors(device)

    def path_nodes(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """``[size + 1, depth + 1]``: node ``j``'s ancestor at every depth (``j`` itself below its own depth)."""
        anc = self.ancestors()
        out = torch.zeros(self.size + 1, self.depth + 1, dtype=torch.long)
        for j in range(self.size + 1):
            for i in range(self.size + 1):
                if anc[j, i]:
                    out[j, self.depths[i]] = i
            out[j, self.depths[j] + 1:] = j
        return out.to(device)


def accept_tree(tree: DraftTree, drafts: torch.Tensor, logits: torch.Tensor,
                ancestors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Greedy acceptance of ``drafts [b, size]`` against the model's ``logits [b, size + 1, vocab]`` (the root
    first): per row the number of drafts kept, the model's own next token, the last kept node, and which of the
    step's ``size + 1`` slots hold the kept path. A node is kept when its parent is and its token is the model's
    argmax after its parent; the path kept is the deepest kept node's (the first of them, should drafted siblings
    coincide)."""
    target = greedy(logits)
    kept = _kept(tree, drafts == target[:, list(tree.parents)])
    depths = torch.tensor(tree.depths, device=drafts.device)
    last = (kept * (depths + 1)).argmax(1)  # the deepest kept node
    accepted = depths[last]
    slots = ancestors[last] & kept
    return accepted, target.gather(1, last[:, None]).squeeze(1), last, slots


def path_tokens(drafts: torch.Tensor, token: torch.Tensor, last: torch.Tensor, accepted: torch.Tensor,
                path_nodes: torch.Tensor) -> torch.Tensor:
    """``[b, depth + 1]``: each row's kept drafts in order, then the model's own token (what the step emits)."""
    rows = torch.arange(drafts.shape[0], device=drafts.device)
    nodes = path_nodes[last][:, 1:]  # the kept path's nodes at depths 1..depth
    out = torch.cat([drafts.gather(1, (nodes - 1).clamp_min(0)), token[:, None]], 1)
    out[rows, accepted] = token
    return out


def tree_tokens_per_step(tree: DraftTree, ranks: torch.Tensor) -> float:
    """The tokens a step of greedy verification keeps with ``tree``, averaged over positions whose draft ranks
    ``[positions, depth]`` were measured (teacher-forced: a node's rank is the one its head gives the model's token
    after the model's own earlier tokens, which is what the head sees whenever its ancestors are kept)."""
    depths = torch.tensor(tree.depths, device=ranks.device)
    kept = _kept(tree, ranks[:, depths[1:] - 1] == torch.tensor(tree.ranks, device=ranks.device))
    return 1.0 + float((kept * depths).amax(1).float().mean())


def _kept(tree: DraftTree, agrees: torch.Tensor) -> torch.Tensor:
    """``[b, size + 1]``: the nodes kept, the root always, node ``j`` when its parent is and ``agrees[:, j - 1]``."""
    kept = torch.ones(agrees.shape[0], tree.size + 1, dtype=torch.bool, device=agrees.device)
    for j, parent in enumerate(tree.parents, start=1):
        kept[:, j] = kept[:, parent] & agrees[:, j - 1]
    return kept
