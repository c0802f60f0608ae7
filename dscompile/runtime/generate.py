"""The generation runtime: static KV-cache buffers, one prefill call, and a decode step compiled once per shape.

The cache capacity is the prompt plus the new tokens, rounded up to a bucket so that calls of similar lengths reuse
one compiled decode step (Dynamo recompiles only when batch or capacity change). Padding follows Hugging Face:
left padding through ``attention_mask``, positions counted from the first real token.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from ..errors import ConfigError
from ..monitor import GenerationStats, Monitor, Stopwatch, peak_memory
from ..passes.kv_cache import CachedProgram
from . import expert_load
from .draft_tree import DraftTree
from .emit import is_eos, stream, stream_end
from .expert_load import expert_counters
from .gate import MODES, SpeculationGate
from .sampling import check_sampling, choose_next
from .speculative import Speculation, speculation_slots

if TYPE_CHECKING:
    from ..passes.mtp_heads import MTPHeads

log = logging.getLogger("dscompile")

BUCKET = 128
PREFILL_TOKENS = 4096
"""A prompt is prefilled in chunks of at most this many tokens over all rows: transient activations (attention
bias, FFN intermediates, MLA's rebuilt keys) stay bounded however long the context is."""
LOWERINGS = ("inductor", "eager")
VERIFY_ROWS = 16  # the thin-product threshold (lower.thin_matmul.THIN_ROWS), kept here to avoid importing Inductor


def attention_bias(key_valid: torch.Tensor, query_positions: torch.Tensor, window: int | None,
                   dtype: torch.dtype, window_positions: tuple[torch.Tensor, torch.Tensor] | None = None,
                   step_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Additive bias ``[batch, 1, queries, capacity]``: causal, inside the window, not padding; among the queries'
    own slots, only where ``step_mask [queries, queries]`` allows (a draft tree: each node sees its ancestors).

    ``query_positions`` are the queries' slots. The window is measured in slots too, unless ``window_positions``
    gives ``(query [batch, queries], key [batch, capacity])`` token positions to measure it in (speculative decoding
    leaves holes between a row's slots). A query always sees its own slot, so a row of pure padding stays finite
    (its output is never used).
    """
    capacity = key_valid.shape[-1]
    keys = torch.arange(capacity, device=key_valid.device)
    q = query_positions.unsqueeze(-1)
    allowed = (keys <= q).unsqueeze(0)
    if window is not None and window_positions is None:
        allowed = allowed & (keys > q - window).unsqueeze(0)
    elif window is not None:
        query_pos, key_pos = window_positions
        allowed = allowed & (key_pos.unsqueeze(1) > query_pos.unsqueeze(-1) - window)
    allowed = (allowed & key_valid.unsqueeze(1)) | (keys == q).unsqueeze(0)
    if step_mask is not None:
        allowed[..., query_positions] &= step_mask
    bias = torch.zeros(allowed.shape, dtype=dtype, device=key_valid.device)
    return bias.masked_fill_(~allowed, torch.finfo(dtype).min).unsqueeze(1)


def prefill_outputs(program: CachedProgram, ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """One prefill of ``ids`` (no padding) through ``program`` with fresh caches sized to it: what the program
    returns, the logits first (every position for a ``logits="all"`` program), then the hidden states with MTP."""
    return tuple(program.gm(*prefill_arguments(program, ids)))


def prefill_arguments(program: CachedProgram, ids: torch.Tensor) -> list[torch.Tensor]:
    """The program's arguments for one prefill of ``ids``: positions, slots, attention biases and fresh caches."""
    batch, tokens = ids.shape
    slots = torch.arange(tokens, device=ids.device)
    valid = torch.ones(batch, tokens, dtype=torch.bool, device=ids.device)
    biases = [attention_bias(valid, slots, w, program.dtype) for w in program.windows]
    return [ids, slots.expand(batch, -1), slots, *biases, *program.new_caches(batch, tokens, ids.device)]


def prefill_logits(program: CachedProgram, ids: torch.Tensor) -> torch.Tensor:
    """The logits of :func:`prefill_outputs`. For evaluation and healing."""
    return prefill_outputs(program, ids)[0]


class Runtime:
    """Runs a :class:`CachedProgram`: ``generate`` with Hugging Face semantics, stats in ``monitor``."""

    def __init__(self, program: CachedProgram, *, lower: str = "inductor", max_positions: int | None = None,
                 pad_token_id: int | None = None, eos_token_id: int | list[int] | None = None,
                 prefill_tokens: int = PREFILL_TOKENS, drafter: MTPHeads | None = None,
                 speculation: str = "adaptive"):
        if lower not in LOWERINGS:
            raise ConfigError(f"unknown runtime lower={lower!r}; valid: {', '.join(LOWERINGS)}")
        self.program = program
        self.lower = lower
        self.max_positions = max_positions
        self.pad_token_id = pad_token_id
        self.eos_token_id = eos_token_id
        self.prefill_tokens = prefill_tokens
        self.drafter = drafter  # MTP heads: generate then drafts and verifies (the program returns hidden states)
        # Speculate only while a verification (batch x (depth + 1) rows) stays memory-bound: on a CPU, beyond the
        # thin-product rows it costs as much as that many plain steps (SmolLM2 at batch 8, depth 3: 0.54x). None:
        # always (a GPU verifies many rows for the price of one).
        self.max_verify_rows: int | None = None if self.device.type == "cuda" else VERIFY_ROWS
        if speculation not in MODES:
            raise ConfigError(f"speculation must be one of {', '.join(MODES)}, got {speculation!r}")
        self.speculation = speculation  # "adaptive": a SpeculationGate per batch size decides each step
        self.gates: dict[int, SpeculationGate] = {}
        self.monitor = Monitor()
        self._decode: Callable[..., Any] | None = None
        self._draft: dict[DraftTree, Callable[..., Any]] = {}  # by the tree (a chain included) it drafts
        self._draft_heads: MTPHeads | None = None  # what the draft steps read (see drafting_heads)

    @property
    def device(self) -> torch.device:
        return self.program.device

    def decode_step(self) -> Callable[..., Any]:
        """The decode program: Inductor with static shapes (CUDA graphs on a GPU), or the graph itself."""
        if self._decode is None:
            gm = self.program.decode_gm if self.program.decode_gm is not None else self.program.gm
            self._decode = gm if self.lower == "eager" else _compile_decode(gm, self.device)
        return self._decode

    def draft_step(self, tree: DraftTree | None = None) -> Callable[..., Any]:
        """MTP: the greedy drafting of a chain of ``depth`` tokens (``(drafts, logits)``) or of ``tree``'s nodes
        (``drafts``), compiled like the decode step (its products are thin too), reading :meth:`drafting_heads`."""
        assert self.drafter is not None, "draft_step needs MTP heads"
        tree = tree if tree is not None else DraftTree.chain(self.drafter.depth)
        if tree not in self._draft:
            drafter = self.drafting_heads()
            fn = drafter.draft if tree.is_chain else _tree_drafting(drafter, tree)
            self._draft[tree] = fn if self.lower == "eager" else _compile_decode(fn, self.device)
        return self._draft[tree]

    def drafting_heads(self) -> MTPHeads:
        """The heads greedy drafting reads: a copy with bfloat16 weights where that is free (CPUs with the native
        kernels; half the bytes, exact output all the same), taken when the first draft step is compiled."""
        assert self.drafter is not None
        if self._draft_heads is None:
            from ..passes.mtp_drafting import can_draft_in_bfloat16, drafting_copy

            use = self.lower != "eager" and can_draft_in_bfloat16(self.device)
            self._draft_heads = drafting_copy(self.drafter) if use else self.drafter
        return self._draft_heads

    def draft_tree(self, batch: int, sampling: bool = False) -> DraftTree:
        """What ``generate`` drafts at this batch size: the heads' tree (``mtp.draft_nodes``) where it verifies
        greedily, with a position per token, within ``max_verify_rows``; else the chain of ``depth`` drafts."""
        assert self.drafter is not None, "draft_tree needs MTP heads"
        tree = self.drafter.tree()
        chain = DraftTree.chain(self.drafter.depth)
        if tree.is_chain or sampling or self.program.slot_is_position:
            return chain
        if self.max_verify_rows is not None and batch * (tree.size + 1) > self.max_verify_rows:
            return chain
        return tree

    def gate(self, batch: int) -> SpeculationGate:
        """The speculation gate of this batch size (its step costs and tau carry over between calls)."""
        if batch not in self.gates or self.gates[batch].mode != self.speculation:
            self.gates[batch] = SpeculationGate(self.speculation)
        return self.gates[batch]

    def speculates(self, batch: int) -> bool:
        """Whether ``generate`` drafts and verifies at this batch size (MTP heads, verification memory-bound)."""
        if self.drafter is None:
            return False
        return self.max_verify_rows is None or batch * (self.drafter.depth + 1) <= self.max_verify_rows

    def reset_compiled(self) -> None:
        """Drop the compiled decode and draft steps (they are compiled again on next use)."""
        self._decode = None
        self._draft = {}
        self._draft_heads = None

    def capacity_for(self, total: int) -> int:
        """Cache slots for ``total`` tokens: rounded up to a bucket, so similar lengths share one compiled step."""
        capacity = -(-total // BUCKET) * BUCKET
        if self.max_positions is not None:
            capacity = min(capacity, max(self.max_positions, total))
        return capacity

    @torch.no_grad()
    def warm_up(self, batch: int, total_tokens: int) -> float:
        """Compile the decode step (and with MTP the draft step) for ``batch`` rows and ``total_tokens`` (prompt +
        new) ahead of generation; returns the seconds it took."""
        clock = Stopwatch(self.device)
        tokens = 1
        tree = None
        if self.drafter is not None and self.speculates(batch):  # MTP: the root and the drafts, in a larger cache
            tree = self.draft_tree(batch)
            tokens = tree.size + 1
            total_tokens += speculation_slots(tree, batch)
        capacity = self.capacity_for(total_tokens)
        caches = self.program.new_caches(batch, capacity, self.device)
        valid = torch.ones(batch, capacity, dtype=torch.bool, device=self.device)
        # Distinct tensors for every input: Dynamo guards on aliasing, and generate never passes one twice.
        token = torch.zeros(batch, tokens, dtype=torch.long, device=self.device)
        position = torch.zeros(batch, tokens, dtype=torch.long, device=self.device)
        self.run(self.decode_step(), token, position, torch.arange(tokens, device=self.device), valid, caches, None,
                 None if tree is None else tree.step_mask(self.device))
        if tokens > 1 and self.speculation == "adaptive":  # the gate's plain steps: one token, a second shape
            one = torch.zeros(batch, 1, dtype=torch.long, device=self.device)  # fresh: Dynamo guards on strides
            self.run(self.decode_step(), one, one.clone(), torch.arange(1, device=self.device), valid, caches)
        if self.drafter is not None and tokens > 1:
            hidden = torch.zeros(batch, self.drafter.hidden, dtype=self.program.dtype, device=self.device)
            self.draft_step(tree)(hidden, torch.zeros(batch, dtype=torch.long, device=self.device))
        return clock.lap()

    def run(self, fn: Callable[..., Any], ids: torch.Tensor, positions: torch.Tensor, cache_position: torch.Tensor,
            key_valid: torch.Tensor, caches: list[torch.Tensor],
            window_positions: tuple[torch.Tensor, torch.Tensor] | None = None,
            step_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """One call of a program graph: ``(logits,)``, or ``(logits, hidden)`` for a program with MTP."""
        biases = [attention_bias(key_valid, cache_position, w, self.program.dtype, window_positions, step_mask)
                  for w in self.program.windows]
        out = fn(ids, positions, cache_position, *biases, *caches)
        return tuple(out) if isinstance(out, (tuple, list)) else (out,)

    def _prefill(self, ids: torch.Tensor, positions: torch.Tensor, key_valid: torch.Tensor,
                 caches: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """The prompt through the program in chunks of whole rows (causal masking makes chunks exact)."""
        batch, prompt = ids.shape
        chunk = max(1, self.prefill_tokens // batch)
        for start in range(0, prompt, chunk):
            end = min(prompt, start + chunk)
            out = self.run(self.program.gm, ids[:, start:end], positions[:, start:end],
                           torch.arange(start, end, device=ids.device), key_valid, caches)
        return out

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int | None = None,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token_id: int | list[int] | None = None,
        max_length: int | None = None,
        streamer: Any = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Prompt plus new tokens ``[batch, prompt + new]``; rows that finish early are padded as HF pads them.

        With MTP heads (``drafter``), every step verifies a drafted chain and keeps the longest prefix the model
        agrees with (greedy), or runs speculative sampling (``do_sample``): the output is the model's own either way.
        """
        ids, mask = _check_prompt(input_ids, attention_mask)
        batch, prompt = ids.shape
        new = _new_token_count(prompt, max_new_tokens, max_length)
        check_sampling(do_sample, temperature, top_k, top_p)
        total = prompt + new
        if self.max_positions is not None and total > self.max_positions:
            raise ConfigError(
                f"prompt ({prompt}) plus max_new_tokens ({new}) is {total} tokens, beyond the model's "
                f"{self.max_positions} positions; shorten the prompt or ask for fewer tokens"
            )
        eos = _as_set(eos_token_id if eos_token_id is not None else self.eos_token_id)
        pad = self.pad_token_id if self.pad_token_id is not None else (min(eos) if eos else 0)
        device = self.device
        ids, mask = ids.to(device), mask.to(device)
        drafter = self.drafter if self.speculates(batch) else None
        tree = self.draft_tree(batch, do_sample) if drafter is not None else None
        capacity = self.capacity_for(total if tree is None else total + speculation_slots(tree, batch))
        caches = self.program.new_caches(batch, capacity, device)
        key_valid = torch.zeros(batch, capacity, dtype=torch.bool, device=device)
        key_valid[:, :prompt] = mask.bool()
        positions = (mask.long().cumsum(-1) - 1).masked_fill_(mask == 0, 1) if self.program.takes_attention_mask \
            else torch.arange(prompt, device=device).expand(batch, -1)
        if not self.program.takes_attention_mask:
            key_valid[:, :prompt] = True  # a model that never sees padding attends to every token

        out = torch.full((batch, total), pad, dtype=torch.long, device=device)
        out[:, :prompt] = ids
        sample = {"do_sample": do_sample, "temperature": temperature, "top_k": top_k, "top_p": top_p,
                  "generator": generator}
        extra: dict[str, Any] = {"capacity": capacity}
        if self.drafter is not None and drafter is None:
            extra["mtp"] = (f"off: batch {batch} x {self.drafter.depth + 1} verified tokens exceeds max_verify_rows "
                            f"{self.max_verify_rows}")
        counters = expert_counters(self.program)
        expert_load.reset(counters)
        with peak_memory(device) as peak:
            clock = Stopwatch(device)
            first = self._prefill(ids, positions, key_valid, caches)
            next_token = choose_next(first[0][:, -1], **sample)
            first_token_s = clock.lap()
            if drafter is None:
                produced = self._decode_loop(out, prompt, next_token, positions[:, -1:], key_valid, caches, eos, pad,
                                             sample, streamer)
            else:
                spec = Speculation(self, drafter, out, prompt, eos, pad, sample, streamer, self.gate(batch), tree)
                produced = spec.run(next_token, first[1][:, -1].contiguous(), positions, key_valid, caches)
                extra.update(spec.stats())
            decode_s = clock.lap()
        stream_end(streamer)
        if counters:
            extra["moe_expert_load"] = expert_load.loads(counters)
            extra["moe_maxvio"] = expert_load.maxvio(extra["moe_expert_load"])
        self.monitor.record(GenerationStats(
            batch=batch, prompt_tokens=prompt, new_tokens=produced, time_to_first_token_s=first_token_s,
            decode_s=decode_s, cache_bytes=sum(c.numel() * c.element_size() for c in caches),
            peak_memory_bytes=peak[0], device=str(device), extra=extra,
        ))
        return out[:, :prompt + produced]

    def _decode_loop(self, out: torch.Tensor, prompt: int, next_token: torch.Tensor, last_position: torch.Tensor,
                     key_valid: torch.Tensor, caches: list[torch.Tensor], eos: set[int], pad: int,
                     sample: dict[str, Any], streamer: Any) -> int:
        """One token per step through the compiled decode step; returns how many new tokens were produced."""
        batch, total = out.shape
        new = total - prompt
        done = torch.zeros(batch, dtype=torch.bool, device=out.device)
        step = self.decode_step()
        produced = 0
        for i in range(new):
            next_token = torch.where(done, torch.full_like(next_token, pad), next_token)
            out[:, prompt + i] = next_token
            produced = i + 1
            stream(streamer, next_token)
            if eos:
                done |= is_eos(next_token, eos)
                if bool(done.all()):
                    break
            if i == new - 1:
                break
            slot = prompt + i
            key_valid[:, slot] = True
            last_position = last_position + 1
            logits = self.run(step, next_token.unsqueeze(-1), last_position, torch.tensor([slot], device=out.device),
                              key_valid, caches)[0]
            next_token = choose_next(logits[:, -1], **sample)
        return produced


def _tree_drafting(drafter: MTPHeads, tree: DraftTree) -> Callable[..., Any]:
    """``drafter.draft_tree`` for one tree, as a function of the step's inputs only (what gets compiled)."""

    def draft(hidden: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
        return drafter.draft_tree(hidden, token, tree)

    return draft


def _compile_decode(fn: Callable[..., Any], device: torch.device) -> Callable[..., Any]:
    """CUDA: Inductor with CUDA graphs. CPU: Inductor with the decode-step passes (thin products and attention as
    native kernels, see lower.decode_step); a graph is compiled directly, without Dynamo's per-call cost."""
    if device.type == "cuda":
        return torch.compile(fn, dynamic=False, fullgraph=True, mode="reduce-overhead")
    from ..lower.decode_step import StaticStep, compile_decode_step  # imports Inductor: only when compiling

    if isinstance(fn, torch.fx.GraphModule):
        return StaticStep(fn)
    return torch.compile(fn, dynamic=False, fullgraph=True, backend=compile_decode_step,
                         options={"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe})


def _check_prompt(input_ids: Any, attention_mask: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.long, torch.int32, torch.int64):
        raise ConfigError("input_ids must be a LongTensor of token ids [batch, tokens]")
    ids = input_ids.unsqueeze(0) if input_ids.dim() == 1 else input_ids
    if ids.dim() != 2:
        raise ConfigError(f"input_ids must be [batch, tokens], got shape {tuple(input_ids.shape)}")
    if ids.shape[0] == 0 or ids.shape[1] == 0:
        raise ConfigError("the prompt is empty: generation needs at least one token per row")
    if attention_mask is None:
        return ids.long(), torch.ones_like(ids)
    mask = attention_mask.unsqueeze(0) if attention_mask.dim() == 1 else attention_mask
    if mask.shape != ids.shape:
        raise ConfigError(f"attention_mask shape {tuple(mask.shape)} differs from input_ids {tuple(ids.shape)}")
    if not bool(mask[:, -1].bool().all()):
        raise ConfigError("attention_mask has padding on the right; pad prompts on the left for generation")
    return ids.long(), mask.long()


def _new_token_count(prompt: int, max_new_tokens: int | None, max_length: int | None) -> int:
    if max_new_tokens is not None:
        if max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        return max_new_tokens
    if max_length is not None:
        if max_length <= prompt:
            raise ConfigError(f"max_length {max_length} leaves no room after a prompt of {prompt} tokens")
        return max_length - prompt
    raise ConfigError("say how many tokens to generate: max_new_tokens=... (or max_length=...)")


def _as_set(eos: int | list[int] | None) -> set[int]:
    if eos is None:
        return set()
    return {int(e) for e in eos} if isinstance(eos, (list, tuple, set)) else {int(eos)}
