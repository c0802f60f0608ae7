"""MLA on the embedded model: perplexity and KV bytes per token by kv_ratio and mode, training-free and healed.

Usage: .venv/bin/python bench/mla.py [--ratios 0.75,0.5,0.25] [--mode reconstruct|absorb] [--rope-dims N]
                                      [--v-weight 1.0] [--windows 8] [--refine-minutes 0] [--heal-minutes 0]
                                      [--heal-generated 0] [--out bench/results/mla.json]
       .venv/bin/python bench/mla.py --long 8192 --long-batch 8 [--ratios 0.5] [--mode absorb] [--skip-quality]

Calibration: the first part of Python's documentation topics (pydoc_data). Evaluation on text calibration did not
see: a later part of the same documentation, and, as another domain, Python source code (the standard library's
``inspect`` and ``typing`` modules). Perplexity is computed from the runtime program's prefill logits, the
baseline being the same program without MLA, in the same run.

``--long N``: generation at N tokens of context (``--long-batch`` rows, ``--long-new`` new tokens) through
``dscompile.optimize`` with profile ``none`` and then with each ratio's MLA profile, each in its own process so
that its peak resident memory is its own: KV-cache bytes, peak RSS (and its rise over the RSS before generating),
prefill seconds and decode tokens/s, with ratios against the full cache.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import platform
import subprocess
import sys
import time
import typing
from pathlib import Path

import torch

from dscompile import evaluate, models
from dscompile.heal import HEAL_LR, HEAL_LR_REFINED, heal_program
from dscompile.passes import mla
from dscompile.passes.kv_cache import CachedProgram, build_cached_program
from dscompile.passes.mla_plan import make_plan
from dscompile.passes.mla_ranks import sensitive_plan
from dscompile.passes.mla_refine import REFINE_LR, forced_sites, loss_weights, refine_program
from dscompile.profile import MLAConfig, Profile
from dscompile.runtime.generate import Runtime, prefill_logits

WINDOW = 256


def _windows(ids: list[int], count: int) -> list[torch.Tensor]:
    chunks = evaluate.windows(torch.tensor(ids), WINDOW, count)
    if len(chunks) < count:
        raise SystemExit("not enough text for the windows")
    return chunks


def text_sets(tokenizer, calibration_windows: int, windows: int, held_after: int | None = None
              ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """Calibration windows from the start of Python's documentation topics; held-out documentation windows from
    10,000 tokens after the first ``held_after`` windows (default: the calibration's); held-out Python source
    (``inspect`` and ``typing``), another domain."""
    docs = tokenizer(models.heldout_text())["input_ids"]
    skip = (calibration_windows if held_after is None else held_after) * WINDOW + 10_000
    code = tokenizer(inspect.getsource(inspect) + inspect.getsource(typing))["input_ids"]
    return _windows(docs, calibration_windows), _windows(docs[skip:], windows), _windows(code, windows)


CALIBRATION_CODE = ("argparse", "collections", "dataclasses", "enum", "functools", "pathlib", "textwrap", "tempfile")
"""Standard-library modules whose source may join the calibration text; never the held-out ``inspect``/``typing``."""


def code_windows(tokenizer, count: int) -> list[torch.Tensor]:
    """``count`` windows of Python source from :data:`CALIBRATION_CODE`, for calibrating on both kinds of text."""
    source = "\n\n".join(inspect.getsource(importlib.import_module(name)) for name in CALIBRATION_CODE)
    return _windows(tokenizer(source)["input_ids"], count)


def perplexity(program: CachedProgram, windows: list[torch.Tensor]) -> float:
    """Perplexity from the runtime program's prefill logits (the same evaluation as for any model)."""
    return evaluate.perplexity(lambda x: prefill_logits(program, x), windows)


def quality_row(row: dict, program: CachedProgram, baseline: dict, docs: list, code: list, prefix: str = "") -> None:
    """Perplexity on held-out docs and code, and its change against ``baseline``, into ``row`` under ``prefix``."""
    for domain, windows in (("docs", docs), ("code", code)):
        ppl = perplexity(program, windows)
        row[f"{prefix}ppl_{domain}"] = ppl
        row[f"{prefix}ppl_{domain}_change_pct"] = 100 * (ppl / baseline[domain] - 1)


def heal_row(row: dict, program: CachedProgram, model: torch.nn.Module, calibration: list[torch.Tensor],
             batches: list[torch.Tensor], args: argparse.Namespace) -> int:
    """Heal ``program`` for ``args.heal_minutes`` on ``batches`` (the calibration windows, two per step), recording
    the run in ``row["heal"]``; returns the steps taken."""
    if args.heal_generated:
        start = time.perf_counter()
        samples = sample_teacher_text(model, calibration, args.heal_generated, window=WINDOW)
        row["heal_generated"] = {"tokens": samples.numel(), "seconds": time.perf_counter() - start}
        batches = interleave(batches, list(samples.split(2)))
    lr = args.heal_lr or (HEAL_LR_REFINED if args.refine_minutes else HEAL_LR)
    report = heal_program(program, model, batches, max_minutes=args.heal_minutes, lr=lr, progress=True)
    row["heal"] = {"minutes": args.heal_minutes, "steps": report.steps, "lr": lr,
                   "kl_first": report.losses[0], "kl_last": report.losses[-1]}
    return report.steps


def sample_teacher_text(model: torch.nn.Module, calibration: list[torch.Tensor], tokens: int,
                        prompt_tokens: int = 8) -> torch.Tensor:
    """``[rows, WINDOW]`` windows the original model writes itself (nucleus sampling, top_p 0.95), from prompts of
    ``prompt_tokens`` taken at evenly spaced places in the calibration text: an experiment in healing on text
    unlike the calibration (LLM-QAT's data-free distillation). It did not help (docs/BENCHMARKS.md)."""
    starts = [row[i:i + prompt_tokens] for w in calibration for row in w for i in range(0, row.numel(), WINDOW)]
    rows = -(-tokens // WINDOW)
    prompts = torch.stack([starts[i] for i in torch.linspace(0, len(starts) - 1, rows).round().long().tolist()])
    runtime = Runtime(build_cached_program(model))
    generator = torch.Generator().manual_seed(0)
    return torch.cat([runtime.generate(prompts[i:i + 8], max_new_tokens=WINDOW - prompt_tokens, do_sample=True,
                                       top_p=0.95, eos_token_id=[], generator=generator)
                      for i in range(0, rows, 8)])


def interleave(a: list, b: list) -> list:
    """``a`` and ``b`` alternately, the longer one's rest at the end (each pass over the data sees both texts)."""
    return [x for pair in zip(a, b) for x in pair] + a[len(b):] + b[len(a):]


def _print(label: str, row: dict, prefix: str = "") -> None:
    print(f"{label}: {row['kv_bytes_per_token']} B/token, docs {row[prefix + 'ppl_docs']:.3f} "
          f"({row[prefix + 'ppl_docs_change_pct']:+.1f}%), code {row[prefix + 'ppl_code']:.3f} "
          f"({row[prefix + 'ppl_code_change_pct']:+.1f}%)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", default="0.75,0.5,0.25")
    parser.add_argument("--v-weight", type=float, default=1.0)
    parser.add_argument("--shrinkage", type=float, default=MLAConfig.shrinkage,
                        help="pull of the whitening covariance toward its diagonal (MLAConfig.shrinkage)")
    parser.add_argument("--mode", default="reconstruct", choices=("reconstruct", "absorb"))
    parser.add_argument("--ranks", default="uniform", choices=("uniform", "sensitivity"),
                        help="how the KV budget is split over the layers (MLAConfig.ranks)")
    parser.add_argument("--rope-dims", type=int, default=None, help="absorb mode: rotary dims kept per KV head")
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--calibration-windows", type=int, default=16)
    parser.add_argument("--heal-minutes", type=float, default=0.0, help="then heal each program this long")
    parser.add_argument("--heal-lr", type=float, default=None,
                        help="default: 1e-4 after refinement, else 3e-4 (what dscompile.heal picks)")
    parser.add_argument("--refine-minutes", type=float, default=0.0,
                        help="refine each layer's factors on its attention output this long, before healing")
    parser.add_argument("--refine-lr", type=float, default=REFINE_LR)
    parser.add_argument("--refine-weights", default="fisher", choices=("fisher", "none"),
                        help="weight each channel's refinement error by the original's loss sensitivity (the library's "
                             "choice) or not")
    parser.add_argument("--calibration-code", type=int, default=0,
                        help="of the calibration windows, this many are Python source of other modules than the "
                             "held-out code (the held-out sets stay the same)")
    parser.add_argument("--heal-generated", type=int, default=0,
                        help="also heal on this many tokens the original model samples itself")
    parser.add_argument("--out", default="bench/results/mla.json")
    parser.add_argument("--long", type=int, default=0, help="context of the memory/speed run (0 to skip)")
    parser.add_argument("--long-batch", type=int, default=8)
    parser.add_argument("--long-new", type=int, default=8)
    parser.add_argument("--skip-quality", action="store_true", help="only the --long run")
    parser.add_argument("--long-worker", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not 0 <= args.calibration_code < args.calibration_windows:
        parser.error(f"--calibration-code must be in [0, --calibration-windows) = [0, {args.calibration_windows}), "
                     f"got {args.calibration_code}")
    if args.long_worker is not None:
        print(json.dumps(long_worker(args.long_worker, args.long, args.long_batch, args.long_new,
                                     _config(args.long_worker, args))))
        return
    ratios = [float(r) for r in args.ratios.split(",")]
    long_rows = long_run(ratios, args) if args.long else []
    if args.skip_quality:
        write_result(Path(args.out), {"machine": platform.platform(), "long": long_rows})
        return

    model, tokenizer = models.load("smollm2")
    calibration, held_docs, held_code = text_sets(tokenizer, args.calibration_windows - args.calibration_code,
                                                  args.windows, held_after=args.calibration_windows)
    if args.calibration_code:
        calibration = interleave(calibration, code_windows(tokenizer, args.calibration_code))

    base = build_cached_program(model, logits="all")
    baseline = {"docs": perplexity(base, held_docs), "code": perplexity(base, held_code)}
    print(f"baseline: docs {baseline['docs']:.3f}, code {baseline['code']:.3f}, "
          f"{base.cache_bytes_per_token()} KV bytes/token", flush=True)
    start = time.perf_counter()
    grams = mla.calibrate(base, [torch.cat(calibration[i:i + 4]) for i in range(0, len(calibration), 4)])
    calibrate_s = time.perf_counter() - start
    print(f"calibrated on {len(calibration) * WINDOW} tokens in {calibrate_s:.0f} s", flush=True)

    pairs = [torch.cat(calibration[i:i + 2]) for i in range(0, len(calibration), 2)]  # refinement's, healing's
    rows = []
    for ratio in ratios:
        program = build_cached_program(model, logits="all")
        start = time.perf_counter()
        config, tokens = _config(ratio, args), len(calibration) * WINDOW
        plan = (sensitive_plan(config, program.matches.attention, grams, tokens, model, base, pairs)
                if args.ranks == "sensitivity" else make_plan(config, program.matches.attention, grams, tokens))
        plan.apply(program)
        build_s = time.perf_counter() - start
        row = {"kv_ratio": ratio, "mode": args.mode, "v_weight": args.v_weight, "shrinkage": args.shrinkage,
               "rank_allocation": args.ranks,
               "kv_bytes_per_token":
               program.cache_bytes_per_token(), "factorize_s": build_s, "ranks": list(plan.ranks().values())}
        if args.mode == "absorb":
            row["rope_dims"] = sorted({len(d) for d in plan.rope_dims.values()})
        quality_row(row, program, baseline, held_docs, held_code)
        _print(f"kv_ratio {ratio}", row)
        if args.refine_minutes:
            weights = (loss_weights(model, forced_sites(program, base)[1], pairs)
                       if args.refine_weights == "fisher" else None)
            report = refine_program(program, base, pairs, max_minutes=args.refine_minutes, lr=args.refine_lr,
                                    weights=weights, progress=True)
            row["refine"] = {"minutes": args.refine_minutes, "steps": report.steps, "lr": args.refine_lr,
                             "weights": args.refine_weights,
                             "error_first": report.losses[0], "error_last": report.losses[-1]}
            quality_row(row, program, baseline, held_docs, held_code, "refined_")
            _print(f"kv_ratio {ratio} refined ({report.steps} steps)", row, "refined_")
        if args.heal_minutes:
            steps = heal_row(row, program, model, calibration, pairs, args)
            quality_row(row, program, baseline, held_docs, held_code, "healed_")
            _print(f"kv_ratio {ratio} healed ({steps} steps)", row, "healed_")
        rows.append(row)
    write_result(Path(args.out), {"machine": platform.platform(), "baseline": baseline,
                            "baseline_kv_bytes_per_token": base.cache_bytes_per_token(),
                            "calibration_tokens": len(calibration) * WINDOW, "calibrate_s": calibrate_s,
                            "calibration_code_windows": args.calibration_code,
                            "rows": rows, "long": long_rows})


def _config(ratio: float, args: argparse.Namespace) -> MLAConfig | None:
    return MLAConfig(ratio, args.mode, v_weight=args.v_weight, rope_dims=args.rope_dims,
                     ranks=args.ranks, shrinkage=args.shrinkage) if ratio else None


def write_result(out: Path, data: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2))
    print(f"wrote {out}")


def long_run(ratios: list[float], args: argparse.Namespace) -> list[dict]:
    """The full cache, then each ratio, each in a fresh process (peak RSS cannot be reset after a free)."""
    rows = []
    for ratio in [0.0, *ratios]:
        command = [sys.executable, __file__, "--long-worker", str(ratio), "--long", str(args.long),
                   "--long-batch", str(args.long_batch), "--long-new", str(args.long_new), "--mode", args.mode,
                   "--v-weight", str(args.v_weight)] + (["--rope-dims", str(args.rope_dims)] if args.rope_dims else [])
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"the kv_ratio {ratio} worker failed:\n{done.stderr[-4000:]}")
        row = json.loads(done.stdout.strip().splitlines()[-1])
        base = rows[0] if rows else row
        row["cache_ratio"] = row["cache_bytes"] / base["cache_bytes"]
        row["peak_ratio"] = row["peak_memory_bytes"] / base["peak_memory_bytes"]
        row["peak_rise_ratio"] = row["peak_rise_bytes"] / base["peak_rise_bytes"]
        row["decode_ratio"] = row["decode_tokens_per_s"] / base["decode_tokens_per_s"]
        rows.append(row)
        print(f"context {args.long} batch {args.long_batch}, kv_ratio {ratio or 'full'} ({args.mode}): cache "
              f"{row['cache_bytes'] / 2**20:.0f} MiB ({row['cache_ratio']:.2f}x), peak "
              f"{row['peak_memory_bytes'] / 2**20:.0f} MiB ({row['peak_ratio']:.2f}x; rise "
              f"{row['peak_rise_bytes'] / 2**20:.0f} MiB, {row['peak_rise_ratio']:.2f}x), prefill "
              f"{row['prefill_s']:.0f} s, decode {row['decode_tokens_per_s']:.2f} tok/s ({row['decode_ratio']:.2f}x)",
              flush=True)
    return rows


def long_worker(ratio: float, context: int, batch: int, new: int, config: MLAConfig | None) -> dict:
    """One generation at ``context`` tokens: full cache (``ratio`` 0) or MLA calibrated on 4096 tokens of docs."""
    from dscompile import optimize
    from dscompile.monitor import _proc_status_bytes

    model, tokenizer = models.load("smollm2")
    docs = tokenizer(models.heldout_text())["input_ids"]
    prompts = torch.tensor([docs[20_000 + i * context:20_000 + (i + 1) * context - new] for i in range(batch)])
    if prompts.shape[1] != context - new:
        raise SystemExit("not enough held-out text for the prompts")
    calibration = torch.tensor([docs[:4096]])
    profile = Profile(mla=config, name="mla") if config is not None else "none"
    optimized = optimize(model, profile, calibration=calibration if ratio else None,
                         example_inputs=None if ratio else calibration[:, :128])
    runtime = optimized.runtime()
    compile_s = runtime.warm_up(batch, context)
    before = _proc_status_bytes("VmRSS")
    runtime.generate(prompts, max_new_tokens=new, eos_token_id=[])
    stats = runtime.monitor.last
    return {"kv_ratio": ratio or None, "mode": config.rope_mode if config else None, "context": context,
            "batch": batch, "new_tokens": new,
            "kv_bytes_per_token": runtime.program.cache_bytes_per_token(), "cache_bytes": stats.cache_bytes,
            "peak_memory_bytes": stats.peak_memory_bytes, "rss_before_bytes": before,
            "peak_rise_bytes": stats.peak_memory_bytes - before, "prefill_s": stats.time_to_first_token_s,
            "decode_tokens_per_s": stats.decode_tokens_per_s, "decode_compile_s": compile_s}


if __name__ == "__main__":
    main()
