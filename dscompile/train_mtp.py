"""Training the MTP heads by self-distillation, the model frozen: the heads learn to predict what the model itself
will predict one, two, ... tokens later.

Drafts are judged at decode time against the model's own greedy continuations, so that is what the heads train on:
prompts cut from the user's data are continued by the model (greedy, batched, in the runtime), and the model's
hidden states and choices over those sequences are computed once. Each head ``k`` is then trained with
cross-entropy against the model's choice at position ``i + k + 1`` over the draft vocabulary (the tokens the model
chose most often), a weight per depth.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from .data import token_batches
from .errors import ConfigError
from .log import progress_bar
from .passes.kv_cache import build_cached_program
from .passes.mtp_heads import MTPHeads
from .passes.mtp_program import expose_hidden
from .runtime.draft_tree import tree_tokens_per_step
from .runtime.generate import prefill_outputs

if TYPE_CHECKING:
    from .api import OptimizedModel

log = logging.getLogger("dscompile")

PROMPTS = 2048
"""Prompts continued for training by default: 262,144 generated tokens, about 11 minutes of a 40-minute budget on 2
CPU cores. Against 1,024 prompts (and 2,339 steps instead of 1,746), SmolLM2's heads kept 2.05 instead of 1.92
tokens a step at depth 3 on held-out text (2.27 instead of 2.14 with the default tree): with half the text they had
learnt it by heart (their first choice was right on 94% of their training prompts, 50% of new ones)."""
PROMPT_TOKENS = 32
NEW_TOKENS = 96
GENERATE_BATCH = 16
TRAIN_BATCH = 16
HOLDOUT = 0.1
RANKS = 8  # draft ranks measured for draft trees


@dataclass
class MTPTrainReport:
    """What training did, and how often the heads agree with the model on held-out generated sequences."""

    steps: int
    seconds: float
    generation_seconds: float
    tokens: int
    draft_coverage: float  # share of the model's choices inside the draft vocabulary
    acceptance: list[float] = field(default_factory=list)  # chain agreement by depth, held-out (teacher-forced)
    rank_shares: list[list[float]] = field(default_factory=list)  # by depth: how often the model's token is rank r
    tree_tokens_per_step: float = 1.0  # what the heads' draft tree keeps a step on the same held-out sequences
    losses: list[float] = field(default_factory=list)

    @property
    def tokens_per_step(self) -> float:
        """The tau that greedy speculative decoding would reach on the held-out sequences: 1 + sum of the chained
        acceptances."""
        return 1.0 + sum(self.acceptance)

    def to_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "seconds": round(self.seconds, 1),
                "generation_seconds": round(self.generation_seconds, 1), "tokens": self.tokens,
                "draft_coverage": round(self.draft_coverage, 4), "acceptance": [round(a, 4) for a in self.acceptance],
                "tokens_per_step": round(self.tokens_per_step, 4),
                "rank_shares": [[round(x, 4) for x in d] for d in self.rank_shares],
                "tree_tokens_per_step": round(self.tree_tokens_per_step, 4),
                "final_loss": round(self.losses[-1], 4) if self.losses else None}


def train_mtp(optimized: OptimizedModel, data: Any, tokenizer: Any = None, *, max_minutes: float = 40.0,
              steps: int | None = None, lr: float = 2e-3, loss_weights: Sequence[float] | None = None,
              feature_weight: float = 1.0,
              prompts: int = PROMPTS, prompt_tokens: int = PROMPT_TOKENS, new_tokens: int = NEW_TOKENS,
              progress: bool = True) -> MTPTrainReport:
    """Train ``optimized``'s MTP heads on the model's own continuations of prompts cut from ``data``.

    ``data`` is token ids (a LongTensor or a list) or texts with ``tokenizer``: up to ``prompts`` prompts of
    ``prompt_tokens`` tokens are cut from it and continued by ``new_tokens`` greedy tokens. ``max_minutes`` bounds
    the whole call, generation included (or ``steps`` bounds training). ``loss_weights`` weighs the depths
    (DeepSeek-V3 weighted all depths alike, 0.3 then 0.1 against the main loss; here the model is frozen, so
    only their ratio matters). ``feature_weight`` adds EAGLE's feature loss: each head's output is also pulled
    towards the hidden state the model's LM head reads at the predicted position, a dense target that a single
    token label is not. The heads are trained in place; save them with ``optimized.save_mtp(path)``.
    """
    heads = optimized.mtp_heads()
    weights = list(loss_weights) if loss_weights is not None else [1.0] * heads.depth
    if len(weights) != heads.depth or any(w < 0 for w in weights) or not sum(weights) > 0:
        raise ConfigError(f"loss_weights needs {heads.depth} non-negative weights (one per depth), got {weights}")
    if max_minutes <= 0 or lr <= 0 or feature_weight < 0 or prompts < 2 or prompt_tokens < 1 \
            or new_tokens < heads.depth + 1:
        raise ConfigError("max_minutes and lr must be positive, feature_weight non-negative, prompts at least 2, "
                          f"prompt_tokens at least 1 and new_tokens at least depth + 1 ({heads.depth + 1})")
    cut = _prompts(token_batches(data, tokenizer), prompts, prompt_tokens)
    start = time.perf_counter()
    sequences = _continue(optimized, cut, new_tokens, progress)
    generation_s = time.perf_counter() - start
    hidden, choices = _teacher(optimized, sequences)
    counts = torch.bincount(choices.reshape(-1), minlength=heads.vocab)
    heads.set_draft_vocab(counts.argsort(descending=True)[:min(heads.config.draft_vocab, heads.vocab)])
    coverage = float(counts[heads.draft_ids].sum() / counts.sum())
    held = max(1, int(len(sequences) * HOLDOUT))
    report = MTPTrainReport(0, 0.0, generation_s, sequences.numel(), coverage)
    if not heads.trained:
        heads.match_output_scale(hidden[held:])
    budget = max_minutes * 60 - (time.perf_counter() - start)
    _fit(heads, sequences[held:], hidden[held:], choices[held:], weights, feature_weight, lr, budget, steps, report,
         progress)
    report.acceptance, ranks = held_out_drafts(heads, sequences[:held], hidden[:held], choices[:held],
                                               prompt_tokens - 1)
    report.rank_shares = heads.rank_shares = rank_shares(ranks)
    report.tree_tokens_per_step = tree_tokens_per_step(heads.tree(), ranks)
    heads.trained = True
    optimized.runtime().reset_compiled()  # the compiled draft step read the old draft vocabulary
    report.seconds = time.perf_counter() - start
    log.info("train_mtp: %d steps in %.0f s (%.0f s generating %d tokens), draft coverage %.3f, held-out acceptance "
             "%s, tau %.2f", report.steps, report.seconds, generation_s, report.tokens, coverage,
             [round(a, 3) for a in report.acceptance], report.tokens_per_step)
    return report


@torch.no_grad()
def measure_mtp(optimized: OptimizedModel, data: Any, tokenizer: Any = None, *, prompts: int = 128,
                prompt_tokens: int = PROMPT_TOKENS, new_tokens: int = NEW_TOKENS, progress: bool = True
                ) -> dict[str, Any]:
    """Measure ``optimized``'s MTP heads on the model's own continuations of prompts cut from ``data`` (as
    :func:`train_mtp` does on its held-out part): the chained acceptance by depth, the expected tokens per step, and
    the rank shares that shape the draft tree, which the heads then keep (saved by ``save_mtp``), that tree and the
    tokens per step it keeps there, and ``ranks`` (:func:`draft_ranks`) to judge other trees by. For heads trained
    on other text than the prompts you serve, or saved before rank shares were measured."""
    heads = optimized.mtp_heads()
    if prompts < 2 or prompt_tokens < 1 or new_tokens < heads.depth + 1:
        raise ConfigError(f"prompts must be at least 2, prompt_tokens at least 1 and new_tokens at least depth + 1 "
                          f"({heads.depth + 1})")
    sequences = _continue(optimized, _prompts(token_batches(data, tokenizer), prompts, prompt_tokens), new_tokens,
                          progress)
    hidden, choices = _teacher(optimized, sequences)
    acceptance, ranks = held_out_drafts(heads, sequences, hidden, choices, prompt_tokens - 1)
    heads.rank_shares = rank_shares(ranks)
    optimized.runtime().reset_compiled()  # the tree may have changed
    tree = heads.tree()
    return {"acceptance": acceptance, "tokens_per_step": 1.0 + sum(acceptance), "rank_shares": heads.rank_shares,
            "tree": tree, "tree_tokens_per_step": tree_tokens_per_step(tree, ranks), "ranks": ranks}


def _prompts(batches: list[torch.Tensor], count: int, length: int) -> torch.Tensor:
    """Up to ``count`` prompts of ``length`` tokens, spread evenly over the data."""
    cuts = [row[i:i + length] for batch in batches for row in batch for i in range(0, row.numel() - length + 1, length)]
    if len(cuts) < 2:
        raise ConfigError(f"train_mtp needs data for at least 2 prompts of {length} tokens; got "
                          f"{sum(b.numel() for b in batches)} tokens")
    if len(cuts) <= count:
        return torch.stack(cuts)
    picks = torch.linspace(0, len(cuts) - 1, count).round().long().tolist()  # even over all the data, not its start
    return torch.stack([cuts[i] for i in picks])


def _continue(optimized: OptimizedModel, prompts: torch.Tensor, new_tokens: int, progress: bool) -> torch.Tensor:
    """The model's greedy continuations of ``prompts``, batched, in the runtime without drafting."""
    runtime = optimized.runtime()
    drafter, runtime.drafter = runtime.drafter, None
    chunks = []
    try:
        bar = progress_bar(progress, math.ceil(len(prompts) / GENERATE_BATCH), "generating MTP training text")
        for i in range(0, len(prompts), GENERATE_BATCH):
            batch = prompts[i:i + GENERATE_BATCH]
            out = runtime.generate(batch, max_new_tokens=new_tokens, eos_token_id=[])
            chunks.append(out)
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
    finally:
        runtime.drafter = drafter
    return torch.cat(chunks)


