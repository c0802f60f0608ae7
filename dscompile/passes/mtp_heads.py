"""MTP heads: ``depth`` small modules that draft the tokens after the model's next one (DeepSeek-V3 layout).

Head ``k`` at position ``i`` reads the previous head's state ``h^{k-1}_i`` (the model's own hidden state for
``k = 1``) and the embedding of token ``i + k``, both RMS-normalised, concatenated and projected back to the hidden
width, then a residual FFN block initialised from the model's last FFN, and predicts token ``i + k + 1``. The
``medusa`` option is a residual ``h + SiLU(W h)`` per depth that reads the hidden state only.

Two departures from DeepSeek-V3, both for drafting speed on small models:

- The block has no attention sub-layer. The hidden state already summarises the context; attention would need
  a KV cache per depth that follows every accepted token. The FFN keeps the block's capacity.
- Drafts are projected onto a *draft vocabulary*: the ``draft_vocab`` tokens the model predicts most often on
  the training text, rows of the model's own LM head. SmolLM2's head is a fifth of its weights; a draft only
  needs a good argmax, and verification by the full model keeps the output exact whatever the draft.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, MatchError
from ..profile import MTPConfig
from ..runtime.draft_tree import DEFAULT_RANK_SHARES, DraftTree
from .kv_cache import CachedProgram
from .moe_carve import DenseRows, row_readings, unsupported_reason
from .moe_ops import ACTIVATIONS
from .mtp_drafting import stored_linear

FORMAT = "dscompile-mtp-1"
AUTO_TREE_NODES = 7
"""The largest tree drafted by default: with the root, 8 rows a sequence, what the thin-product kernels multiply in
one pass over the weights. SmolLM2 at batch 1, depth 3, on a 2-core Xeon: 1.53x plain decoding with a chain, 1.59x
with 6 nodes, 1.36x with 8 (9 rows take a second pass)."""


class RMSNorm(nn.Module):
    def __init__(self, width: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class FFNBlock(nn.Module):
    """Pre-norm residual FFN, ``x + down(act(gate(n(x))) * up(n(x)))``, weights copied from the model's FFN."""

    def __init__(self, rows: DenseRows):
        super().__init__()
        self.norm = RMSNorm(rows.up.shape[1])
        self.activation = rows.activation if rows.activation in ACTIVATIONS else "silu"
        self.up = nn.Linear(rows.up.shape[1], rows.up.shape[0], bias=rows.up_bias is not None)
        self.gate = None if rows.gate is None else nn.Linear(rows.up.shape[1], rows.up.shape[0],
                                                             bias=rows.gate_bias is not None)
        self.down = nn.Linear(rows.up.shape[0], rows.up.shape[1], bias=rows.down_bias is not None)
        with torch.no_grad():
            for lin, weight, bias in ((self.up, rows.up, rows.up_bias), (self.gate, rows.gate, rows.gate_bias),
                                      (self.down, rows.down.T, rows.down_bias)):
                if lin is None or weight is None:
                    continue
                lin.weight.copy_(weight)
                if bias is not None:
                    lin.bias.copy_(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.norm(x)
        a = ACTIVATIONS[self.activation](self.up(n) if self.gate is None else self.gate(n))
        if self.gate is not None:
            a = a * self.up(n)
        return x + self.down(a)


class DeepSeekHead(nn.Module):
    """``h^k = block(proj([norm(h^{k-1}); norm(emb(t))]))``."""

    def __init__(self, hidden: int, rows: DenseRows):
        super().__init__()
        self.norm_h = RMSNorm(hidden)
        self.norm_e = RMSNorm(hidden)
        self.proj = nn.Linear(2 * hidden, hidden, bias=False)
        with torch.no_grad():  # start as the sum of the two normalised inputs
            self.proj.weight.copy_(torch.cat([torch.eye(hidden), torch.eye(hidden)], 1) * 0.5)
        self.block = FFNBlock(rows)
        self.norm_out = RMSNorm(hidden)

    def forward(self, h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        return self.block(self.proj(torch.cat([self.norm_h(h), self.norm_e(e)], -1)))


class MedusaHead(nn.Module):
    """``h + SiLU(W norm(h))``, ``W`` zero at the start; the drafted token is not read."""

    def __init__(self, hidden: int):
        super().__init__()
        self.norm = RMSNorm(hidden)
        self.lin = nn.Linear(hidden, hidden)
        nn.init.zeros_(self.lin.weight)
        nn.init.zeros_(self.lin.bias)
        self.norm_out = RMSNorm(hidden)

    def forward(self, h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        return h + F.silu(self.lin(self.norm(h)))


class MTPHeads(nn.Module):
    """The heads, the draft vocabulary and its projection; parameters in fp32 whatever the model's dtype.

    The token embedding and the LM-head rows are the model's own (buffers, not trained, not saved).
    """

    def __init__(self, config: MTPConfig, hidden: int, embedding: torch.Tensor, head_weight: torch.Tensor,
                 head_bias: torch.Tensor | None, rows: DenseRows | None, model_hash: str):
        super().__init__()
        self.config = config
        self.hidden = hidden
        self.model_hash = model_hash
        self.trained = False  # set by train_mtp and by load
        self.vocab = head_weight.shape[0]
        self.register_buffer("embedding", embedding.detach(), persistent=False)
        self.register_buffer("head_weight", head_weight.detach(), persistent=False)
        self.register_buffer("head_bias", None if head_bias is None else head_bias.detach(), persistent=False)
        if config.head == "deepseek" and rows is None:
            raise MatchError("the deepseek MTP head copies the model's last FFN, and none was matched; use "
                             "MTPConfig(head='medusa')")
        self.heads = nn.ModuleList(DeepSeekHead(hidden, rows) if rows is not None and config.head == "deepseek"
                                   else MedusaHead(hidden) for _ in range(config.depth))
        self.register_buffer("draft_ids", torch.arange(min(config.draft_vocab, self.vocab)))
        self._project()
        # Per depth, how often the model's token is the head's r-th choice (train_mtp measures it; trees use it).
        self.rank_shares: list[list[float]] | None = None

    @property
    def depth(self) -> int:
        return len(self.heads)

    def set_draft_vocab(self, ids: torch.Tensor) -> None:
        """Draft over these token ids (sorted, unique)."""
        self.draft_ids = ids.unique().to(self.draft_ids.device)
        self._project()

    def _project(self) -> None:
        self.draft_weight = self.head_weight[self.draft_ids].float()
        self.draft_bias = None if self.head_bias is None else self.head_bias[self.draft_ids].float()

    @torch.no_grad()
    def match_output_scale(self, hidden: torch.Tensor) -> None:
        """Start every head's output norm at a tenth of the per-dimension scale of the model's own hidden states: the
        LM head expects the final norm's scale, and a tenth keeps the untrained drafts' logits soft (initial
        cross-entropy 12 on SmolLM2, against 15 with a norm of ones and 85 at the full scale)."""
        scale = 0.1 * hidden.reshape(-1, hidden.shape[-1]).float().pow(2).mean(0).sqrt()
        for head in self.heads:
            head.norm_out.weight.copy_(scale)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.embedding(tokens, self.embedding).float()

    def step(self, k: int, h: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Head ``k`` (0-based): its state, its output (the hidden state it predicts the LM head will read) and
        that output's logits over the draft vocabulary."""
        head = self.heads[k]
        state = head(h.float(), self.embed(tokens))
        out = head.norm_out(state)
        return state, out, stored_linear(out, self.draft_weight, self.draft_bias)

    def chain(self, h: torch.Tensor, tokens: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Training: every depth's ``(output, logits)`` at every position it covers. ``h [b, t, hidden]`` are the
        model's hidden states over ``tokens [b, t]``. Head ``k`` (0-based) covers positions ``i = 0 .. t-2-k``,
        reads token ``i + k + 1`` and predicts the model's hidden state and choice at position ``i + k + 1``."""
        result = []
        state = h
        for k in range(self.depth):
            valid = tokens.shape[1] - 1 - k
            state, out, logits = self.step(k, (state if self.config.head == "deepseek" else h)[:, :valid],
                                           tokens[:, k + 1:k + 1 + valid])
            result.append((out, logits))
        return result

    def tree(self, nodes: int | None = None) -> DraftTree:
        """The draft tree of ``nodes`` tokens (``config.draft_nodes``; when that is None, twice the depth up to
        :data:`AUTO_TREE_NODES`; a chain at the depth or below), the most probable paths by the measured rank shares
        (:data:`DEFAULT_RANK_SHARES` before any)."""
        nodes = nodes if nodes is not None else self.config.draft_nodes
        return draft_tree(self.rank_shares or [list(DEFAULT_RANK_SHARES)] * self.depth, self.depth, nodes)

    @torch.no_grad()
    def draft_tree(self, h: torch.Tensor, token: torch.Tensor, tree: DraftTree) -> torch.Tensor:
        """Greedy drafting of a tree after ``token`` (``h [b, hidden]``, ``token [b]``): ``[b, tree.size]`` ids,
        node ``j``'s in column ``j - 1``. Each depth's head runs once, on all the nodes the next depth grows from."""
        states, tokens = {0: h.float()}, {0: token}
        drafted: dict[int, torch.Tensor] = {}
        for k, level in enumerate(tree.levels()):
            parents = sorted({tree.parents[j - 1] for j in level})
            new_state, _, logits = self.step(k, torch.stack([states[p] for p in parents], 1),
                                             torch.stack([tokens[p] for p in parents], 1))
            top = logits.topk(1 + max(tree.ranks[j - 1] for j in level), -1).indices  # [b, parents, ranks]
            for j in level:
                i = parents.index(tree.parents[j - 1])
                drafted[j] = tokens[j] = self.draft_ids[top[:, i, tree.ranks[j - 1]]]
                states[j] = new_state[:, i] if self.config.head == "deepseek" else states[0]
        return torch.stack([drafted[j] for j in range(1, tree.size + 1)], 1)

    @torch.no_grad()
    def draft(self, h: torch.Tensor, token: torch.Tensor, pick: object = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``depth`` drafted tokens after ``token`` per row (``h [b, hidden]``, ``token [b]``): ids ``[b, depth]``
        and their logits over the draft vocabulary ``[b, depth, draft]``. ``pick`` maps logits to draft-vocabulary
        indices (argmax when None)."""
        tokens, logits = [], []
        state, tok = h, token
        for k in range(self.depth):
            new_state, _, lg = self.step(k, state, tok)
            if self.config.head == "deepseek":
                state = new_state
            index = lg.argmax(-1) if pick is None else pick(lg)  # type: ignore[operator]
            tok = self.draft_ids[index]
            tokens.append(tok)
            logits.append(lg)
        return torch.stack(tokens, 1), torch.stack(logits, 1)

    def save(self, path: str | Path) -> None:
        """The heads and the draft vocabulary as safetensors, with the model's hash and the config."""
        from safetensors.torch import save_file

        tensors = {f"heads.{k}": v.detach().contiguous() for k, v in self.heads.state_dict().items()}
        tensors["draft_ids"] = self.draft_ids.contiguous()
        meta = {"format": FORMAT, "model_hash": self.model_hash, "hidden": str(self.hidden), "vocab": str(self.vocab),
                "config": json.dumps({"depth": self.config.depth, "head": self.config.head})}
        if self.rank_shares is not None:
            meta["rank_shares"] = json.dumps(self.rank_shares)
        save_file(tensors, str(path), metadata=meta)

    def load(self, path: str | Path) -> None:
        """Load heads saved by :meth:`save` (the first ``depth`` of them); refuse heads of another model or kind."""
        from safetensors import safe_open

        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"MTP heads file {p} does not exist")
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a mapping)
        if meta.get("format") != FORMAT:
            raise ConfigError(f"{p} is not a dscompile MTP heads file (format {meta.get('format')!r})")
        saved = json.loads(meta.get("config", "{}"))
        if saved.get("head") != self.config.head or saved.get("depth", 0) < self.depth:
            raise ConfigError(f"{p} holds {saved.get('depth')} {saved.get('head')!r} head(s), but the profile asks "
                              f"for {self.depth} {self.config.head!r} head(s)")
        if meta.get("model_hash") != self.model_hash:
            raise ConfigError(f"{p} was trained for another model (hash {meta.get('model_hash')}, this model "
                              f"{self.model_hash}); train heads for this model with dscompile.train_mtp")
        # Heads trained deeper serve a shallower profile: head k reads only heads before it.
        state = {k.removeprefix("heads."): v for k, v in tensors.items()
                 if k.startswith("heads.") and int(k.split(".")[1]) < self.depth}
        try:
            self.heads.load_state_dict(state)
        except RuntimeError as exc:
            raise ConfigError(f"{p}: the heads do not fit this model: {exc}") from exc
        self.set_draft_vocab(tensors["draft_ids"])
        shares = meta.get("rank_shares")
        self.rank_shares = json.loads(shares)[:self.depth] if shares else None
        self.trained = True


def draft_tree(shares: list[list[float]], depth: int, nodes: int | None = None) -> DraftTree:
    """The tree of ``nodes`` drafts at most ``depth`` deep by rank ``shares`` (None: twice the depth, up to
    :data:`AUTO_TREE_NODES`); the chain when that is not more than the depth."""
    nodes = nodes if nodes is not None else max(min(2 * depth, AUTO_TREE_NODES), depth)
    return DraftTree.chain(nodes) if nodes <= depth else DraftTree.best(shares[:depth], nodes)


def model_hash(program: CachedProgram) -> str:
    """A fingerprint of the model the heads draft for: its LM head's shape and a sample of its weights."""
    head = program.matches.lm_head[0].linear.weight.tensor
    assert head is not None
    flat = head.detach().reshape(-1)
    sample = flat[:: max(1, flat.numel() // 65536)].float().cpu().numpy().tobytes()
    return hashlib.sha256(repr(tuple(head.shape)).encode() + sample).hexdigest()[:16]


def build_heads(program: CachedProgram, config: MTPConfig) -> MTPHeads:
    """Heads for ``program``'s model, initialised from its last FFN (loaded from ``config.heads`` when set)."""
    if not program.matches.lm_head or program.embedding is None:
        raise MatchError("MTP needs the model's LM head and token embedding; neither was matched")
    lm = program.matches.lm_head[0].linear
    weight = lm.weight.tensor
    assert weight is not None
    weight = weight if lm.weight_layout == "out_in" else weight.T
    bias = lm.bias.tensor if lm.bias is not None else None
    if program.embedding.shape[1] != weight.shape[1]:
        raise MatchError(f"the token embedding is {program.embedding.shape[1]} wide but the LM head reads "
                         f"{weight.shape[1]}: the MTP heads cannot embed drafted tokens")
    ffns = [f for f in program.matches.ffn if unsupported_reason(f) is None]
    rows = row_readings(ffns[-1])[0] if ffns else None
    heads = MTPHeads(config, weight.shape[1], program.embedding, weight, bias, rows, model_hash(program))
    if config.heads is not None:
        heads.load(config.heads)
    return heads
