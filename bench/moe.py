"""MoE on the embedded model: perplexity and MaxVio by active fraction, training-free and healed; decode and prefill
speed and peak memory against the dense FFN in the same runtime.

Usage: .venv/bin/python bench/moe.py [--configs 64:8:40,64:8:24,64:4:12] [--windows 6] [--heal-minutes 0]
                                      [--speed] [--skip-quality] [--out bench/results/moe.json]

A config is ``n_experts:n_shared:top_k``, optionally ``:activation`` (experts chosen by their own activations).
Calibration: the first part of Python's documentation topics (pydoc_data); evaluation on a later part of it and on
Python source (``inspect`` and ``typing``), as in ``bench/mla.py``. MaxVio is measured on the held-out
documentation. ``--speed`` runs, each in its own process so that peak memory is its own, the dense model and every
config through ``dscompile.optimize``: decode tokens/s at batch 1 and 8 (prompt 128, ``--new`` new tokens) and
prefill tokens/s at 2048 tokens. A speed config ``n:s:k@N`` offloads the routed experts
(``OptimizedModel.offload_experts(N)``: N per FFN in memory, the rest in files, the dense FFN weights paged out) and
adds the expert cache's hit rate and reads per token; every worker records its RSS before loading the model, so peak
minus that is the model's own memory. Then each MoE worker times itself against the dense model in the same
process, alternating call by call for ``--paired`` rounds (default 3): ``paired_*_ratio``, the figures to quote on
a shared machine whose speed drifts between the workers.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from dscompile import models
from dscompile.heal import HEAL_LR_MOE
from dscompile.passes.kv_cache import build_cached_program
from dscompile.passes.moe_offload import release_heap
from dscompile.passes.moe_plan import MoEPlan, make_plan, record_ffns, without_counters
from dscompile.profile import MoEConfig, Profile
from dscompile.runtime import Runtime

sys.path.insert(0, str(Path(__file__).parent))
from mla import heal_row, perplexity, quality_row, text_sets, write_result  # noqa: E402


def _config(text: str) -> MoEConfig:
    """``n_experts:n_shared:top_k``, optionally ``:router`` (``linear`` or ``activation``)."""
    n, s, k, *router = text.split(":")
    return MoEConfig(int(n), int(s), int(k), *router)


def _speed_spec(text: str) -> tuple[MoEConfig | None, int | None]:
    """``dense``, ``n:s:k`` or ``n:s:k@cache`` (routed experts offloaded, ``cache`` of them per FFN in memory)."""
    if text == "dense":
        return None, None
    config, _, cache = text.partition("@")
    return _config(config), int(cache) if cache else None


def heldout_maxvio(plan: MoEPlan, inputs: dict[str, torch.Tensor]) -> float:
    """The worst layer's MaxVio when the plan's routers see ``inputs`` (FFN inputs by layer name)."""
    worst = 0.0
    for key, carved in plan.layers.items():
        worst = max(worst, max(carved.load_on(inputs[plan.names[key]])) - 1.0)
    return worst


def quality(configs: list[MoEConfig], args: argparse.Namespace) -> dict:
    model, tokenizer = models.load("smollm2")
    calibration, held_docs, held_code = text_sets(tokenizer, args.calibration_windows, args.windows)
    base = build_cached_program(model, logits="all")
    baseline = {"docs": perplexity(base, held_docs), "code": perplexity(base, held_code)}
    print(f"dense: docs {baseline['docs']:.3f}, code {baseline['code']:.3f}", flush=True)
    start = time.perf_counter()
    batches = [torch.cat(calibration[i:i + 4]) for i in range(0, len(calibration), 4)]
    rows, tokens = record_ffns(base, batches)
    record_s = time.perf_counter() - start
    held_rows, _ = record_ffns(base, [torch.cat(held_docs)])
    held_inputs = {f.layer: torch.cat(held_rows[f.up.input.name]) for f in base.matches.ffn}
    out = []
    for config in configs:
        start = time.perf_counter()
        plan = make_plan(config, base.matches.ffn, rows, tokens)
        row = {"config": [config.n_experts, config.n_shared, config.top_k, config.router],
               "active": config.active_fraction,
               "carve_s": time.perf_counter() - start + record_s,
               "maxvio_calibration": max(plan.maxvio().values()), "maxvio_heldout": heldout_maxvio(plan, held_inputs)}
        program = build_cached_program(model, logits="all")
        plan.apply(program)
        _quality_row(row, program, baseline, held_docs, held_code, "")
        if args.heal_minutes:
            pairs = [torch.cat(calibration[i:i + 2]) for i in range(0, len(calibration), 2)]
            heal_row(row, program, model, calibration, pairs, args)
            _quality_row(row, program, baseline, held_docs, held_code, "healed_")
            row["maxvio_heldout_healed"] = heldout_maxvio(plan, held_inputs)
        out.append(row)
    return {"baseline": baseline, "calibration_tokens": tokens, "rows": out}


def _quality_row(row: dict, program: object, baseline: dict, docs: list, code: list, prefix: str) -> None:
    quality_row(row, program, baseline, docs, code, prefix)
    print(f"{row['config']} ({row['active']:.0%} active){' healed' if prefix else ''}: "
          f"docs {row[prefix + 'ppl_docs_change_pct']:+.1f}%, code {row[prefix + 'ppl_code_change_pct']:+.1f}%, "
          f"MaxVio held-out {row['maxvio_heldout']:.3f}", flush=True)


def decode_prompts(docs: list[int], batch: int) -> torch.Tensor:
    """``batch`` held-out prompts of 128 tokens for the decode figures."""
    return torch.tensor([docs[20_000 + i * 128:20_000 + (i + 1) * 128] for i in range(batch)])


def prefill_prompt(docs: list[int]) -> torch.Tensor:
    """One held-out prompt of 2,048 tokens for the prefill figures."""
    return torch.tensor([docs[30_000:32_048]])


def speed_worker(config: MoEConfig | None, new: int, cache: int | None = None, paired: int = 0) -> dict:
    """Decode at batch 1 and 8 and prefill at 2048 tokens, for the dense model (``config`` None) or one MoE (its
    routed experts offloaded with ``cache`` of them per FFN in memory, when given), then ``paired`` rounds against
    the dense model in the same process (:func:`paired_ratios`)."""
    from dscompile import optimize
    from dscompile.monitor import _proc_status_bytes

    base = _proc_status_bytes("VmRSS")  # torch and the libraries, before any model: the same in every worker
    model, tokenizer = models.load("smollm2")
    docs = tokenizer(models.heldout_text())["input_ids"]
    calibration = torch.tensor([docs[:4096]])
    profile = Profile(moe=config, name="moe") if config is not None else "none"
    optimized = optimize(model, profile, calibration=calibration if config else None,
                         example_inputs=None if config else calibration[:, :128])
    runtime = optimized.runtime()
    stores = optimized.offload_experts(cache) if cache is not None else []
    del model, calibration
    release_heap()  # hand calibration's freed heap back, so peak memory is generation's
    row: dict = {"config": None if config is None else [config.n_experts, config.n_shared, config.top_k, config.router],
                 "expert_cache": cache, "rss_process_base_bytes": base,
                 "rss_before_generate_bytes": _proc_status_bytes("VmRSS")}
    for batch in (1, 8):
        prompts = decode_prompts(docs, batch)
        row[f"decode_compile_s_b{batch}"] = runtime.warm_up(batch, 128 + new)
        misses = sum(s.misses for s in stores)
        runtime.generate(prompts, max_new_tokens=new, eos_token_id=[])
        row[f"decode_tokens_per_s_b{batch}"] = runtime.monitor.last.decode_tokens_per_s
        row[f"peak_memory_bytes_b{batch}"] = runtime.monitor.last.peak_memory_bytes
        if stores:  # experts read from the files per new token, over all FFNs
            row[f"expert_reads_per_token_b{batch}"] = (sum(s.misses for s in stores) - misses) / (new * batch)
        if config is not None:  # live load on this call's tokens (held-out prompts and the model's continuations)
            row[f"maxvio_generate_b{batch}"] = max(runtime.monitor.last.extra["moe_maxvio"].values())
    if stores:
        row["expert_cache_hit_rate"] = sum(s.hits for s in stores) / max(1, sum(s.hits + s.misses for s in stores))
    if config is not None and cache is None:  # what the live expert counting costs: the same program without it
        program = runtime.program
        uncounted = Runtime(dataclasses.replace(program, gm=without_counters(program.gm),
                                                decode_gm=without_counters(program.decode_gm)))
        prompts = decode_prompts(docs, 1)
        for name, each in (("uncounted", uncounted), ("counted", runtime)):
            each.generate(prompts, max_new_tokens=new, eos_token_id=[])  # warm-up (compiles the uncounted step)
            each.generate(prompts, max_new_tokens=new, eos_token_id=[])
            row[f"decode_tokens_per_s_b1_{name}"] = each.monitor.last.decode_tokens_per_s
    runtime.generate(prefill_prompt(docs), max_new_tokens=1, eos_token_id=[])
    row["prefill_tokens_per_s"] = 2048 / runtime.monitor.last.time_to_first_token_s
    row["peak_memory_bytes_prefill"] = runtime.monitor.last.peak_memory_bytes
    row["peak_memory_bytes"] = max(v for k, v in row.items() if k.startswith("peak_memory_bytes_"))
    if config is not None and cache is None and paired:
        row.update(paired_ratios(runtime, docs, new, paired))
    return row


def paired_ratios(runtime: Runtime, docs: list[int], new: int, rounds: int) -> dict:
    """Speed against the dense model in the same process, the two alternating call by call (``rounds`` times):
    the ratios of the medians. The machines these runs share drift by 20-40% over the minutes between the
    per-process figures; alternating cancels that. Run after the memory figures, so the peaks are not the dense
    model's."""
    from dscompile import optimize

    dense = optimize(models.load("smollm2")[0], "none", example_inputs=torch.tensor([docs[:128]])).runtime()
    calls = {f"decode_b{b}": (decode_prompts(docs, b), new) for b in (1, 8)}
    calls["prefill"] = (prefill_prompt(docs), 1)
    out = {}
    for name, (prompts, tokens) in calls.items():
        if tokens > 1:
            dense.warm_up(prompts.shape[0], prompts.shape[1] + tokens)
        speeds: dict[str, list[float]] = {"dense": [], "moe": []}
        for _ in range(rounds + 1):  # the first round warms both up
            for label, each in (("dense", dense), ("moe", runtime)):
                each.generate(prompts, max_new_tokens=tokens, eos_token_id=[])
                last = each.monitor.last
                speeds[label].append(last.decode_tokens_per_s if tokens > 1 else 1 / last.time_to_first_token_s)
        dense_median, moe_median = (statistics.median(speeds[k][1:]) for k in ("dense", "moe"))
        out[f"paired_{name}_ratio"] = moe_median / dense_median
    return out


