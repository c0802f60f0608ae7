"""Generation speed and memory: HF eager, HF compiled with a static cache, and dscompile's runtime, in one run.

Usage: .venv/bin/python bench/generate.py [--model smollm2] [--skip-hf-compile] [--long 8192] [--out ...]

Decode tokens/s (prompt 128, 128 new tokens, greedy) at batch 1 and 8: the time from the first new token to the
last, measured by a streamer for HF and by the monitor for ours (the same interval), after one warm-up call.
Prefill tokens/s at 2048 tokens. A long run at --long tokens of context (batch 1 and 8) reports cache
bytes and peak memory. All ratios are against HF eager in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import llama_cpp_baseline
import torch

from dscompile import models, optimize
from dscompile.monitor import peak_memory
from dscompile.runtime import Runtime


def _prompts(tokenizer: Any, batch: int, length: int) -> torch.Tensor:
    ids = tokenizer(models.heldout_text(max_chars=length * batch * 12))["input_ids"]
    rows = [ids[i * length:(i + 1) * length] for i in range(batch)]
    if len(rows[-1]) < length:
        raise SystemExit("not enough held-out text for the prompts")
    return torch.tensor(rows)


def _timed(fn: Any) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


class StepClock:
    """A streamer that notes when each step's tokens arrive (the prompt arrives first in HF's generate)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, tokens: torch.Tensor) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass

    def decode_rate(self, batch: int, new: int) -> float:
        steps = self.times[-new:]
        return batch * (len(steps) - 1) / (steps[-1] - steps[0])


def hf_decode(model: Any, x: torch.Tensor, new: int, **extra: Any) -> dict[str, float]:
    def run() -> tuple[StepClock, float]:
        clock = StepClock()
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new, min_new_tokens=new,
                           do_sample=False, streamer=clock, **extra)
        return clock, clock.times[-new] - start
    run()  # warm-up (and compile, for the compiled variant)
    clock, first = run()
    return {"decode_tokens_per_s": clock.decode_rate(x.shape[0], new), "first_token_s": first}


def ours_decode(runtime: Runtime, x: torch.Tensor, new: int) -> dict[str, float]:
    runtime.generate(x, max_new_tokens=new, eos_token_id=[])  # compiles the decode step for this shape
    runtime.generate(x, max_new_tokens=new, eos_token_id=[])
    stats = runtime.monitor.last
    return {"decode_tokens_per_s": stats.decode_tokens_per_s, "first_token_s": stats.time_to_first_token_s,
            "cache_bytes": stats.cache_bytes, "peak_memory_bytes": stats.peak_memory_bytes}


