"""Lossless speculative decoding with MTP drafts: draft ``depth`` tokens, verify them in one call, keep what the
model agrees with.

Every step feeds the model ``[last token, draft_1 .. draft_depth]`` in one call of the decode graph (which
returns logits and hidden states at every position, see :mod:`..passes.mtp_program`). Greedy: a row keeps the
longest prefix of drafts equal to the model's argmax, plus the model's own next token. Sampling: standard
speculative sampling (Leviathan et al., Chen et al.), accepting draft ``d`` with probability ``min(1, p(d)/q(d))``
and resampling a rejection from ``max(0, p - q)``, so the output distribution is the model's own.

Rows accept different lengths. All rows write the step's tokens into the same cache slots; a row's rejected slots
are masked out of attention (``key_valid``) and its positions keep counting its own tokens, so the holes cost
nothing but slots. When the slots run out, each row's valid slots are packed to the front. Programs whose
positions *are* the slots (hand-written models: ``slot_is_position``) cannot have holes; there every row accepts
the batch's shortest agreed prefix (still exact: a row that agreed further gets its next agreed token as its
own).

Greedy decoding may draft a tree instead of a chain (:mod:`.draft_tree`): the step feeds the root and every node,
each node attending to its ancestors only and placed at its depth, and a row keeps the path the model agrees with;
the other nodes' slots become holes like rejected drafts.

An adaptive :class:`~.gate.SpeculationGate` may make a step plain: no drafts, one token through the same decode
graph (a second static shape), which still returns the hidden state the next drafts start from.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import torch

from ..errors import ConfigError
from .draft_tree import DraftTree, accept_tree, path_tokens
from .emit import stream, stream_stats
from .gate import SpeculationGate
from .sampling import choose_next, draw, greedy, probabilities

if TYPE_CHECKING:
    from ..passes.mtp_heads import MTPHeads
    from .generate import Runtime

HOLE_SLOTS = 64
"""Cache slots beyond the tokens a batch generates, for rows that accepted fewer drafts than others."""


def speculation_slots(tree: DraftTree, batch: int) -> int:
    """Cache slots to add to prompt + new tokens: one drafted step beyond the end, and room for holes (rows that
    kept fewer drafts than others, or a tree's nodes off the kept path)."""
    return tree.size + 1 + (HOLE_SLOTS if batch > 1 or not tree.is_chain else 0)


def accept_greedy(drafts: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drafts ``[b, d]`` against the model's logits ``[b, d+1, vocab]``: how many each row keeps, and the model's
    own token after them."""
    target = greedy(logits)
    accepted = (drafts == target[:, :-1]).long().cumprod(1).sum(1)
    return accepted, target.gather(1, accepted[:, None]).squeeze(1)


def accept_sampled(drafts: torch.Tensor, draft_probs: torch.Tensor, logits: torch.Tensor,
                   sample: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative sampling: ``draft_probs [b, d, vocab]`` is the distribution each draft was sampled from."""
    p = probabilities(logits, temperature=sample["temperature"], top_k=sample["top_k"], top_p=sample["top_p"])
    generator = sample["generator"]
    batch, depth = drafts.shape
    pd = p[:, :-1].gather(-1, drafts[..., None]).squeeze(-1)
    qd = draft_probs.gather(-1, drafts[..., None]).squeeze(-1)
    u = torch.rand(batch, depth, generator=generator, device=drafts.device)
    accepted = (u * qd <= pd).long().cumprod(1).sum(1)
    rows = torch.arange(batch, device=drafts.device)
    p_at = p[rows, accepted]
    q_at = torch.cat([draft_probs, torch.zeros_like(draft_probs[:, :1])], 1)[rows, accepted]
    residual = (p_at - q_at).clamp_min(0)
    mass = residual.sum(-1, keepdim=True)
    residual = torch.where(mass > 0, residual / mass.clamp_min(1e-30), p_at)
    return accepted, draw(residual, generator)


class Speculation:
    """One ``generate`` call's speculative decoding: state, the loop, and acceptance statistics."""

    def __init__(self, runtime: Runtime, heads: MTPHeads, out: torch.Tensor, prompt: int, eos: set[int], pad: int,
                 sample: dict[str, Any], streamer: Any, gate: SpeculationGate | None = None,
                 tree: DraftTree | None = None):
        self.runtime, self.heads, self.out, self.prompt = runtime, heads, out, prompt
        self.tree = tree if tree is not None else DraftTree.chain(heads.depth)
        if not self.tree.is_chain and (sample["do_sample"] or runtime.program.slot_is_position):
            raise ConfigError("draft trees verify greedily in programs with a position per token; sampling and "
                              "models whose positions are their cache slots draft chains")
        self.eos, self.pad, self.sample, self.streamer = eos, pad, sample, streamer
        batch = out.shape[0]
        self.count = [0] * batch  # new tokens written per row
        self.done = [False] * batch
        self.accepted_at = [0] * heads.depth  # row-steps whose draft at each position was kept
        self.row_steps = 0
        self.row_tokens = 0
        self.plain_steps = 0  # steps the gate decoded plainly
        self.gate = gate if gate is not None else SpeculationGate("always")

    def stats(self) -> dict[str, Any]:
        """``mtp_acceptance`` (by draft position) and ``mtp_tokens_per_step`` (tau) over active rows' speculative
        steps; ``mtp_plain_steps``: steps the adaptive gate decoded without drafts; ``mtp_draft_nodes``: tokens
        drafted per speculative step (the depth for a chain)."""
        steps = max(self.row_steps, 1)
        tau = self.row_tokens / self.row_steps if self.row_steps else 1.0  # no speculative step: one token a step
        return {"mtp_acceptance": [round(a / steps, 4) for a in self.accepted_at],
                "mtp_tokens_per_step": round(tau, 4), "mtp_steps": self.row_steps,
                "mtp_plain_steps": self.plain_steps, "mtp_gate": self.gate.describe(),
                "mtp_draft_nodes": self.tree.size}

    def run(self, token: torch.Tensor, hidden: torch.Tensor, prompt_positions: torch.Tensor, key_valid: torch.Tensor,
            caches: list[torch.Tensor]) -> int:
        """Decode after the prefill chose ``token`` from ``hidden``; returns the new tokens of the longest row."""
        program = self.runtime.program
        depth, tree = self.heads.depth, self.tree
        offsets = torch.arange(tree.size + 1, device=token.device)
        node_depths = torch.tensor(tree.depths, device=token.device)
        ancestors, path_nodes = tree.ancestors(token.device), tree.path_nodes(token.device)
        step_mask = tree.step_mask(token.device)
        capacity = key_valid.shape[1]
        last_slot = self.out.shape[1] + depth - 2  # the last draft of the step that makes the last token
        if program.slot_is_position and program.max_positions is not None and last_slot >= program.max_positions:
            raise ConfigError(f"MTP drafts {depth} tokens beyond the end: leave {depth + 1} of the model's "
                              f"{program.max_positions} positions free (ask for fewer new tokens)")
        self._emit(token[:, None], torch.ones_like(token))
        pointer = self.prompt
        last_position = prompt_positions[:, -1]
        # Each slot's token position: sliding windows count tokens, not slots (a row's rejected slots are holes).
        slot_positions = torch.zeros_like(key_valid, dtype=torch.long)
        slot_positions[:, :self.prompt] = prompt_positions
        step = self.runtime.decode_step()
        sampling = self.sample["do_sample"]
        rows = torch.arange(token.shape[0], device=token.device)
        while not all(self.done):
            clock = time.perf_counter()
            speculate = self.gate.speculate()
            width = tree.size + 1 if speculate else 1
            if speculate:
                drafts, draft_probs = self._draft(hidden, token, sampling)
            else:
                drafts = token.new_zeros(token.shape[0], 0)
            if pointer + width > capacity:
                pointer = compact(key_valid, [*caches, slot_positions])
            slots = pointer + offsets[:width]
            key_valid[:, slots] = True
            positions = last_position[:, None] + 1 + node_depths[:width]
            if program.max_positions is not None:
                positions = positions.clamp_max(program.max_positions - 1)  # drafts past the end are never kept
            slot_positions[:, slots] = positions
            logits, states = self.runtime.run(step, torch.cat([token[:, None], drafts], 1), positions, slots,
                                              key_valid, caches, (positions, slot_positions),
                                              step_mask if speculate else None)[:2]
            active = torch.tensor([not d for d in self.done], device=key_valid.device)
            if speculate and step_mask is not None:
                accepted, token, last, in_path = accept_tree(tree, drafts, logits, ancestors)
                kept = path_tokens(drafts, token, last, accepted, path_nodes)
            else:
                if not speculate:
                    accepted, token = torch.zeros_like(token), choose_next(logits[:, 0], **self.sample)
                elif sampling:
                    accepted, token = accept_sampled(drafts, draft_probs, logits, self.sample)
                else:
                    accepted, token = accept_greedy(drafts, logits)
                if speculate and program.slot_is_position:
                    accepted, token = _shortest(accepted, token, drafts, active)
                last, in_path = accepted, offsets[None, :width] <= accepted[:, None]
                kept = torch.cat([drafts, token[:, None]], 1)
                kept[rows, accepted] = token
            key_valid[:, slots] = in_path & active[:, None]  # finished rows stop
            pointer += int(last[active].max()) + 1  # slots the furthest active row used
            last_position = last_position + accepted + 1
            hidden = states[rows, last]
            tau = float((accepted[active] + 1).float().mean()) if speculate else None  # only drafts keep tokens
            if speculate:
                self._record(accepted)
            else:
                self.plain_steps += 1
            self._emit(kept, accepted + 1)
            self.gate.observe(speculate, time.perf_counter() - clock, tau)
            stream_stats(self.streamer, self.stats)
        return max(self.count)

    def _draft(self, hidden: torch.Tensor, token: torch.Tensor, sampling: bool) -> tuple[torch.Tensor, Any]:
        if not sampling:  # inputs with standard strides: Dynamo guards on strides, even of size-1 dimensions
            out = self.runtime.draft_step(self.tree)(_dense(hidden), _dense(token))
            return (out if not self.tree.is_chain else out[0]), None
        s = self.sample
        chosen: list[torch.Tensor] = []

        def pick(logits: torch.Tensor) -> torch.Tensor:
            probs = probabilities(logits, temperature=s["temperature"], top_k=s["top_k"], top_p=s["top_p"])
            chosen.append(probs)
            return draw(probs, s["generator"])

        drafts, _ = self.heads.draft(hidden, token, pick)
        small = torch.stack(chosen, 1)  # [b, depth, draft vocab]
        full = torch.zeros(*small.shape[:2], self.heads.vocab, dtype=small.dtype, device=small.device)
        full[..., self.heads.draft_ids] = small
        return drafts, full

    def _record(self, accepted: torch.Tensor) -> None:
        for row, n in enumerate(accepted.tolist()):
            if self.done[row]:
                continue
            self.row_steps += 1
            self.row_tokens += n + 1
            for j in range(n):
                self.accepted_at[j] += 1

    def _emit(self, tokens: torch.Tensor, counts: torch.Tensor) -> None:
        """Write each row's new tokens (up to its budget and its end-of-sequence token) and stream them."""
        budget = self.out.shape[1] - self.prompt
        streamed: list[list[int]] = []
        for row, (values, n) in enumerate(zip(tokens.tolist(), counts.tolist())):
            take = [] if self.done[row] else values[:min(n, budget - self.count[row])]
            for i, t in enumerate(take):
                if t in self.eos:
                    take = take[:i + 1]
                    self.done[row] = True
                    break
            start = self.prompt + self.count[row]
            if take:
                self.out[row, start:start + len(take)] = torch.tensor(take, device=self.out.device)
            self.count[row] += len(take)
            self.done[row] = self.done[row] or self.count[row] >= budget
            streamed.append(take)
        if self.streamer is not None:
            width = max(len(t) for t in streamed)
            for i in range(width):
                stream(self.streamer, torch.tensor([t[i] if i < len(t) else self.pad for t in streamed]))


def _dense(t: torch.Tensor) -> torch.Tensor:
    """``t`` with the strides a fresh tensor of its shape has (a row picked from a wider tensor keeps its own)."""
    return t if t.stride() == torch.empty(t.shape, device="meta").stride() else t.clone(
        memory_format=torch.contiguous_format)


def _shortest(accepted: torch.Tensor, token: torch.Tensor, drafts: torch.Tensor,
              active: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every row keeps the shortest prefix any active row kept; a row that kept more takes its next kept draft
    as its token (the model agreed with it). The loop runs only while some row is active."""
    common = int(accepted[active].min())
    longer = accepted > common
    next_draft = drafts[:, min(common, drafts.shape[1] - 1)]
    return torch.full_like(accepted, common), torch.where(longer, next_draft, token)


def compact(key_valid: torch.Tensor, caches: list[torch.Tensor]) -> int:
    """Pack each row's valid cache slots to the front, in order; returns the first free slot for all rows."""
    order = torch.argsort((~key_valid).to(torch.int8), dim=1, stable=True)
    for cache in caches:
        dim = 2 if cache.dim() == 4 else 1
        shape = [order.shape[0]] + [1] * (cache.dim() - 1)
        shape[dim] = order.shape[1]
        index = order.reshape(shape).expand_as(cache)
        cache.copy_(cache.gather(dim, index))
    counts = key_valid.sum(1)
    key_valid.copy_(torch.arange(key_valid.shape[1], device=key_valid.device)[None] < counts[:, None])
    return int(counts.max())
