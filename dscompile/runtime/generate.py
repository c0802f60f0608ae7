"""The generation runtime: static KV-cache buffers, one prefill call, and a decode step compiled once per shape.

The cache capacity is the prompt plus the new tokens, rounded up to a bucket so that calls of similar lengths reuse
one compiled decode step (Dynamo recompiles only when batch or capacity change). Padding follows Hugging Face:
left padding through ``attention_mask``, positions counted from the first real token.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from ..errors import ConfigError
from ..monitor import GenerationStats, Monitor, Stopwatch, peak_memory
from ..passes.kv_cache import CachedProgram
from .sampling import check_sampling, choose_next

log = logging.getLogger("dscompile")

BUCKET = 128
PREFILL_TOKENS = 4096
"""A prompt is prefilled in chunks of at most this many tokens over all rows: transient activations (attention
bias, FFN intermediates, MLA's rebuilt keys) stay bounded however long the context is."""
LOWERINGS = ("inductor", "eager")


def attention_bias(key_valid: torch.Tensor, query_positions: torch.Tensor, window: int | None,
                   dtype: torch.dtype) -> torch.Tensor:
    """Additive bias ``[batch, 1, queries, capacity]``: causal, inside the window, not padding.

    A query always sees its own slot, so a row of pure padding stays finite (its output is never used).
    """
    capacity = key_valid.shape[-1]
    keys = torch.arange(capacity, device=key_valid.device)
    q = query_positions.unsqueeze(-1)
    allowed = keys <= q
    if window is not None:
        allowed = allowed & (keys > q - window)
    allowed = (allowed.unsqueeze(0) & key_valid.unsqueeze(1)) | (keys == q).unsqueeze(0)
    bias = torch.zeros(allowed.shape, dtype=dtype, device=key_valid.device)
    return bias.masked_fill_(~allowed, torch.finfo(dtype).min).unsqueeze(1)


def prefill_logits(program: CachedProgram, ids: torch.Tensor) -> torch.Tensor:
    """One prefill of ``ids`` (no padding) through ``program`` with fresh caches sized to it: the logits the
    program returns (every position for a ``logits="all"`` program). For evaluation and healing."""
    batch, tokens = ids.shape
    slots = torch.arange(tokens, device=ids.device)
    valid = torch.ones(batch, tokens, dtype=torch.bool, device=ids.device)
    biases = [attention_bias(valid, slots, w, program.dtype) for w in program.windows]
    caches = program.new_caches(batch, tokens, ids.device)
    return program.gm(ids, slots.expand(batch, -1), slots, *biases, *caches)[0]


class Runtime:
    """Runs a :class:`CachedProgram`: ``generate`` with Hugging Face semantics, stats in ``monitor``."""

    def __init__(self, program: CachedProgram, *, lower: str = "inductor", max_positions: int | None = None,
                 pad_token_id: int | None = None, eos_token_id: int | list[int] | None = None,
                 prefill_tokens: int = PREFILL_TOKENS):
        if lower not in LOWERINGS:
            raise ConfigError(f"unknown runtime lower={lower!r}; valid: {', '.join(LOWERINGS)}")
        self.program = program
        self.lower = lower
        self.max_positions = max_positions
        self.pad_token_id = pad_token_id
        self.eos_token_id = eos_token_id
        self.prefill_tokens = prefill_tokens
        self.monitor = Monitor()
        self._decode: Callable[..., Any] | None = None

    @property
    def device(self) -> torch.device:
        return self.program.device

    def decode_step(self) -> Callable[..., Any]:
        """The decode program: Inductor with static shapes (CUDA graphs on a GPU), or the graph itself."""
        if self._decode is None:
            gm = self.program.decode_gm if self.program.decode_gm is not None else self.program.gm
            self._decode = gm if self.lower == "eager" else _compile_decode(gm, self.device)
        return self._decode

    def reset_compiled(self) -> None:
        """Drop the compiled decode step (it is compiled again on next use)."""
        self._decode = None

    def capacity_for(self, total: int) -> int:
        """Cache slots for ``total`` tokens: rounded up to a bucket, so similar lengths share one compiled step."""
        capacity = -(-total // BUCKET) * BUCKET
        if self.max_positions is not None:
            capacity = min(capacity, max(self.max_positions, total))
        return capacity

    @torch.no_grad()
    def warm_up(self, batch: int, total_tokens: int) -> float:
        """Compile the decode step for ``batch`` rows and ``total_tokens`` (prompt + new) ahead of generation;
        returns the seconds it took."""
        clock = Stopwatch(self.device)
        capacity = self.capacity_for(total_tokens)
        caches = self.program.new_caches(batch, capacity, self.device)
        valid = torch.ones(batch, capacity, dtype=torch.bool, device=self.device)
        # Distinct tensors for every input: Dynamo guards on aliasing, and generate never passes one twice.
        token = torch.zeros(batch, 1, dtype=torch.long, device=self.device)
        position = torch.zeros(batch, 1, dtype=torch.long, device=self.device)
        self._run(self.decode_step(), token, position, torch.zeros(1, dtype=torch.long, device=self.device), valid,
                  caches)
        return clock.lap()

    def _run(self, fn: Callable[..., Any], ids: torch.Tensor, positions: torch.Tensor, cache_position: torch.Tensor,
             key_valid: torch.Tensor, caches: list[torch.Tensor]) -> torch.Tensor:
        biases = [attention_bias(key_valid, cache_position, w, self.program.dtype) for w in self.program.windows]
        out = fn(ids, positions, cache_position, *biases, *caches)
        return out[0] if isinstance(out, (tuple, list)) else out

    def _prefill(self, ids: torch.Tensor, positions: torch.Tensor, key_valid: torch.Tensor,
                 caches: list[torch.Tensor]) -> torch.Tensor:
        """The prompt through the program in chunks of whole rows (causal masking makes chunks exact)."""
        batch, prompt = ids.shape
        chunk = max(1, self.prefill_tokens // batch)
        for start in range(0, prompt, chunk):
            end = min(prompt, start + chunk)
            logits = self._run(self.program.gm, ids[:, start:end], positions[:, start:end],
                               torch.arange(start, end, device=ids.device), key_valid, caches)
        return logits

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
        """Prompt plus new tokens ``[batch, prompt + new]``; rows that finish early are padded as HF pads them."""
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
        capacity = self.capacity_for(total)
        device = self.device
        ids, mask = ids.to(device), mask.to(device)
        caches = self.program.new_caches(batch, capacity, device)
        key_valid = torch.zeros(batch, capacity, dtype=torch.bool, device=device)
        key_valid[:, :prompt] = mask.bool()
        positions = (mask.long().cumsum(-1) - 1).masked_fill_(mask == 0, 1) if self.program.takes_attention_mask \
            else torch.arange(prompt, device=device).expand(batch, -1)
        if not self.program.takes_attention_mask:
            key_valid[:, :prompt] = True  # a model that never sees padding attends to every token

        out = torch.empty(batch, total, dtype=torch.long, device=device)
        out[:, :prompt] = ids
        done = torch.zeros(batch, dtype=torch.bool, device=device)
        sample = {"do_sample": do_sample, "temperature": temperature, "top_k": top_k, "top_p": top_p,
                  "generator": generator}
        produced = 0
        with peak_memory(device) as peak:
            clock = Stopwatch(device)
            logits = self._prefill(ids, positions, key_valid, caches)
            next_token = choose_next(logits[:, -1], **sample)
            first_token_s = clock.lap()
            step = self.decode_step()
            last_position = positions[:, -1:]
            for i in range(new):
                next_token = torch.where(done, torch.full_like(next_token, pad), next_token)
                out[:, prompt + i] = next_token
                produced = i + 1
                _stream(streamer, next_token)
                if eos:
                    done |= _is_eos(next_token, eos)
                    if bool(done.all()):
                        break
                if i == new - 1:
                    break
                slot = prompt + i
                key_valid[:, slot] = True
                last_position = last_position + 1
                logits = self._run(step, next_token.unsqueeze(-1), last_position,
                                   torch.tensor([slot], device=device), key_valid, caches)
                next_token = choose_next(logits[:, -1], **sample)
            decode_s = clock.lap()
        _stream_end(streamer)
        self.monitor.record(GenerationStats(
            batch=batch, prompt_tokens=prompt, new_tokens=produced, time_to_first_token_s=first_token_s,
            decode_s=decode_s, cache_bytes=sum(c.numel() * c.element_size() for c in caches),
            peak_memory_bytes=peak[0], device=str(device), extra={"capacity": capacity},
        ))
        return out[:, :prompt + produced]


def _compile_decode(gm: torch.fx.GraphModule, device: torch.device) -> Callable[..., Any]:
    """CUDA: Inductor with CUDA graphs. CPU: Inductor with thin matmuls as fused reductions (see thin_matmul)."""
    if device.type == "cuda":
        return torch.compile(gm, dynamic=False, fullgraph=True, mode="reduce-overhead")
    from ..lower.thin_matmul import compile_thin  # imports Inductor: only when a step is compiled

    return torch.compile(gm, dynamic=False, fullgraph=True, backend=compile_thin,
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


def _is_eos(tokens: torch.Tensor, eos: set[int]) -> torch.Tensor:
    return torch.isin(tokens, torch.tensor(sorted(eos), device=tokens.device))


def _stream(streamer: Any, tokens: torch.Tensor) -> None:
    if streamer is None:
        return
    if hasattr(streamer, "put"):
        streamer.put(tokens.cpu())
    else:
        streamer(tokens.cpu())


def _stream_end(streamer: Any) -> None:
    if streamer is not None and hasattr(streamer, "end"):
        streamer.end()
