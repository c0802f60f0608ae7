"""What a cheaper choice of FFN neurons costs on the embedded model: the quality side of MoE decode speed.

Usage: .venv/bin/python bench/moe_choice.py [--ranks 64,128,256] [--fractions 0.5,0.25] [--out ...]

At batch 1 a MoE is faster than the dense FFN only if choosing the neurons reads fewer bytes than the rows it
skips. The exact per-token choice (``router="activation"``: every neuron's ``|act(gate . x) * (up . x)|`` times
its down row's norm) reads all gate and up rows, so only the down rows' bytes fall: at most 1.11x dense at batch 1
at 50% active on SmolLM2, whose attention and tied LM head are 41% of the bytes a token reads. This script measures
the cheaper choices on SmolLM2's own FFNs, each chosen neuron then computed exactly, the rest masked:

- ``exact``: the activation router's choice (reads gate and up: 2/3 of the FFN's bytes before any down row);
- ``gate``: the gate alone, ``|act(gate . x)|`` times the neuron's mean ``|up . x|`` on calibration text and its
  down row's norm (CATS-style; reads 1/3 of the FFN's bytes, then the chosen neurons' up and down rows);
- ``lowrank-r``: gate and up predicted through rank-``r`` whitened SVDs of their weights (the calibration inputs'
  covariance), scored like ``exact`` (reads ``2 r (hidden + ffn)`` weights: 0.10, 0.20 and 0.41 of the FFN's at r
  64, 128 and 256 on SmolLM2).

Calibration: 16 windows of 256 tokens of Python's documentation topics; perplexity on 6 held-out windows of docs
and of Python source, as in ``bench/moe.py``. This probes the model's FFN through forward hooks on its MLP modules,
not dscompile's rewrite, whose ``exact`` figures are in ``bench/moe.py``'s activation configs.
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import torch

from dscompile import evaluate, models

sys.path.insert(0, str(Path(__file__).parent))
from mla import text_sets, write_result  # noqa: E402


def whitened_factors(weight: torch.Tensor, cov: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` with ``x @ A @ B`` the best rank-``rank`` approximation of ``x @ weight.T`` for inputs of
    covariance ``cov``: the SVD of ``weight @ cov^(1/2)``, truncated."""
    evals, evecs = torch.linalg.eigh(cov)
    evals = evals.clamp_min(evals.max() * 1e-8)
    root, inv_root = evecs * evals.sqrt() @ evecs.T, evecs * evals.rsqrt() @ evecs.T
    u, s, vh = torch.linalg.svd(weight.double() @ root, full_matrices=False)
    return (vh[:rank] @ inv_root).T.float(), (u[:, :rank] * s[:rank]).T.float()


class ChoiceProbe:
    """Replaces each Llama-style MLP's forward: records calibration statistics, or keeps each token's top fraction
    of neurons by the current rule."""

    def __init__(self, mlps: list[torch.nn.Module]):
        self.mlps, self.rule, self.fraction = mlps, None, 1.0
        self.cov: dict[int, torch.Tensor] = {}
        self.up_abs: dict[int, torch.Tensor] = {}
        self.tokens: dict[int, int] = {}
        self.factors: dict[tuple[int, int], tuple] = {}
        for i, mlp in enumerate(mlps):
            mlp.forward = self._forward(i, mlp)

    def _forward(self, i: int, mlp: torch.nn.Module):
        down_norm = mlp.down_proj.weight.norm(dim=0)

        def forward(x: torch.Tensor) -> torch.Tensor:
            gate, up = mlp.gate_proj(x), mlp.up_proj(x)
            a = mlp.act_fn(gate) * up
            if self.rule == "record":
                flat = x.reshape(-1, x.shape[-1]).double()
                self.cov[i] = self.cov.get(i, 0) + flat.T @ flat
                self.up_abs[i] = self.up_abs.get(i, 0) + up.abs().reshape(-1, up.shape[-1]).sum(0)
                self.tokens[i] = self.tokens.get(i, 0) + flat.shape[0]
            if self.rule in (None, "record"):
                return mlp.down_proj(a)
            if self.rule == "exact":
                score = a.abs() * down_norm
            elif self.rule == "gate":
                score = mlp.act_fn(gate).abs() * (self.up_abs[i] / self.tokens[i]) * down_norm
            else:
                (ga, gb), (ua, ub) = self.factors[(i, int(self.rule.split("-")[1]))]
                score = (mlp.act_fn(x @ ga @ gb) * (x @ ua @ ub)).abs() * down_norm
            keep = score.topk(int(a.shape[-1] * self.fraction), -1).indices
            return mlp.down_proj(a * torch.zeros_like(a).scatter(-1, keep, 1.0))

        return forward

    def fit_low_rank(self, rank: int) -> None:
        for i, mlp in enumerate(self.mlps):
            self.factors[(i, rank)] = (whitened_factors(mlp.gate_proj.weight, self.cov[i], rank),
                                       whitened_factors(mlp.up_proj.weight, self.cov[i], rank))


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", default="64,128,256")
    parser.add_argument("--fractions", default="0.5,0.25")
    parser.add_argument("--out", default="bench/results/moe_choice.json")
    args = parser.parse_args()
    model, tokenizer = models.load("smollm2")
    calibration, held_docs, held_code = text_sets(tokenizer, 16, 6, held_after=64)  # the quality tables' held-out sets
    held = {"docs": held_docs, "code": held_code}
    probe = ChoiceProbe([layer.mlp for layer in model.model.layers])
    probe.rule = "record"
    for window in calibration:
        model(window)
    ranks = [int(r) for r in args.ranks.split(",")]
    for rank in ranks:
        probe.fit_low_rank(rank)
    probe.rule = None
    baseline = {domain: evaluate.perplexity(lambda x: model(x).logits, windows) for domain, windows in held.items()}
    print(f"dense: docs {baseline['docs']:.3f}, code {baseline['code']:.3f}", flush=True)
    rows = []
    for fraction in (float(f) for f in args.fractions.split(",")):
        for rule in ["exact", "gate", *(f"lowrank-{r}" for r in ranks)]:
            probe.rule, probe.fraction = rule, fraction
            row = {"rule": rule, "active": fraction}
            for domain, windows in held.items():
                ppl = evaluate.perplexity(lambda x: model(x).logits, windows)
                row[f"ppl_{domain}"], row[f"ppl_{domain}_change_pct"] = ppl, 100 * (ppl / baseline[domain] - 1)
            rows.append(row)
            print(f"{fraction:.0%} {rule}: docs {row['ppl_docs_change_pct']:+.1f}%, "
                  f"code {row['ppl_code_change_pct']:+.1f}%", flush=True)
    write_result(Path(args.out), {"machine": platform.processor() or platform.machine(), "baseline": baseline,
                                  "rows": rows})


if __name__ == "__main__":
    main()
