"""MLA (reconstruct mode) on the embedded model, training-free: perplexity and KV bytes per token by kv_ratio.

Usage: .venv/bin/python bench/mla.py [--ratios 0.75,0.5,0.25] [--v-weight 1.0] [--strategy uniform]
                                      [--windows 8] [--heal-minutes 0] [--out bench/results/mla.json]

Calibration: the first part of Python's documentation topics (pydoc_data). Evaluation on text calibration did not
see: a later part of the same documentation, and, as another domain, Python source code (the standard library's
``inspect`` and ``typing`` modules). Perplexity is computed from the runtime program's prefill logits, the
baseline being the same program without MLA, in the same run.
"""

from __future__ import annotations

import argparse
import inspect
import json
import platform
import time
import typing
from pathlib import Path

import torch

from dscompile import evaluate, models
from dscompile.heal import heal_program
from dscompile.passes import mla
from dscompile.passes.kv_cache import CachedProgram, build_cached_program
from dscompile.runtime.generate import prefill_logits

WINDOW = 256


def _windows(ids: list[int], count: int) -> list[torch.Tensor]:
    chunks = evaluate.windows(torch.tensor(ids), WINDOW, count)
    if len(chunks) < count:
        raise SystemExit("not enough text for the windows")
    return chunks


def perplexity(program: CachedProgram, windows: list[torch.Tensor]) -> float:
    """Perplexity from the runtime program's prefill logits (the same evaluation as for any model)."""
    return evaluate.perplexity(lambda x: prefill_logits(program, x), windows)


def _print(label: str, row: dict, prefix: str = "") -> None:
    print(f"{label}: {row['kv_bytes_per_token']} B/token, docs {row[prefix + 'ppl_docs']:.3f} "
          f"({row[prefix + 'ppl_docs_change_pct']:+.1f}%), code {row[prefix + 'ppl_code']:.3f} "
          f"({row[prefix + 'ppl_code_change_pct']:+.1f}%)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", default="0.75,0.5,0.25")
    parser.add_argument("--v-weight", type=float, default=1.0)
    parser.add_argument("--strategy", default="uniform")
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--calibration-windows", type=int, default=16)
    parser.add_argument("--heal-minutes", type=float, default=0.0, help="then heal each program this long")
    parser.add_argument("--heal-lr", type=float, default=2e-4)
    parser.add_argument("--out", default="bench/results/mla.json")
    args = parser.parse_args()

    model, tokenizer = models.load("smollm2")
    docs = tokenizer(models.heldout_text())["input_ids"]
    calib_tokens = args.calibration_windows * WINDOW
    calibration = _windows(docs, args.calibration_windows)
    held_docs = _windows(docs[calib_tokens + 10_000:], args.windows)
    code = tokenizer(inspect.getsource(inspect) + inspect.getsource(typing))["input_ids"]
    held_code = _windows(code, args.windows)

    base = build_cached_program(model, logits="all")
    baseline = {"docs": perplexity(base, held_docs), "code": perplexity(base, held_code)}
    print(f"baseline: docs {baseline['docs']:.3f}, code {baseline['code']:.3f}, "
          f"{base.cache_bytes_per_token()} KV bytes/token", flush=True)
    start = time.perf_counter()
    grams = mla.calibrate(base, [torch.cat(calibration[i:i + 4]) for i in range(0, len(calibration), 4)])
    calibrate_s = time.perf_counter() - start
    print(f"calibrated on {len(calibration) * WINDOW} tokens in {calibrate_s:.0f} s", flush=True)

    rows = []
    for ratio in [float(r) for r in args.ratios.split(",")]:
        program = build_cached_program(model, logits="all")
        start = time.perf_counter()
        factors = mla.factorize(program, grams, ratio, v_weight=args.v_weight, strategy=args.strategy)
        mla.apply_latent_cache(program, factors)
        build_s = time.perf_counter() - start
        row = {"kv_ratio": ratio, "mode": "reconstruct", "v_weight": args.v_weight, "strategy": args.strategy,
               "kv_bytes_per_token": program.cache_bytes_per_token(), "factorize_s": build_s,
               "ranks": [f.rank for f in factors.values()]}
        for domain, windows in (("docs", held_docs), ("code", held_code)):
            ppl = perplexity(program, windows)
            row[f"ppl_{domain}"] = ppl
            row[f"ppl_{domain}_change_pct"] = 100 * (ppl / baseline[domain] - 1)
        _print(f"kv_ratio {ratio}", row)
        if args.heal_minutes:
            batches = [torch.cat(calibration[i:i + 2]) for i in range(0, len(calibration), 2)]
            report = heal_program(program, model, batches, max_minutes=args.heal_minutes, lr=args.heal_lr,
                                  progress=True)
            row["heal"] = {"minutes": args.heal_minutes, "steps": report.steps, "lr": args.heal_lr,
                           "kl_first": report.losses[0], "kl_last": report.losses[-1]}
            for domain, windows in (("docs", held_docs), ("code", held_code)):
                ppl = perplexity(program, windows)
                row[f"healed_ppl_{domain}"] = ppl
                row[f"healed_ppl_{domain}_change_pct"] = 100 * (ppl / baseline[domain] - 1)
            _print(f"kv_ratio {ratio} healed ({report.steps} steps)", row, "healed_")
        rows.append(row)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": platform.platform(), "baseline": baseline,
                               "baseline_kv_bytes_per_token": base.cache_bytes_per_token(),
                               "calibration_tokens": len(calibration) * WINDOW, "calibrate_s": calibrate_s,
                               "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
