"""A zoo of tiny random-weight causal language models, each with what the matchers should find in it.

Hugging Face architectures are built from small configs; three hand-written transformers show the ways people
write attention themselves (nanoGPT's fused QKV and ``tril`` buffer, Meta's complex RoPE and ``repeat_kv``, and
SDPA with ``is_causal`` and a fused gate/up projection). Every builder is seeded, returns an eval-mode fp32
model, example token ids and an :class:`Expect`. Models stay tiny (2 layers, width 64) so tests run in seconds.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dscompile.capture import CapturedGraph, capture_dynamo, capture_export
from dscompile.patterns import MatchSet, match_all

LAYERS = 2
HIDDEN = 64
HEADS = 4
HEAD_DIM = 16
FFN = 128
SEQ = 8  # longer than every sliding window below, so windows are visible in the example's mask
WINDOW = 4


@dataclass(frozen=True)
class Expect:
    """What the matchers should report for a model; ``windows``/``rope_bases`` give one value per layer."""

    vocab: int
    kind: str = "sdpa"  # attention anchor: "sdpa" or "eager" (matmul -> softmax -> matmul)
    heads: int = HEADS
    kv_heads: int = HEADS
    head_dim: int = HEAD_DIM
    hidden: int = HIDDEN
    intermediate: int = FFN
    layers: int = LAYERS
    gated: bool = True
    activation: str = "silu"
    tied: bool = False
    rope: str | None = "rotate_half"
    rope_dim: int | None = HEAD_DIM
    rope_bases: tuple[float | None, ...] = (10000.0,) * LAYERS
    causal: bool = True
    windows: tuple[int | None, ...] = (None,) * LAYERS
    fused_qkv: bool = False
    fused_gate_up: bool = False
    qk_norm: bool = False
    softcap: bool = False


Built = tuple[nn.Module, torch.Tensor, Expect]
NO_ROPE: dict[str, object] = dict(rope=None, rope_dim=None, rope_bases=(None,) * LAYERS)


def example_ids(vocab: int, batch: int = 2, seq: int = SEQ, seed: int = 1) -> torch.Tensor:
    """Token ids (batch 2 so a batch dim of 1 is never mistaken for a constant)."""
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _hf(config_cls: type, model_cls: type, vocab: int, attn: str = "sdpa", **cfg: object) -> tuple[nn.Module,
                                                                                                  torch.Tensor]:
    torch.manual_seed(0)
    config = config_cls(vocab_size=vocab, **cfg)
    config._attn_implementation = attn
    return model_cls(config).eval(), example_ids(vocab)


_LLAMA_LIKE = dict(hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                   max_position_embeddings=128)


def llama(attn: str = "sdpa") -> Built:
    from transformers import LlamaConfig, LlamaForCausalLM

    model, ids = _hf(LlamaConfig, LlamaForCausalLM, 128, attn, num_key_value_heads=2, tie_word_embeddings=False,
                     rope_parameters={"rope_type": "default", "rope_theta": 50000.0}, **_LLAMA_LIKE)
    return model, ids, Expect(vocab=128, kind=attn, kv_heads=2, rope_bases=(50000.0,) * LAYERS)


def qwen2() -> Built:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    model, ids = _hf(Qwen2Config, Qwen2ForCausalLM, 160, num_key_value_heads=1, tie_word_embeddings=True,
                     rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, **_LLAMA_LIKE)
    return model, ids, Expect(vocab=160, kv_heads=1, tied=True, rope_bases=(1000000.0,) * LAYERS)


def qwen3() -> Built:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    model, ids = _hf(Qwen3Config, Qwen3ForCausalLM, 192, num_key_value_heads=2, head_dim=32,
                     tie_word_embeddings=True, **_LLAMA_LIKE)
    return model, ids, Expect(vocab=192, kv_heads=2, head_dim=32, rope_dim=32, tied=True, qk_norm=True)


def mistral() -> Built:
    from transformers import MistralConfig, MistralForCausalLM

    model, ids = _hf(MistralConfig, MistralForCausalLM, 128, num_key_value_heads=2, sliding_window=WINDOW,
                     tie_word_embeddings=False, **_LLAMA_LIKE)
    return model, ids, Expect(vocab=128, kv_heads=2, windows=(WINDOW,) * LAYERS)


def gpt2() -> Built:
    from transformers import GPT2Config, GPT2LMHeadModel

    model, ids = _hf(GPT2Config, GPT2LMHeadModel, 200, n_positions=128, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS,
                     n_inner=FFN, bos_token_id=0, eos_token_id=0)
    return model, ids, Expect(vocab=200, gated=False, activation="gelu_tanh", tied=True, fused_qkv=True,
                              **NO_ROPE)


def opt() -> Built:
    from transformers import OPTConfig, OPTForCausalLM

    model, ids = _hf(OPTConfig, OPTForCausalLM, 144, hidden_size=HIDDEN, ffn_dim=FFN, num_hidden_layers=LAYERS,
                     num_attention_heads=HEADS, word_embed_proj_dim=HIDDEN, max_position_embeddings=128,
                     pad_token_id=1)
    return model, ids, Expect(vocab=144, gated=False, activation="relu", tied=True, **NO_ROPE)


def gpt_neox() -> Built:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    model, ids = _hf(GPTNeoXConfig, GPTNeoXForCausalLM, 176, hidden_size=HIDDEN, intermediate_size=FFN,
                     num_hidden_layers=LAYERS, num_attention_heads=HEADS, max_position_embeddings=128,
                     rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5})
    return model, ids, Expect(vocab=176, gated=False, activation="gelu", rope_dim=HEAD_DIM // 2, fused_qkv=True)


def phi3() -> Built:
    from transformers import Phi3Config, Phi3ForCausalLM

    model, ids = _hf(Phi3Config, Phi3ForCausalLM, 128, num_key_value_heads=2, pad_token_id=0, bos_token_id=1,
                     eos_token_id=2, tie_word_embeddings=False, **_LLAMA_LIKE)
    return model, ids, Expect(vocab=128, kv_heads=2, fused_qkv=True, fused_gate_up=True)


def gemma2() -> Built:
    from transformers import Gemma2Config, Gemma2ForCausalLM

    model, ids = _hf(Gemma2Config, Gemma2ForCausalLM, 128, "eager", num_key_value_heads=2, head_dim=HEAD_DIM,
                     query_pre_attn_scalar=HEAD_DIM, sliding_window=WINDOW, pad_token_id=0, **_LLAMA_LIKE)
    layer_types = tuple(model.config.layer_types)
    windows = tuple(WINDOW if t == "sliding_attention" else None for t in layer_types)
    return model, ids, Expect(vocab=128, kind="eager", kv_heads=2, activation="gelu_tanh", tied=True,
                              windows=windows, softcap=True)


def gemma3() -> Built:
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    layer_types = ["sliding_attention", "full_attention"]
    model, ids = _hf(Gemma3TextConfig, Gemma3ForCausalLM, 128, num_key_value_heads=2, head_dim=HEAD_DIM,
                     query_pre_attn_scalar=HEAD_DIM, sliding_window=WINDOW, layer_types=layer_types,
                     pad_token_id=0, **_LLAMA_LIKE)
    return model, ids, Expect(vocab=128, kv_heads=2, activation="gelu_tanh", tied=True, qk_norm=True,
                              windows=(WINDOW, None), rope_bases=(10000.0, 1000000.0))


# --- Hand-written transformers ------------------------------------------------------------------------------------


class NanoAttention(nn.Module):
    """nanoGPT's CausalSelfAttention on the manual path: fused ``c_attn``, ``tril`` buffer, ``masked_fill``."""

    def __init__(self, block: int):
        super().__init__()
        self.c_attn = nn.Linear(HIDDEN, 3 * HIDDEN)
        self.c_proj = nn.Linear(HIDDEN, HIDDEN)
        self.register_buffer("bias", torch.tril(torch.ones(block, block)).view(1, 1, block, block))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(HIDDEN, dim=2)
        k = k.view(B, T, HEADS, C // HEADS).transpose(1, 2)
        q = q.view(B, T, HEADS, C // HEADS).transpose(1, 2)
        v = v.view(B, T, HEADS, C // HEADS).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
        att = F.softmax(att, dim=-1)
        y = att @ v
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


class NanoBlock(nn.Module):
    def __init__(self, block: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(HIDDEN)
        self.attn = NanoAttention(block)
        self.ln_2 = nn.LayerNorm(HIDDEN)
        self.mlp = nn.Sequential()
        self.mlp.c_fc = nn.Linear(HIDDEN, FFN)
        self.mlp.gelu = nn.GELU()
        self.mlp.c_proj = nn.Linear(FFN, HIDDEN)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class NanoGPT(nn.Module):
    """nanoGPT: learned positions from ``torch.arange``, tied ``wte``/``lm_head``."""

    def __init__(self, vocab: int, block: int = 80):
        super().__init__()
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(vocab, HIDDEN), wpe=nn.Embedding(block, HIDDEN),
            h=nn.ModuleList(NanoBlock(block) for _ in range(LAYERS)), ln_f=nn.LayerNorm(HIDDEN),
        ))
        self.lm_head = nn.Linear(HIDDEN, vocab, bias=False)
        self.transformer.wte.weight = self.lm_head.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        _, t = idx.size()
        pos = torch.arange(0, t, dtype=torch.long, device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x))


def nanogpt() -> Built:
    torch.manual_seed(0)
    return NanoGPT(96).eval(), example_ids(96), Expect(
        vocab=96, kind="eager", gated=False, activation="gelu", tied=True, fused_qkv=True, **NO_ROPE)


META_KV_HEADS = 2
META_THETA = 500000.0


def precompute_freqs_cis(dim: int, end: int, theta: float) -> torch.Tensor:
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: (dim // 2)].float() / dim))
    t = torch.arange(end, device=freqs.device, dtype=torch.float32)
    freqs = torch.outer(t, freqs)
    return torch.polar(torch.ones_like(freqs), freqs)


def reshape_for_broadcast(freqs_cis: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    shape = [d if i == 1 or i == x.ndim - 1 else 1 for i, d in enumerate(x.shape)]
    return freqs_cis.view(*shape)


def apply_rotary_emb(xq: torch.Tensor, xk: torch.Tensor, freqs_cis: torch.Tensor) -> tuple[torch.Tensor,
                                                                                           torch.Tensor]:
    xq_ = torch.view_as_complex(xq.float().reshape(*xq.shape[:-1], -1, 2))
    xk_ = torch.view_as_complex(xk.float().reshape(*xk.shape[:-1], -1, 2))
    freqs_cis = reshape_for_broadcast(freqs_cis, xq_)
    xq_out = torch.view_as_real(xq_ * freqs_cis).flatten(3)
    xk_out = torch.view_as_real(xk_ * freqs_cis).flatten(3)
    return xq_out.type_as(xq), xk_out.type_as(xk)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    bs, slen, n_kv_heads, head_dim = x.shape
    if n_rep == 1:
        return x
    return (x[:, :, :, None, :].expand(bs, slen, n_kv_heads, n_rep, head_dim)
            .reshape(bs, slen, n_kv_heads * n_rep, head_dim))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._norm(x.float()).type_as(x) * self.weight


class MetaAttention(nn.Module):
    """Meta's Llama attention without the KV cache: separate ``wq/wk/wv/wo``, complex RoPE, ``repeat_kv``."""

    def __init__(self) -> None:
        super().__init__()
        self.wq = nn.Linear(HIDDEN, HEADS * HEAD_DIM, bias=False)
        self.wk = nn.Linear(HIDDEN, META_KV_HEADS * HEAD_DIM, bias=False)
        self.wv = nn.Linear(HIDDEN, META_KV_HEADS * HEAD_DIM, bias=False)
        self.wo = nn.Linear(HEADS * HEAD_DIM, HIDDEN, bias=False)

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        bsz, seqlen, _ = x.shape
        xq, xk, xv = self.wq(x), self.wk(x), self.wv(x)
        xq = xq.view(bsz, seqlen, HEADS, HEAD_DIM)
        xk = xk.view(bsz, seqlen, META_KV_HEADS, HEAD_DIM)
        xv = xv.view(bsz, seqlen, META_KV_HEADS, HEAD_DIM)
        xq, xk = apply_rotary_emb(xq, xk, freqs_cis=freqs_cis)
        keys = repeat_kv(xk, HEADS // META_KV_HEADS)
        values = repeat_kv(xv, HEADS // META_KV_HEADS)
        xq, keys, values = xq.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2)
        scores = torch.matmul(xq, keys.transpose(2, 3)) / math.sqrt(HEAD_DIM)
        if mask is not None:
            scores = scores + mask
        scores = F.softmax(scores.float(), dim=-1).type_as(xq)
        output = torch.matmul(scores, values)
        output = output.transpose(1, 2).contiguous().view(bsz, seqlen, -1)
        return self.wo(output)


class MetaFeedForward(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Linear(HIDDEN, FFN, bias=False)
        self.w2 = nn.Linear(FFN, HIDDEN, bias=False)
        self.w3 = nn.Linear(HIDDEN, FFN, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class MetaBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attention = MetaAttention()
        self.feed_forward = MetaFeedForward()
        self.attention_norm = RMSNorm(HIDDEN)
        self.ffn_norm = RMSNorm(HIDDEN)

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), freqs_cis, mask)
        return h + self.feed_forward(self.ffn_norm(h))


class MetaLlama(nn.Module):
    """Meta's reference Llama ``Transformer`` (start position 0): ``torch.full(-inf).triu`` additive mask."""

    def __init__(self, vocab: int, max_seq: int = 80):
        super().__init__()
        self.tok_embeddings = nn.Embedding(vocab, HIDDEN)
        self.layers = nn.ModuleList(MetaBlock() for _ in range(LAYERS))
        self.norm = RMSNorm(HIDDEN)
        self.output = nn.Linear(HIDDEN, vocab, bias=False)
        self.register_buffer("freqs_cis", precompute_freqs_cis(HEAD_DIM, max_seq * 2, META_THETA), persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        _, seqlen = tokens.shape
        h = self.tok_embeddings(tokens)
        freqs_cis = self.freqs_cis[0:seqlen]
        mask = None
        if seqlen > 1:
            mask = torch.full((seqlen, seqlen), float("-inf"), device=tokens.device)
            mask = torch.triu(mask, diagonal=1).type_as(h)
        for layer in self.layers:
            h = layer(h, freqs_cis, mask)
        return self.output(self.norm(h)).float()


def meta_llama() -> Built:
    torch.manual_seed(0)
    return MetaLlama(112).eval(), example_ids(112), Expect(
        vocab=112, kind="eager", kv_heads=META_KV_HEADS, rope="complex", rope_bases=(META_THETA,) * LAYERS)


SDPA_THETA = 20000.0


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


class SdpaAttention(nn.Module):
    """Separate projections, rotate-half RoPE from an ``inv_freq`` buffer, ``F.sdpa(is_causal=True)``."""

    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(HIDDEN, HIDDEN, bias=False)
        self.k_proj = nn.Linear(HIDDEN, HIDDEN, bias=False)
        self.v_proj = nn.Linear(HIDDEN, HIDDEN, bias=False)
        self.o_proj = nn.Linear(HIDDEN, HIDDEN, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, HEADS, HEAD_DIM).transpose(1, 2)
        k = self.k_proj(x).view(b, t, HEADS, HEAD_DIM).transpose(1, 2)
        v = self.v_proj(x).view(b, t, HEADS, HEAD_DIM).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, HIDDEN))


class FusedSwiGLU(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate_up = nn.Linear(HIDDEN, 2 * FFN, bias=False)
        self.down = nn.Linear(FFN, HIDDEN, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class SdpaBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm1 = nn.RMSNorm(HIDDEN)
        self.attn = SdpaAttention()
        self.norm2 = nn.RMSNorm(HIDDEN)
        self.mlp = FusedSwiGLU()

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin)
        return x + self.mlp(self.norm2(x))


class SdpaLM(nn.Module):
    """A modern hand-written decoder: RMSNorm modules, SDPA, rotary tables built in forward, untied head."""

    def __init__(self, vocab: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, HIDDEN)
        self.blocks = nn.ModuleList(SdpaBlock() for _ in range(LAYERS))
        self.norm = nn.RMSNorm(HIDDEN)
        self.head = nn.Linear(HIDDEN, vocab, bias=False)
        inv_freq = 1.0 / SDPA_THETA ** (torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        t = torch.arange(ids.shape[1], device=ids.device, dtype=torch.float32)
        freqs = torch.outer(t, self.inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        x = self.embed(ids)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        for block in self.blocks:
            x = block(x, cos, sin)
        return self.head(self.norm(x))


def sdpa_lm() -> Built:
    torch.manual_seed(0)
    return SdpaLM(136).eval(), example_ids(136), Expect(vocab=136, fused_gate_up=True,
                                                         rope_bases=(SDPA_THETA,) * LAYERS)


TABLE_THETA = 30000.0
TABLE_ROTARY = HEAD_DIM // 2


def rotate_every_two(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., ::2], x[..., 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


class TableAttention(nn.Module):
    """GPT-J's way: partial interleaved RoPE from precomputed cos/sin tables, a bool ``tril`` with ``where``."""

    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(HIDDEN, HIDDEN, bias=False)
        self.k_proj = nn.Linear(HIDDEN, HIDDEN, bias=False)
        self.v_proj = nn.Linear(HIDDEN, HIDDEN, bias=False)
        self.out_proj = nn.Linear(HIDDEN, HIDDEN, bias=False)
        self.scale = HEAD_DIM ** -0.5

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        rot, keep = x[..., :TABLE_ROTARY], x[..., TABLE_ROTARY:]
        cos = cos.repeat_interleave(2, dim=-1)[None, :, None, :]
        sin = sin.repeat_interleave(2, dim=-1)[None, :, None, :]
        return torch.cat([rot * cos + rotate_every_two(rot) * sin, keep], dim=-1)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self._rotate(self.q_proj(x).view(b, t, HEADS, HEAD_DIM), cos, sin).permute(0, 2, 1, 3)
        k = self._rotate(self.k_proj(x).view(b, t, HEADS, HEAD_DIM), cos, sin).permute(0, 2, 1, 3)
        v = self.v_proj(x).view(b, t, HEADS, HEAD_DIM).permute(0, 2, 1, 3)
        scores = torch.matmul(q, k.transpose(-1, -2)) * self.scale
        scores = torch.where(allowed, scores, torch.finfo(scores.dtype).min)
        out = torch.matmul(scores.softmax(dim=-1), v)
        return self.out_proj(out.permute(0, 2, 1, 3).reshape(b, t, HIDDEN))


class TanhGeluMLP(nn.Module):
    """GELU written out with ``tanh`` (the anchor is the ``tanh``, not a gelu call)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc_in = nn.Linear(HIDDEN, FFN)
        self.fc_out = nn.Linear(FFN, HIDDEN)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc_in(x)
        h = 0.5 * h * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (h + 0.044715 * torch.pow(h, 3.0))))
        return self.fc_out(h)


class ParallelBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(HIDDEN)
        self.attn = TableAttention()
        self.mlp = TanhGeluMLP()

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        h = self.ln(x)
        return x + self.attn(h, cos, sin, allowed) + self.mlp(h)


class TableLM(nn.Module):
    """Parallel attention/MLP blocks over cos/sin tables and a bool causal buffer; LM head with a bias."""

    def __init__(self, vocab: int, max_seq: int = 80):
        super().__init__()
        self.wte = nn.Embedding(vocab, HIDDEN)
        self.blocks = nn.ModuleList(ParallelBlock() for _ in range(LAYERS))
        self.ln_f = nn.LayerNorm(HIDDEN)
        self.lm_head = nn.Linear(HIDDEN, vocab)
        inv_freq = 1.0 / TABLE_THETA ** (torch.arange(0, TABLE_ROTARY, 2).float() / TABLE_ROTARY)
        angles = torch.outer(torch.arange(max_seq, dtype=torch.float32), inv_freq)
        self.register_buffer("cos_cached", angles.cos(), persistent=False)
        self.register_buffer("sin_cached", angles.sin(), persistent=False)
        self.register_buffer("causal", torch.tril(torch.ones(max_seq, max_seq, dtype=torch.bool)), persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        t = ids.shape[1]
        cos, sin, allowed = self.cos_cached[:t], self.sin_cached[:t], self.causal[:t, :t]
        x = self.wte(ids)
        for block in self.blocks:
            x = block(x, cos, sin, allowed)
        return self.lm_head(self.ln_f(x))


def table_lm() -> Built:
    torch.manual_seed(0)
    return TableLM(120).eval(), example_ids(120), Expect(
        vocab=120, kind="eager", gated=False, activation="gelu_tanh", rope="interleaved", rope_dim=TABLE_ROTARY,
        rope_bases=(TABLE_THETA,) * LAYERS)


# --- Near misses: models whose attention or FFN must not match, for a stated reason --------------------------------


class OddAttention(nn.Module):
    """The query is the raw hidden state: there is no query projection to compress."""

    def __init__(self) -> None:
        super().__init__()
        self.k_proj = nn.Linear(HIDDEN, HIDDEN, bias=False)
        self.v_proj = nn.Linear(HIDDEN, HIDDEN, bias=False)
        self.o_proj = nn.Linear(HIDDEN, HIDDEN, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = x.view(b, t, HEADS, HEAD_DIM).transpose(1, 2)
        k = self.k_proj(x).view(b, t, HEADS, HEAD_DIM).transpose(1, 2)
        v = self.v_proj(x).view(b, t, HEADS, HEAD_DIM).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, HIDDEN))


class OddMLP(nn.Module):
    """The activation reads the sum of two projections: not one up (or gate) projection."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(HIDDEN, FFN, bias=False)
        self.b = nn.Linear(HIDDEN, FFN, bias=False)
        self.down = nn.Linear(FFN, HIDDEN, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.a(x) + self.b(x)))


class OddLM(nn.Module):
    """One layer of :class:`OddAttention` and :class:`OddMLP`: both must come back as near misses."""

    def __init__(self, vocab: int = 64):
        super().__init__()
        self.embed = nn.Embedding(vocab, HIDDEN)
        self.attn = OddAttention()
        self.mlp = OddMLP()
        self.head = nn.Linear(HIDDEN, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        x = x + self.attn(x)
        return self.head(x + self.mlp(x))


def odd_lm() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return OddLM().eval(), example_ids(64)


ZOO: dict[str, Callable[[], Built]] = {
    "llama": llama,
    "llama_eager": lambda: llama("eager"),
    "qwen2": qwen2,
    "qwen3": qwen3,
    "mistral": mistral,
    "gpt2": gpt2,
    "opt": opt,
    "gpt_neox": gpt_neox,
    "phi3": phi3,
    "gemma2": gemma2,
    "gemma3": gemma3,
    "nanogpt": nanogpt,
    "meta_llama": meta_llama,
    "sdpa_lm": sdpa_lm,
    "table_lm": table_lm,
}


# --- Cached builds and captures, so each model is built once and each path traced once per session ----------------

PATHS = (("export", False), ("export", True), ("dynamo", False), ("dynamo", True))


@functools.cache
def built(name: str) -> Built:
    """``ZOO[name]()``, built once; tests must not modify the model."""
    return ZOO[name]()


@functools.cache
def captured(name: str, path: str, dynamic: bool) -> list[CapturedGraph]:
    """The graphs of one zoo model on one capture path (export gives one graph, Dynamo one or more)."""
    model, ids, _ = built(name)
    if path == "export":
        return [capture_export(model, ids, dynamic=dynamic)]
    return capture_dynamo(model, ids, dynamic=dynamic)


@functools.cache
def matched(name: str, path: str, dynamic: bool) -> MatchSet:
    """Every match in every graph of :func:`captured`."""
    found = MatchSet()
    for cg in captured(name, path, dynamic):
        found.extend(match_all(cg))
    return found