def speed(specs: list[str], new: int, paired: int) -> list[dict]:
    rows = []
    for spec in specs:
        done = subprocess.run([sys.executable, __file__, "--speed-worker", spec, "--new", str(new),
                               "--paired", str(paired)],
                              capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"speed worker {spec} failed:\n{done.stderr[-4000:]}")
        row = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append(row)
        base = rows[0]
        ratios = {k: row[k] / base[k] for k in row if k in base and k.startswith(("decode_tokens", "prefill", "peak"))}
        print(spec, {k: round(v, 2) for k, v in row.items() if isinstance(v, float)},
              {k: round(v, 3) for k, v in ratios.items()}, flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="64:8:40,64:8:24,64:4:12")
    parser.add_argument("--windows", type=int, default=6)
    parser.add_argument("--calibration-windows", type=int, default=16)
    parser.add_argument("--heal-minutes", type=float, default=0.0)
    parser.add_argument("--heal-lr", type=float, default=HEAL_LR_MOE)
    parser.set_defaults(heal_generated=0, refine_minutes=0)  # bench/mla.py's healing options, unused here
    parser.add_argument("--speed", action="store_true")
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--out", default="bench/results/moe.json")
    parser.add_argument("--paired", type=int, default=3, help="rounds of speed against dense in the same process")
    parser.add_argument("--speed-worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.speed_worker is not None:
        config, cache = _speed_spec(args.speed_worker)
        print(json.dumps(speed_worker(config, args.new, cache, args.paired)))
        return
    configs = [_config(c) for c in args.configs.split(",") if "@" not in c]
    result: dict = {"machine": platform.platform(), "processor": platform.processor() or platform.machine()}
    if not args.skip_quality:
        result["quality"] = quality(configs, args)
    if args.speed:
        result["speed"] = speed(["dense", *args.configs.split(",")], args.new, args.paired)
    write_result(Path(args.out), result)


if __name__ == "__main__":
    main()
