"""A tiny random-weight Llama for API, backend and CLI tests (the architecture zoo lives in zoo.py)."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from dscompile.evaluate import logits_of

VOCAB = 128


def tiny_llama(seed: int = 0, layers: int = 2, tied: bool = True) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=tied, attn_implementation="sdpa")
    return LlamaForCausalLM(cfg).eval()


def ids(batch: int = 1, seq: int = 8, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def compile_with_session(model: torch.nn.Module, profile: object, lower: str = "eager") -> tuple[object, object]:
    """``torch.compile`` with the deepseek_opt backend and a session of its own, to read what the passes did."""
    from dscompile.session import CompileSession

    session = CompileSession()
    compiled = torch.compile(model, backend="deepseek_opt",
                             options={"profile": profile, "lower": lower, "session": session})
    return compiled, session


def greedy_by_forward(model: torch.nn.Module, x: torch.Tensor, new: int) -> torch.Tensor:
    """Greedy decoding by recomputing the whole forward for every token: no cache at all."""
    seq = x
    for _ in range(new):
        with torch.no_grad():
            seq = torch.cat([seq, logits_of(model(seq))[:, -1].argmax(-1, keepdim=True)], 1)
    return seq


def assert_same_or_near_tie(model, got, expected, prompt_mask=None):
    """Token-identical, or the first difference is a near-tie (top two logits within 1e-4) in the original."""
    if torch.equal(got, expected):
        return
    row = int((got != expected).any(dim=1).nonzero()[0])
    col = int((got[row] != expected[row]).nonzero()[0])
    prefix = expected[row:row + 1, :col]
    kwargs = {} if prompt_mask is None else {
        "attention_mask": torch.cat([prompt_mask[row:row + 1], torch.ones(1, col - prompt_mask.shape[1],
                                                                             dtype=torch.long)], dim=1)}
    with torch.no_grad():
        top = logits_of(model(prefix, **kwargs))[0, -1].topk(2).values
    assert float(top[0] - top[1]) < 1e-4, f"row {row} differs at {col} without a near-tie"
