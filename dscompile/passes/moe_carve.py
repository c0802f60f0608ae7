"""Carving one dense FFN into shared and routed experts, from what calibration saw (CMoE / MoEfication style).

1. The FFN's own weights are read as rows (``[neurons, hidden]`` for gate, up and down) whatever their layout:
   ``nn.Linear`` or GPT-2's ``Conv1D``, gate and up separate or fused. A fused gate/up is split both ways and the
   split that reproduces the recorded activations wins; a layer whose activations are not reproduced is refused.
2. Each neuron's contribution to a token is ``|a_j| * |down row j|``. The neurons most often among a token's
   top contributors become the shared experts; the rest are clustered by co-activation (cosine similarity of their
   contributions over the calibration tokens) into equal groups by a balanced k-means.
3. The router is fitted by ridge regression from the FFN input to each expert's total contribution (seconds on a
   CPU), and a DeepSeek-V3 style bias per expert, which changes the choice only, is tuned until the busiest
   expert's load is within ``MAXVIO_TARGET`` of the mean on the calibration tokens. (Fitting on one half and
   balancing on the other did not lower MaxVio on held-out text: its drift is topical, not overfitting.)
   With ``router="activation"`` nothing is fitted: the router holds each routed neuron's down-row norm, which
   weighs its activation, and the bias stays zero, since balancing would override the exact choice.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..errors import ConfigError
from ..patterns import FFNMatch
from ..patterns.walk import LinearInfo
from ..profile import MoEConfig
from .moe_ops import ACTIVATION, ACTIVATIONS, neuron_activations, route, route_by_activation, routed_activations

if TYPE_CHECKING:
    from .moe_offload import ExpertStore

MAXVIO_TARGET = 0.05
"""Balance aimed for on calibration tokens; held-out text drifts, and the acceptance bound there is 0.1."""

KMEANS_ROUNDS = 12
BALANCE_STEPS = 800


PARTS = ("gate", "up", "down", "gate_bias", "up_bias")
"""The parts of a block of experts, in the order :func:`.moe_ops.moe_ffn` reads them."""


def group(params: Mapping[str, Any], prefix: str) -> tuple:
    """``(gate, up, down, gate_bias, up_bias)`` of the ``shared`` or ``experts`` block in ``params`` (None where
    a part is absent)."""
    return tuple(params.get(f"{prefix}_{p}") for p in PARTS)


@dataclass
class DenseRows:
    """An FFN's weights as rows: ``a = act(gate x + gb) * (up x + ub)`` (no gate for a plain MLP), ``y = a down``."""

    gate: torch.Tensor | None
    up: torch.Tensor
    down: torch.Tensor
    gate_bias: torch.Tensor | None
    up_bias: torch.Tensor | None
    down_bias: torch.Tensor | None
    activation: str

    def neurons(self, x: torch.Tensor) -> torch.Tensor:
        return neuron_activations(x, self.gate, self.up, self.gate_bias, self.up_bias, self.activation)

    def float(self) -> DenseRows:
        """The rows in float32: calibration math runs in fp32 whatever the model's dtype."""
        def f(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.float()

        return DenseRows(f(self.gate), self.up.float(), self.down.float(), f(self.gate_bias), f(self.up_bias),
                         f(self.down_bias), self.activation)


@dataclass
class CarvedFFN:
    """One FFN as experts: ``shared`` and ``experts`` are ``(gate, up, down, gate_bias, up_bias)`` and ``down_t``
    the routed down weights in ``nn.Linear`` layout (see :func:`.moe_ops.moe_ffn`); ``order`` lists the original
    neuron ids, shared first, then expert by expert; ``routing`` is ``"linear"`` (``router`` scores the FFN input)
    or ``"activation"`` (``router`` holds the routed neurons' down-row norms, ``[R, m]``)."""

    shared: tuple | None
    experts: tuple
    down_t: torch.nn.Parameter | None
    router: torch.nn.Parameter
    router_bias: torch.nn.Parameter
    down_bias: torch.Tensor | None
    top_k: int
    activation: str
    order: torch.Tensor
    load: list[float] = field(default_factory=list)  # tokens per expert over the mean, on calibration tokens
    counts: torch.Tensor | None = None  # live: tokens that chose each expert since the runtime last reset it
    store: ExpertStore | None = None  # where the routed experts live once offloaded (``experts`` then all None)
    routing: str = "linear"

    def __post_init__(self) -> None:
        if self.counts is None:
            self.counts = torch.zeros(self.n_routed, dtype=torch.long, device=self.router.device)

    @property
    def maxvio(self) -> float:
        return max(self.load) - 1.0 if self.load else 0.0

    @property
    def n_routed(self) -> int:
        return self.store.n_experts if self.store is not None else int(self.experts[1].shape[0])

    def params(self) -> dict[str, torch.Tensor | None]:
        """Every tensor the carved FFN reads from memory, by a stable name (``shared_up``, ``router`` ...)."""
        out: dict[str, torch.Tensor | None] = {f"experts_{p}": t for p, t in zip(PARTS, self.experts)}
        if self.shared is not None:
            out.update({f"shared_{p}": t for p, t in zip(PARTS, self.shared)})
        out.update(down_t=self.down_t, router=self.router, router_bias=self.router_bias, down_bias=self.down_bias)
        return out

    def choose(self, x: torch.Tensor) -> torch.Tensor:
        """The experts (``[tokens, top_k]``) that FFN inputs ``x`` (``[tokens, hidden]``) choose."""
        with torch.no_grad():
            if self.routing != ACTIVATION:
                return route(x, self.router, self.router_bias, self.top_k)[0]
            a = routed_activations(x, self.experts, self.activation).view(x.shape[0], *self.router.shape)
            return route_by_activation(a, self.router, self.router_bias, self.top_k)

    def load_on(self, x: torch.Tensor) -> list[float]:
        """Tokens per expert over the mean (1.0 = balanced) when FFN inputs ``x`` choose."""
        return _load(self.choose(x), self.n_routed)

    def in_memory(self, action: str) -> None:
        """Refuse ``action`` (healing, saving) once the routed experts live in files."""
        if self.store is not None:
            raise ConfigError(f"cannot {action}: the routed experts are offloaded to files "
                              f"({self.store.path.parent}); {action} before offload_experts")

    @classmethod
    def from_params(cls, params: dict[str, torch.nn.Parameter], *, shared: bool, top_k: int, activation: str,
                    order: torch.Tensor, load: list[float], routing: str = "linear") -> CarvedFFN:
        """The inverse of :meth:`params` (missing parts are None); the routed down rows, a second layout of
        ``down_t``, are rebuilt from it when absent."""
        if "experts_down" not in params:
            down_t = params["down_t"]
            rows = down_t.detach().T.reshape(*params["experts_up"].shape[:2], down_t.shape[0]).contiguous()
            params = {**params, "experts_down": torch.nn.Parameter(rows, requires_grad=False)}
        return cls(shared=group(params, "shared") if shared else None, experts=group(params, "experts"),
                   down_t=params["down_t"], router=params["router"], router_bias=params["router_bias"],
                   down_bias=params.get("down_bias"), top_k=top_k, activation=activation, order=order, load=load,
                   routing=routing)

    def sync_rows(self) -> None:
        """Copy ``down_t`` into the routed down rows: healing trains the masked formulation (prefill), which reads
        ``down_t``; decode gathers the rows."""
        down = self.experts[2]
        if down is None:  # offloaded: nothing was trained
            return
        with torch.no_grad():
            down.copy_(self.down_t.T.reshape(down.shape))

    def offloaded_params(self) -> int:
        """The routed experts' parameters in the store's file, counted as the in-memory layouts were (``down_t``
        included), so a report reads the same before and after offloading."""
        if self.store is None:
            return 0
        return self.n_routed * (self.store.params_per_expert + self.store.width * self.store.hidden)

    def active_params(self) -> tuple[int, int]:
        """(parameters a token reads, parameters held) in this FFN, router included. ``down_t`` is held but is a
        second layout of the routed down weights: a token reads one layout or the other, counted once."""
        def size(t: tuple | None) -> int:
            return sum(x.numel() for x in t if x is not None) if t is not None else 0

        fixed = size(self.shared) + self.router.numel() + self.router_bias.numel() + \
            (self.down_bias.numel() if self.down_bias is not None else 0)
        if self.store is not None:  # counted as in memory: where the weights live does not change the model
            per = self.store.params_per_expert
            return fixed + per * self.top_k, fixed + self.offloaded_params()
        routed = size(self.experts)
        held = fixed + routed + self.down_t.numel()
        if self.routing == ACTIVATION:  # every routed gate and up row is read, the chosen experts' down rows only
            down = self.experts[2].numel()
            return fixed + routed - down + down * self.top_k // self.n_routed, held
        return fixed + routed * self.top_k // self.n_routed, held


def _rows(lin: LinearInfo) -> torch.Tensor:
    w = lin.weight.tensor
    assert w is not None
    return w.detach() if lin.weight_layout == "out_in" else w.detach().T


def _bias(lin: LinearInfo | None) -> torch.Tensor | None:
    return lin.bias.tensor.detach() if lin is not None and lin.bias is not None and lin.bias.tensor is not None \
        else None


def unsupported_reason(ffn: FFNMatch) -> str | None:
    """Why an FFN cannot be carved, or None."""
    if ffn.activation not in ACTIVATIONS:
        return f"activation {ffn.activation!r} has no carved form (supported: {', '.join(ACTIVATIONS)})"
    lins = [x for x in (ffn.up, ffn.gate, ffn.down) if x is not None]
    if any(x.weight.tensor is None for x in lins):
        return "the FFN weights are not known at compile time"
    return None


def row_readings(ffn: FFNMatch) -> list[DenseRows]:
    """The ways to read the FFN's weights as rows: one, or two for a fused gate/up (gate first, then up first)."""
    down = _rows(ffn.down).T  # the down projection's rows: one per neuron
    if ffn.fused_gate_up:
        both, bias = _rows(ffn.up), _bias(ffn.up)
        n = ffn.intermediate_size
        halves = [(both[:n], both[n:], None if bias is None else bias[:n], None if bias is None else bias[n:])]
        halves.append((halves[0][1], halves[0][0], halves[0][3], halves[0][2]))
        return [DenseRows(g, u, down, gb, ub, _bias(ffn.down), ffn.activation) for g, u, gb, ub in halves]
    gate = _rows(ffn.gate) if ffn.gate is not None else None
    return [DenseRows(gate, _rows(ffn.up), down, _bias(ffn.gate), _bias(ffn.up), _bias(ffn.down), ffn.activation)]


def dense_rows(ffn: FFNMatch, x: torch.Tensor, a: torch.Tensor) -> DenseRows | str:
    """The FFN's weights as rows, checked against calibration: ``x`` (inputs) must give ``a`` (the activations
    recorded at the down projection's input). Returns the reason when no reading of the weights does."""
    worst = float("inf")
    for rows in row_readings(ffn):
        if rows.up.shape[0] != a.shape[-1]:
            continue
        # a wrong reading is off by the activations' own size; a right one by the model dtype's rounding
        tolerance = max(1e-4, 16 * torch.finfo(rows.up.dtype).eps)
        err = (rows.float().neurons(x.float()) - a.float()).abs().max().item()
        worst = min(worst, err)
        if err <= tolerance * max(a.abs().max().item(), 1.0):
            return rows
    return f"the carved neurons do not reproduce the FFN's activations (max error {worst:.3g})"


def carve(ffn_rows: DenseRows, x: torch.Tensor, a: torch.Tensor, config: MoEConfig) -> CarvedFFN:
    """Experts for one FFN from ``x`` (``[tokens, hidden]`` inputs) and ``a`` (``[tokens, neurons]`` activations)."""
    dtype = ffn_rows.up.dtype
    ffn_rows, x, a = ffn_rows.float(), x.float(), a.float()
    n = ffn_rows.up.shape[0]
    width = check_split(n, config)
    contrib = a.abs() * ffn_rows.down.norm(dim=1)
    n_shared = config.n_shared * width
    shared = _most_active(contrib, config.active_fraction)[:n_shared]
    rest = torch.ones(n, dtype=torch.bool)
    rest[shared] = False
    routed_ids = rest.nonzero().squeeze(1)
    groups = balanced_clusters(contrib[:, routed_ids], config.n_experts - config.n_shared, width)
    experts = routed_ids[groups]  # [R, m] neuron ids
    order = torch.cat([shared, experts.reshape(-1)])
    if config.router == ACTIVATION:
        router, bias = ffn_rows.down[experts].norm(dim=-1), torch.zeros(experts.shape[0])
        load = _load(route_by_activation(a[:, experts], router, bias, config.top_k), experts.shape[0])
    else:
        router, bias = fit_router(x, contrib[:, experts].sum(-1))
        bias, load = balance(x, router, bias, config.top_k)
    routed = _block(ffn_rows, experts, dtype)
    return CarvedFFN(
        shared=_block(ffn_rows, shared, dtype, linear_down=True) if n_shared else None,
        experts=routed, down_t=_parameter(routed[2].reshape(-1, routed[2].shape[-1]).T, dtype),
        router=_parameter(router, dtype), router_bias=_parameter(bias, dtype),
        down_bias=None if ffn_rows.down_bias is None else _parameter(ffn_rows.down_bias, dtype),
        top_k=config.top_k, activation=ffn_rows.activation, order=order, load=load, routing=config.router,
    )


def check_split(neurons: int, config: MoEConfig) -> int:
    """Neurons per expert; refuse expert counts that do not divide the FFN width."""
    if neurons % config.n_experts:
        near = sorted((d for d in range(2, neurons + 1) if neurons % d == 0), key=lambda d: abs(d - config.n_experts))
        raise ConfigError(f"moe.n_experts={config.n_experts} does not divide the FFN width {neurons}: experts must be "
                          f"of equal size; nearest that do: {', '.join(map(str, sorted(near[:4])))}")
    return neurons // config.n_experts


def _most_active(contrib: torch.Tensor, fraction: float) -> torch.Tensor:
    """Neuron ids by how often each is among a token's top ``fraction`` of contributors, most often first."""
    k = max(1, round(fraction * contrib.shape[1]))
    top = contrib.topk(k, dim=1).indices
    rate = torch.zeros(contrib.shape[1]).index_add_(0, top.reshape(-1), torch.ones(top.numel()))
    return rate.argsort(descending=True, stable=True)


def balanced_clusters(contrib: torch.Tensor, groups: int, size: int) -> torch.Tensor:
    """Positions ``[groups, size]`` of the columns of ``contrib`` (``[tokens, neurons]``, ``groups * size``
    neurons), grouped so that neurons active on the same tokens share a group: k-means on cosine similarity with
    every group exactly ``size`` strong. Experts of one neuron each have nothing to group."""
    if size == 1:
        return torch.arange(groups).view(groups, 1)
    feats = torch.nn.functional.normalize(contrib.T.double(), dim=1)
    gen = torch.Generator().manual_seed(0)
    centroids = feats[torch.randperm(feats.shape[0], generator=gen)[:groups]]
    assign = torch.zeros(feats.shape[0], dtype=torch.long)
    for _ in range(KMEANS_ROUNDS):
        assign = _capacity_assign(feats @ centroids.T, size)
        centroids = torch.nn.functional.normalize(
            torch.zeros_like(centroids).index_add_(0, assign, feats), dim=1)
    return assign.argsort(stable=True).view(groups, size)


def _capacity_assign(sim: torch.Tensor, size: int) -> torch.Tensor:
    """Each row to its most similar column with at most ``size`` rows per column: full columns keep their most
    similar rows and the others move to their next best column that has room."""
    sim = sim.clone()
    assign = torch.full((sim.shape[0],), -1, dtype=torch.long)
    room = torch.full((sim.shape[1],), size, dtype=torch.long)
    while (assign < 0).any():
        free = (assign < 0).nonzero().squeeze(1)
        best = sim[free].argmax(1)
        for col in best.unique().tolist():
            rows = free[best == col]
            keep = rows[sim[rows, col].argsort(descending=True)[:int(room[col])]]
            assign[keep] = col
            room[col] -= keep.numel()
            if room[col] == 0:
                sim[:, col] = -float("inf")
    return assign


def fit_router(x: torch.Tensor, scores: torch.Tensor, ridge: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """A linear router ``x W^T + b`` fitted by ridge regression to ``scores`` (``[tokens, experts]``)."""
    xd = torch.cat([x.double(), torch.ones(x.shape[0], 1, dtype=torch.float64)], 1)
    gram = xd.T @ xd
    gram += ridge * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=torch.float64)
    solution = torch.linalg.solve(gram, xd.T @ scores.double())
    return solution[:-1].T.float().contiguous(), solution[-1].float()


def expert_load(x: torch.Tensor, router: torch.Tensor, bias: torch.Tensor, top_k: int) -> list[float]:
    """Tokens routed to each expert over the mean count (1.0 = perfectly balanced)."""
    return _load(route(x, router, bias, top_k)[0], router.shape[0])


def _load(idx: torch.Tensor, n_experts: int) -> list[float]:
    """Tokens per expert over the mean count, from each token's chosen experts ``idx``."""
    counts = torch.zeros(n_experts).index_add_(0, idx.reshape(-1), torch.ones(idx.numel()))
    return (counts / counts.mean()).tolist()


def balance(x: torch.Tensor, router: torch.Tensor, bias: torch.Tensor, top_k: int) -> tuple[torch.Tensor, list[float]]:
    """The router bias plus a balancing term per expert (DeepSeek-V3's update: lower the busy experts, raise the
    idle ones), until MaxVio on ``x`` is at most ``MAXVIO_TARGET``; the best found and its loads."""
    scores = torch.nn.functional.linear(x, router) + bias
    step = 0.02 * scores.std().item()
    shift = torch.zeros_like(bias)
    best = (float("inf"), bias, [])
    for i in range(BALANCE_STEPS):
        load = expert_load(x, router, bias + shift, top_k)
        vio = max(load) - 1.0
        if vio < best[0]:
            best = (vio, bias + shift, load)
        if vio <= MAXVIO_TARGET:
            break
        shift -= step / (1 + i / 50) * (torch.tensor(load) - 1.0)  # decaying: a fixed step ends up oscillating
    return best[1], best[2]


def _block(rows: DenseRows, ids: torch.Tensor, dtype: torch.dtype, linear_down: bool = False) -> tuple:
    """The rows of neurons ``ids`` (``[n]`` shared or ``[experts, m]`` routed) as new parameters of ``dtype``;
    with ``linear_down`` the down weights in ``nn.Linear`` layout ``[hidden, n]``."""
    def take(t: torch.Tensor | None) -> torch.nn.Parameter | None:
        return None if t is None else _parameter(t[ids], dtype)

    down = _parameter(rows.down[ids].T, dtype) if linear_down else take(rows.down)
    return take(rows.gate), take(rows.up), down, take(rows.gate_bias), take(rows.up_bias)


def _parameter(t: torch.Tensor, dtype: torch.dtype) -> torch.nn.Parameter:
    return torch.nn.Parameter(t.detach().to(dtype).contiguous().clone(), requires_grad=False)