@torch.no_grad()
def _teacher(optimized: OptimizedModel, sequences: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's hidden states ``[n, t, hidden]`` (fp32) and choices ``[n, t]`` over ``sequences``."""
    program = build_cached_program(optimized.original, logits="all")
    optimized.apply_plans(program)
    expose_hidden(program)
    hidden, choices = [], []
    for i in range(0, len(sequences), TRAIN_BATCH):
        logits, states = prefill_outputs(program, sequences[i:i + TRAIN_BATCH])[:2]
        choices.append(logits.argmax(-1))
        hidden.append(states.float())
    return torch.cat(hidden), torch.cat(choices)


def _targets(heads: MTPHeads, choices: torch.Tensor) -> torch.Tensor:
    """The model's choices as draft-vocabulary indices, -100 (ignored) where the draft vocabulary lacks them."""
    index = torch.full((heads.vocab,), -100, dtype=torch.long)
    index[heads.draft_ids.cpu()] = torch.arange(heads.draft_ids.numel())
    return index[choices]


def _losses(heads: MTPHeads, tokens: torch.Tensor, hidden: torch.Tensor, targets: torch.Tensor,
            feature_weight: float) -> list[torch.Tensor]:
    """Per depth: cross-entropy against the model's choice, plus (EAGLE's feature loss) ``feature_weight`` times
    the smooth-L1 distance to the hidden state the model's LM head reads there."""
    out = []
    for k, (features, logits) in enumerate(heads.chain(hidden, tokens)):
        n = logits.shape[1]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets[:, k + 1:k + 1 + n].reshape(-1),
                               ignore_index=-100)
        if feature_weight:
            loss = loss + feature_weight * F.smooth_l1_loss(features, hidden[:, k + 1:k + 1 + n])
        out.append(loss)
    return out