def llama_cpp_row(runtime: Runtime, tokenizer: Any, name: str, prompt: int, new: int) -> dict[str, Any]:
    """llama.cpp at batch 1 on an F32 GGUF of the same weights; also how many greedy tokens agree with ours."""
    gguf = llama_cpp_baseline.write_f32_gguf(models.gguf_path(name), models.cache_dir() / "gguf" / f"{name}-f32.gguf")
    x = _prompts(tokenizer, 1, prompt)
    row = {"system": "llama.cpp-f32", "batch": 1,
           **llama_cpp_baseline.decode_rate(gguf, x[0].tolist(), new, torch.get_num_threads())}
    ours = runtime.generate(x, max_new_tokens=new, eos_token_id=[])[0, prompt:].tolist()
    theirs = row.pop("tokens")
    row["greedy_prefix_agreement"] = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), new)
    print(f"batch 1: llama.cpp F32 {row['decode_tokens_per_s']:.1f} tok/s (greedy output equal to ours for "
          f"{row['greedy_prefix_agreement']} of {new} tokens)", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--prefill", type=int, default=2048)
    parser.add_argument("--long", type=int, default=8192, help="context of the long run (0 to skip)")
    parser.add_argument("--skip-hf-compile", action="store_true", help="skip HF + torch.compile + static cache")
    parser.add_argument("--skip-llama-cpp", action="store_true", help="skip llama.cpp even when installed")
    parser.add_argument("--warm-cache", action="store_true",
                        help="reuse Inductor's on-disk cache (default: a fresh one, so compile times are cold)")
    parser.add_argument("--out", default="bench/results/generate.json")
    args = parser.parse_args()
    if not args.warm_cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="dscompile-bench-inductor-")

    model, tokenizer = models.load(args.model)
    rows: list[dict[str, Any]] = []
    opt = optimize(model, example_inputs=torch.tensor([[1, 2, 3]]), lower="eager")
    start = time.perf_counter()
    runtime = Runtime(opt.runtime().program, lower="inductor", max_positions=opt.runtime().max_positions)
    build_s = time.perf_counter() - start
    batches = [int(b) for b in args.batches.split(",")]
    for batch in batches:
        x = _prompts(tokenizer, batch, args.prompt)
        compile_s = runtime.warm_up(batch, args.prompt + args.new)
        rows.append({"system": "hf-eager", "batch": batch, **hf_decode(model, x, args.new)})
        rows.append({"system": "dscompile", "batch": batch, "decode_compile_s": compile_s,
                     **ours_decode(runtime, x, args.new)})
        print(f"batch {batch}: HF eager {rows[-2]['decode_tokens_per_s']:.1f} tok/s, "
              f"dscompile {rows[-1]['decode_tokens_per_s']:.1f} tok/s (step compiled in {compile_s:.0f} s)", flush=True)
    if 1 in batches and not args.skip_llama_cpp and llama_cpp_baseline.available():
        rows.append(llama_cpp_row(runtime, tokenizer, args.model, args.prompt, args.new))
    if not args.skip_hf_compile:
        from transformers import CompileConfig

        # transformers compiles the decode forward itself when the cache is static; on CPU only when asked to.
        config = CompileConfig(fullgraph=True, dynamic=False)
        config._compile_all_devices = True
        static = {"cache_implementation": "static", "compile_config": config}
        for batch in batches:
            x = _prompts(tokenizer, batch, args.prompt)
            compile_s = _timed(lambda x=x: model.generate(x, attention_mask=torch.ones_like(x),
                                                          max_new_tokens=args.new, do_sample=False, **static))
            rows.append({"system": "hf-compile-static", "batch": batch, "compile_s": compile_s,
                         **hf_decode(model, x, args.new, **static)})
            print(f"batch {batch}: HF compiled {rows[-1]['decode_tokens_per_s']:.1f} tok/s "
                  f"(compiled in {compile_s:.0f} s)", flush=True)

    prefill: dict[str, Any] = {"tokens": args.prefill}
    if args.prefill:
        x = _prompts(tokenizer, 1, args.prefill)
        with torch.no_grad():
            model(x, use_cache=False)
            prefill["hf_eager_tokens_per_s"] = args.prefill / _timed(lambda: model(x, use_cache=False))
        runtime.generate(x, max_new_tokens=1, eos_token_id=[])
        runtime.generate(x, max_new_tokens=1, eos_token_id=[])
        prefill["dscompile_tokens_per_s"] = args.prefill / runtime.monitor.last.time_to_first_token_s
        print(f"prefill {args.prefill}: HF eager {prefill['hf_eager_tokens_per_s']:.0f} tok/s, "
              f"dscompile {prefill['dscompile_tokens_per_s']:.0f} tok/s", flush=True)

    long_rows = []
    if args.long:
        for batch in batches:
            x = _prompts(tokenizer, batch, args.long - 16)
            runtime.warm_up(batch, args.long)  # compiling the step for this capacity is not decoding
            with peak_memory(torch.device("cpu")):
                runtime.generate(x, max_new_tokens=16, eos_token_id=[])
            stats = runtime.monitor.last
            long_rows.append({"batch": batch, "context": args.long, "cache_bytes": stats.cache_bytes,
                              "peak_memory_bytes": stats.peak_memory_bytes,
                              "decode_tokens_per_s": stats.decode_tokens_per_s,
                              "prefill_s": stats.time_to_first_token_s})
            print(f"long {args.long} batch {batch}: cache {stats.cache_bytes / 2**20:.0f} MiB, peak "
                  f"{stats.peak_memory_bytes / 2**20:.0f} MiB, decode {stats.decode_tokens_per_s:.1f} tok/s",
                  flush=True)

    base = {r["batch"]: r["decode_tokens_per_s"] for r in rows if r["system"] == "hf-eager"}
    print(f"\n{'system':<20}{'batch':>6}{'decode tok/s':>14}{'vs HF eager':>13}{'first token s':>15}")
    for r in rows:
        print(f"{r['system']:<20}{r['batch']:>6}{r['decode_tokens_per_s']:>14.1f}"
              f"{r['decode_tokens_per_s'] / base[r['batch']]:>12.2f}x{r['first_token_s']:>15.3f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": args.model, "machine": platform.platform(), "threads": torch.get_num_threads(),
                               "runtime_build_s": build_s, "decode": rows, "prefill": prefill, "long": long_rows},
                              indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
