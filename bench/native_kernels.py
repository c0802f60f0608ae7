"""The native decode kernels alone, at SmolLM2-135M's shapes: attention by number of queries, thin products by rows.

Usage: .venv/bin/python bench/native_kernels.py [--slots 328] [--filled 260] [--rows 1,5,8,16] [--out ...]

- ``decode_attention``: 9 query heads on 3 KV heads of 64 dims, a static cache of ``--slots`` slots of which
  ``--filled`` are valid (a 128-token prompt plus 128 new tokens and the drafting slack), for 1 to 8 queries (a
  plain step, a draft tree's verification).
- ``thin_linear``: one decode step's products (30 layers of q/k/v, o, gate/up and down weights, then the LM
  head), each layer its own weights so that the step streams 526 MB from memory as the model does (this machine's
  last-level cache may be large), at each row count; and the draft heads' products (4 heads and the 4,096-row draft
  projection, read once a depth) with float32 and with bfloat16 weights.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

from dscompile.ops import native

sys.path.insert(0, str(Path(__file__).parent))
from mla import write_result  # noqa: E402

HIDDEN, FFN, KV, LAYERS, VOCAB = 576, 1536, 192, 30, 49152


def _mean_us(fn, reps: int) -> float:
    for _ in range(max(3, reps // 10)):
        fn()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) / reps * 1e6


def attention(slots: int, filled: int) -> dict[int, float]:
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(1, 3, slots, 64, generator=g), torch.randn(1, 3, slots, 64, generator=g)
    out = {}
    for queries in (1, 2, 4, 8):
        q = torch.randn(1, 9, queries, 64, generator=g)
        mask = torch.zeros(1, 1, queries, slots)
        mask[..., filled:] = torch.finfo(torch.float32).min
        out[queries] = _mean_us(lambda q=q, mask=mask: torch.ops.dscompile.decode_attention(q, k, v, mask, 0.125),
                                300)
    return out


def step_products(rows: int, layers: list[dict[str, list[torch.Tensor]]], head: torch.Tensor) -> float:
    """Milliseconds of one decode step's products at ``rows`` rows (each weight read from memory)."""
    x, wide = torch.randn(rows, HIDDEN), torch.randn(rows, FFN)
    start = time.perf_counter()
    for layer in layers:
        torch.ops.dscompile.thin_linear_many(x, layer["qkv"], [None] * 3)
        torch.ops.dscompile.thin_linear(x, layer["o"][0], None)
        torch.ops.dscompile.thin_linear_many(x, layer["gate_up"], [None] * 2)
        torch.ops.dscompile.thin_linear(wide, layer["down"][0], None)
    torch.ops.dscompile.thin_linear(x, head, None)
    return (time.perf_counter() - start) * 1e3


def drafting_products(dtype: torch.dtype, rows: int = 2) -> float:
    """Milliseconds of 4 draft heads' products and their draft projections (each weight read from memory)."""
    g = torch.Generator().manual_seed(1)
    heads = [[torch.randn(n, k, generator=g).to(dtype) for n, k in ((HIDDEN, 2 * HIDDEN), (FFN, HIDDEN),
                                                                    (FFN, HIDDEN), (HIDDEN, FFN))]
             for _ in range(4)]
    draft = torch.randn(4096, HIDDEN, generator=g).to(dtype)  # one projection, read at every depth
    filler = torch.randn(160 * 2**20)  # 640 MB read between steps, as the model's weights are: out of cache again
    times = []
    for _ in range(12):
        filler.sum()
        start = time.perf_counter()
        for weights in heads:
            for w in weights:
                torch.ops.dscompile.thin_linear(torch.randn(rows, w.shape[1]), w, None)
            torch.ops.dscompile.thin_linear(torch.randn(rows, HIDDEN), draft, None)
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slots", type=int, default=328)
    parser.add_argument("--filled", type=int, default=260)
    parser.add_argument("--rows", default="1,5,8,16")
    parser.add_argument("--out", default="bench/results/kernels.json")
    args = parser.parse_args()
    if not native.load():
        sys.exit("the native kernels could not be built here (see the warning above)")
    result: dict = {"machine": platform.platform(), "threads": torch.get_num_threads()}
    result["decode_attention_us"] = attention(args.slots, args.filled)
    print(f"decode_attention, {args.filled} of {args.slots} slots, us by queries: {result['decode_attention_us']}")
    g = torch.Generator().manual_seed(2)
    layers = [{"qkv": [torch.randn(n, HIDDEN, generator=g) for n in (HIDDEN, KV, KV)],
               "o": [torch.randn(HIDDEN, HIDDEN, generator=g)],
               "gate_up": [torch.randn(FFN, HIDDEN, generator=g) for _ in range(2)],
               "down": [torch.randn(HIDDEN, FFN, generator=g)]} for _ in range(LAYERS)]
    head = torch.randn(VOCAB, HIDDEN, generator=g)
    products = {}
    for rows in (int(r) for r in args.rows.split(",")):
        runs = [step_products(rows, layers, head) for _ in range(8)]
        products[rows] = sorted(runs[2:])[len(runs[2:]) // 2]  # the median after two warm-up steps
    result["step_products_ms"] = products
    print(f"one decode step's products, ms by rows: {products}")
    del layers, head
    result["drafting_ms"] = {"float32": drafting_products(torch.float32), "bfloat16": drafting_products(torch.bfloat16)}
    print(f"drafting products (4 heads, 2 rows), ms: {result['drafting_ms']}")
    write_result(Path(args.out), result)


if __name__ == "__main__":
    main()