def _fit(heads: MTPHeads, tokens: torch.Tensor, hidden: torch.Tensor, choices: torch.Tensor, weights: list[float],
         feature_weight: float, lr: float, budget_s: float, steps: int | None, report: MTPTrainReport,
         progress: bool) -> None:
    """Adam with a cosine schedule over the time budget (or the step count)."""
    targets = _targets(heads, choices)
    params = [p for p in heads.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    bar = progress_bar(progress, steps, "training MTP heads")
    heads.train()
    while (steps is None or report.steps < steps) and time.perf_counter() - start < budget_s:
        done = report.steps / steps if steps else (time.perf_counter() - start) / budget_s
        for group in optimizer.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * min(done, 1.0)))
        pick = torch.randint(0, len(tokens), (min(TRAIN_BATCH, len(tokens)),), generator=gen)
        losses = _losses(heads, tokens[pick], hidden[pick], targets[pick], feature_weight)
        loss = sum(w * x for w, x in zip(weights, losses)) / sum(weights)
        optimizer.zero_grad()
        loss.backward()  # type: ignore[union-attr]
        optimizer.step()
        report.steps += 1
        report.losses.append(float(loss.detach()))  # type: ignore[union-attr]
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{report.losses[-1]:.3f}")
    heads.eval()
    if bar is not None:
        bar.close()


