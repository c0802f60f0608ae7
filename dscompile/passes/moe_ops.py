"""The math of a carved FFN, as plain tensor ops with static shapes (Inductor fuses them; autograd runs them).

A carved FFN keeps the original's neurons, regrouped: ``n_shared`` always-on experts in one dense block, and
``R`` routed experts of ``m`` neurons each, stored as ``[R, m, hidden]`` blocks of gate rows, up rows and down
rows (the down projection transposed, so one expert's weights are three contiguous blocks). A linear router scores
the routed experts; a balancing bias shifts the choice only, and every chosen expert's output is added with weight
one, so with every expert chosen the result is the dense FFN's.

Two formulations of the same function:

- ``gathered`` (decode): each token multiplies by the blocks of its ``top_k`` experts only, as multiply-reduce
  loops into which Inductor fuses the gather, so the bytes read fall with the active fraction. Only while the
  blocks gathered (tokens x ``top_k``) are fewer than the experts: beyond that (batch 8 at ``top_k`` 24 of 56)
  the tokens' choices cover nearly every expert, and one pass over all of them, masked, reads less.
- ``native`` (CPU decode steps, set by ``lower.decode_step`` where the native kernels are built): the gathered
  function as one call of ``dscompile::moe_experts``, which reads each chosen expert's blocks once for all the
  tokens that chose it (SmolLM2, 64:8:24, batch 1: 51.5 against 46.5 tok/s gathered by Inductor). Where the
  gathered form gives way to the masked one, so does this: at batch 8 the masked form's BLAS-free thin products
  were faster (236 against 210 tok/s).
- ``masked`` (prefill, many tokens): every routed neuron is computed and unchosen experts are zeroed. On a CPU
  the experts of a fine-grained MoE are too narrow (24 neurons for SmolLM2 at 64 experts) for grouped matmuls to
  beat one dense matmul: ``torch._grouped_mm`` on CPU took 1.9x the dense time at 2,048 tokens.

Routed by activation (``MoEConfig(router="activation")``): every routed neuron's activation is computed (the gate
and up rows are all read), each expert is scored by its neurons' contribution ``sum |a_j| * |down row j|``, and only
the ``top_k`` best run their down rows (gathered at decode, masked at prefill). A learned router guesses which
experts matter before computing them and on a dense FFN guesses poorly (SmolLM2 at 50% active: +183% perplexity);
this choice is the contribution itself, so with one neuron per expert it is the per-token oracle (+4%), at the price
of reading two thirds of the FFN whatever ``top_k``. On a CPU without autograd the choice is the native kernels'
(``ops/activation_choice.cpp``): at decode ``dscompile::top_weighted_rows`` chooses and sums the chosen down rows in
one call (Inductor's topk and indexed reduction ran at half the dense decode speed), the masked form takes its mask
from ``dscompile::top_mask``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ops import native

ACTIVATION = "activation"
"""The ``routing`` value of experts chosen by their own activations (see the module's docstring)."""

NATIVE = "native"
"""The ``gathered`` value that asks for the native kernel (float32 CPU decode without autograd; otherwise the
gathered formulation)."""

ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


def route(x: torch.Tensor, router: torch.Tensor, bias: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices ``[tokens, top_k]`` of the experts each row of ``x`` (``[tokens, hidden]``) uses, and the weight of
    each: exactly one, but carrying the router scores' gradient (straight through), so healing trains the router."""
    scores = F.linear(x, router) + bias
    idx = scores.topk(top_k, dim=-1).indices
    return idx, 1.0 + (scores - scores.detach()).gather(1, idx)


def neuron_activations(x: torch.Tensor, gate: torch.Tensor | None, up: torch.Tensor, gate_bias: torch.Tensor | None,
             up_bias: torch.Tensor | None, activation: str) -> torch.Tensor:
    """``act(gate x) * up x`` (or ``act(up x)`` for a plain MLP) for a dense block of rows."""
    act = ACTIVATIONS[activation]
    u = F.linear(x, up, up_bias)
    return act(u) if gate is None else act(F.linear(x, gate, gate_bias)) * u


def activation_scores(a: torch.Tensor, weights: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Each expert's score ``[tokens, R]``: its neurons' contribution ``sum |a| * |down row|`` (``a``
    ``[tokens, R, m]`` the routed neurons' activations, ``weights`` ``[R, m]`` their down rows' norms), plus ``bias``
    (``[R]``), which shifts the choice."""
    return (a.abs() * weights).sum(-1) + bias


def route_by_activation(a: torch.Tensor, weights: torch.Tensor, bias: torch.Tensor, top_k: int) -> torch.Tensor:
    """Indices ``[tokens, top_k]`` of the experts with the best :func:`activation_scores`."""
    return activation_scores(a, weights, bias).topk(top_k, dim=-1, sorted=False).indices  # sorting: 3x the time


def moe_ffn(x: torch.Tensor, shared: tuple | None, experts: tuple, down_t: torch.Tensor, router: torch.Tensor,
            router_bias: torch.Tensor, down_bias: torch.Tensor | None, top_k: int, activation: str,
            gathered: bool | str, counts: torch.Tensor | None = None, offload: int | None = None,
            routing: str = "linear") -> torch.Tensor:
    """The carved FFN on ``x`` (``[..., hidden]``).

    ``shared`` is ``(gate, up, down, gate_bias, up_bias)`` with gate and up rows ``[S*m, hidden]``, down
    ``[hidden, S*m]`` (``nn.Linear`` layout) and biases ``[S*m]`` (gate and biases may be None), or None without
    shared experts. ``experts`` holds the routed experts' blocks: rows ``[R, m, hidden]`` (down too, so that one
    expert's down weights are contiguous for gathering) and biases ``[R, m]``; ``down_t`` is the same down weights
    in ``nn.Linear`` layout ``[hidden, R*m]``, which the masked formulation reads (a decode step's matmul by a
    ``[R*m, hidden]`` matrix takes 4x the time of one by its transpose through Inductor on a CPU). ``counts``
    (``[R]``, int64), when given, gains one per token for each expert it chose: the live expert load. ``offload``
    names the :class:`.moe_offload.ExpertStore` that holds the routed experts instead (``experts`` and ``down_t``
    are then None): they are computed by ``dscompile::moe_offloaded``, for inference only. ``routing`` is
    ``"linear"`` (``router`` ``[R, hidden]`` scores the input) or :data:`ACTIVATION` (``router`` ``[R, m]`` holds
    the routed neurons' down-row norms, which weigh their activations).
    """
    shape = x.shape
    hidden = shape[-1]
    rows = x.reshape(-1, hidden)
    if routing == ACTIVATION:
        out = _routed_by_activation(rows, experts, down_t, router, router_bias, top_k, activation, gathered, counts)
    else:
        idx, weight = route(rows, router, router_bias, top_k)
        _count(counts, idx)
        if offload is not None:
            out = torch.ops.dscompile.moe_offloaded(rows, idx, offload)
        else:
            out = _routed(rows, idx, weight, experts, down_t, top_k, activation, gathered)
    if shared is not None:
        s_gate, s_up, s_down, s_gate_bias, s_up_bias = shared
        out = out + F.linear(neuron_activations(rows, s_gate, s_up, s_gate_bias, s_up_bias, activation), s_down)
    if down_bias is not None:
        out = out + down_bias
    return out.reshape(*shape[:-1], hidden)


def _routed(rows: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor, experts: tuple, down_t: torch.Tensor,
            top_k: int, activation: str, gathered: bool | str) -> torch.Tensor:
    """The routed experts' part of :func:`moe_ffn`, from the experts in memory."""
    gate, up, down, gate_bias, up_bias = experts
    n_routed, width, _ = up.shape
    few = rows.shape[0] * top_k <= n_routed  # fewer blocks than experts: gather only those
    if (gathered == NATIVE and few and rows.dtype == torch.float32 and rows.device.type == "cpu"
            and not torch.is_grad_enabled()):
        out = torch.ops.dscompile.moe_experts(rows, idx, gate, up, down, gate_bias, up_bias, activation)
    elif gathered and few:
        picked = rows[:, None, None, :]
        u = (picked * up[idx]).sum(-1)  # multiply-reduce: Inductor fuses the gather in, nothing is copied
        if up_bias is not None:
            u = u + up_bias[idx]
        act = ACTIVATIONS[activation]
        if gate is None:
            a = act(u)
        else:
            g = (picked * gate[idx]).sum(-1)
            a = act(g if gate_bias is None else g + gate_bias[idx]) * u
        out = (a.unsqueeze(-1) * down[idx]).sum((1, 2))
    else:
        a = routed_activations(rows, experts, activation).view(-1, n_routed, width)
        out = _masked(a, torch.zeros(rows.shape[0], n_routed, dtype=a.dtype, device=a.device).scatter(1, idx, weight),
                      down_t)
    return out


def _masked(a: torch.Tensor, chosen: torch.Tensor, down_t: torch.Tensor) -> torch.Tensor:
    """The masked formulation: every routed neuron's activation (``a`` ``[tokens, R, m]``) weighted by its expert's
    entry of ``chosen`` (``[tokens, R]``, zero for the experts a token did not choose), through all routed down
    weights at once."""
    return F.linear((a * chosen.unsqueeze(-1)).view(a.shape[0], -1), down_t)


def routed_activations(rows: torch.Tensor, experts: tuple, activation: str) -> torch.Tensor:
    """Every routed neuron's activation ``[tokens, R * m]`` (``experts`` as in :func:`moe_ffn`)."""
    gate, up, _, gate_bias, up_bias = (None if t is None else t.flatten(0, 1) for t in experts)
    return neuron_activations(rows, gate, up, gate_bias, up_bias, activation)


def _count(counts: torch.Tensor | None, idx: torch.Tensor) -> None:
    """Add each token's chosen experts ``idx`` to the live load ``counts`` (when it is kept)."""
    if counts is not None:
        chosen_ids = idx.reshape(-1)
        counts.index_add_(0, chosen_ids, torch.ones_like(chosen_ids))


def _routed_by_activation(rows: torch.Tensor, experts: tuple, down_t: torch.Tensor, weights: torch.Tensor,
                          bias: torch.Tensor, top_k: int, activation: str, gathered: bool | str,
                          counts: torch.Tensor | None) -> torch.Tensor:
    """The routed part of :func:`moe_ffn` when the experts' activations choose them: every routed neuron is
    computed, the chosen experts' down rows are gathered (few tokens) or the others masked. Without autograd, on a
    CPU in float32, the choice is the native kernels' (``activation_choice.cpp``)."""
    _, up, down, _, _ = experts
    n_routed, width, _ = up.shape
    a = routed_activations(rows, experts, activation).view(-1, n_routed, width)
    few = rows.shape[0] * top_k <= n_routed
    native_choice = (rows.dtype == torch.float32 and rows.device.type == "cpu" and not torch.is_grad_enabled()
                     and not torch.compiler.is_exporting() and native.load())  # ONNX has no such ops
    if native_choice and gathered == NATIVE and few:  # the choice and the chosen rows in one call
        out, idx = torch.ops.dscompile.top_weighted_rows(activation_scores(a, weights, bias),
                                                         a.reshape(rows.shape[0], -1), down.flatten(0, 1), top_k)
        _count(counts, idx)
        return out
    if native_choice and not (gathered and few):
        chosen = torch.ops.dscompile.top_mask(activation_scores(a, weights, bias), top_k)
        if counts is not None:
            counts.add_(chosen.sum(0).to(counts.dtype))
    else:
        idx = route_by_activation(a.detach(), weights, bias, top_k)
        _count(counts, idx)
        if gathered and few:
            picked = a.gather(1, idx.unsqueeze(-1).expand(-1, -1, width))
            return (picked.unsqueeze(-1) * down[idx]).sum((1, 2))
        chosen = torch.zeros(rows.shape[0], n_routed, dtype=a.dtype, device=a.device).scatter(1, idx, 1.0)
    return _masked(a, chosen, down_t)