@torch.no_grad()
def held_out_drafts(heads: MTPHeads, tokens: torch.Tensor, hidden: torch.Tensor, choices: torch.Tensor,
                    start: int = 0) -> tuple[list[float], torch.Tensor]:
    """:func:`chain_acceptance` and :func:`draft_ranks` of ``tokens``, from one pass of the heads over them."""
    chain = heads.chain(hidden, tokens)
    return chain_acceptance(heads, chain, choices, start), draft_ranks(heads, chain, choices, start)


def chain_acceptance(heads: MTPHeads, chain: list[tuple[torch.Tensor, torch.Tensor]], choices: torch.Tensor,
                     start: int = 0) -> list[float]:
    """Per depth ``k``: the share of positions (from ``start``, where the model's own continuation begins) where
    heads 1..k all agree with the model: what greedy verification would keep. ``chain`` is ``heads.chain`` of the
    sequences ``choices`` were made on."""
    agree = None
    out = []
    for k, (_, logits) in enumerate(chain):
        n = logits.shape[1]
        ok = heads.draft_ids[logits.argmax(-1)] == choices[:, k + 1:k + 1 + n]
        agree = ok if agree is None else agree[:, :n] & ok
        out.append(float(agree[:, start:].float().mean()))
    return out


def draft_ranks(heads: MTPHeads, chain: list[tuple[torch.Tensor, torch.Tensor]], choices: torch.Tensor,
                start: int = 0, ranks: int = RANKS) -> torch.Tensor:
    """``[positions, depth]``: at every position from ``start`` that all depths cover, the rank of the model's token
    among each head's choices (teacher-forced, as verification sees them when the earlier drafts were right);
    ``ranks`` where it is lower or outside the draft vocabulary. ``chain`` as for :func:`chain_acceptance`."""
    out = []
    for k, (_, logits) in enumerate(chain):
        n = logits.shape[1]
        want = choices[:, k + 1:k + 1 + n, None] == heads.draft_ids  # [b, n, draft]: where the model's token is
        target = logits.masked_fill(~want, float("-inf")).amax(-1, keepdim=True)
        rank = (logits > target).sum(-1).masked_fill(~want.any(-1), ranks).clamp_max(ranks)
        out.append(rank)
    common = out[-1].shape[1]  # the deepest head covers the fewest positions
    return torch.stack([r[:, start:common] for r in out], -1).reshape(-1, len(out))


def rank_shares(ranks: torch.Tensor, count: int = RANKS) -> list[list[float]]:
    """Per depth, the share of positions where the model's token is the head's ``r``-th choice, ``r < count``: what
    a draft tree is chosen by (:meth:`MTPHeads.tree`)."""
    return [[float((ranks[:, k] == r).float().mean()) for r in range(count)] for k in range(ranks.shape[1])]
