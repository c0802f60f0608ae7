"""Deployment on the embedded model in one run: ``export_onnx`` of the forward, then per profile: optimize
(calibration + Inductor), generation with the compiled runtime, save and load, ONNX export of the runtime and
``onnx_generate``, every output compared token by token with the compiled runtime's.

Usage: .venv/bin/python bench/deploy.py [--profiles none,mla] [--new 32] [--prompt 32] [--batch 1]
                                        [--calibration-tokens 8192] [--out bench/results/deploy.json]

Profiles: ``none``, ``mla`` (kv_ratio 0.5), ``moe`` (64 experts, 8 shared, top 24), ``mla+mtp`` (MLA 0.5 and MTP
depth 2 with untrained heads, drafting at every step as ``onnx_generate`` does). Generation is greedy with one
warm-up call before each timed one; ``onnx_generate``'s first call also creates the onnxruntime sessions, so both
calls are reported. Folder sizes are the bytes on disk. Everything runs in this process on the same machine.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import dscompile
from dscompile import models

sys.path.insert(0, str(Path(__file__).parent))
from mla import write_result  # noqa: E402

PROFILES: dict[str, Any] = {
    "none": "none",
    "mla": {"mla": {"kv_ratio": 0.5}},
    "moe": {"moe": {"n_experts": 64, "n_shared": 8, "top_k": 24}},
    "mla+mtp": {"mla": {"kv_ratio": 0.5}, "mtp": {"depth": 2, "speculation": "always"}},
}


def timed(fn: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def measure(name: str, model: torch.nn.Module, prompt: torch.Tensor, calibration: torch.Tensor, new: int,
            work: Path) -> dict[str, Any]:
    profile = PROFILES[name]
    lossy = name != "none"
    opt, optimize_s = timed(lambda: dscompile.optimize(model, profile, calibration if lossy else None,
                                                       example_inputs=prompt[:1, :16]))
    generate = lambda m: m.generate(prompt, max_new_tokens=new, eos_token_id=[])  # noqa: E731
    _, first_s = timed(lambda: generate(opt))  # compiles the decode step
    reference, runtime_s = timed(lambda: generate(opt))
    row: dict[str, Any] = {"profile": name, "optimize_s": optimize_s, "runtime_first_s": first_s,
                           "runtime_s": runtime_s, "runtime_decode_tok_s": opt.monitor.last.decode_tokens_per_s}
    print(f"{name}: optimize {optimize_s:.1f} s, compiled runtime {runtime_s:.2f} s", flush=True)

    saved = work / f"{name}.saved"
    _, row["save_s"] = timed(lambda: opt.save(saved))
    row["saved_bytes"] = folder_bytes(saved)
    loaded, row["load_s"] = timed(lambda: dscompile.load_optimized(saved, model, example_inputs=prompt[:1, :16]))
    out, row["loaded_first_s"] = timed(lambda: generate(loaded))
    row["loaded_identical"] = bool(torch.equal(out, reference))
    print(f"{name}: save {row['save_s']:.1f} s ({row['saved_bytes'] / 2**20:.1f} MiB), load {row['load_s']:.1f} s, "
          f"identical {row['loaded_identical']}", flush=True)

    exported = work / f"{name}.onnx"
    _, row["onnx_export_s"] = timed(lambda: dscompile.export_onnx_runtime(opt, exported))
    row["onnx_bytes"] = folder_bytes(exported)
    onnx = lambda: dscompile.onnx_generate(exported, prompt, max_new_tokens=new, eos_token_id=[])  # noqa: E731
    _, row["onnx_first_s"] = timed(onnx)
    out, row["onnx_s"] = timed(onnx)
    row["onnx_identical"] = bool(torch.equal(out, reference))
    row["onnx_vs_runtime"] = row["runtime_s"] / row["onnx_s"]
    print(f"{name}: ONNX export {row['onnx_export_s']:.1f} s ({row['onnx_bytes'] / 2**20:.0f} MiB), onnx_generate "
          f"{row['onnx_s']:.2f} s ({row['onnx_vs_runtime']:.2f}x the compiled runtime's speed), identical "
          f"{row['onnx_identical']}", flush=True)
    return row


def forward_export(model: torch.nn.Module, prompt: torch.Tensor, work: Path) -> dict[str, Any]:
    """``export_onnx`` of the unmodified forward (one file, weights inside), checked by onnxruntime at two shapes."""
    path = work / "forward.onnx"
    checks, seconds = timed(lambda: dscompile.export_onnx(model, path, example_inputs=prompt[:1, :8]))
    row = {"export_s": seconds, "bytes": path.stat().st_size, "checks": len(checks),
           "max_abs_diff": max(c.max_abs_diff for c in checks)}
    print(f"forward export_onnx: {seconds:.0f} s, {row['bytes'] / 2**20:.0f} MiB, {len(checks)} onnxruntime checks, "
          f"max abs diff {row['max_abs_diff']:.1e}", flush=True)
    return row


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| profile | optimize | runtime call | save | saved | load | load = runtime | ONNX export | ONNX files "
             "| `onnx_generate` (first) | ONNX = runtime |",
             "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| `{r['profile']}` | {r['optimize_s']:.0f} s | {r['runtime_s']:.2f} s | {r['save_s']:.1f} s | "
                     f"{r['saved_bytes'] / 2**20:.1f} MiB | {r['load_s']:.0f} s | {r['loaded_identical']} | "
                     f"{r['onnx_export_s']:.0f} s | {r['onnx_bytes'] / 2**20:.0f} MiB | {r['onnx_s']:.2f} s "
                     f"({r['onnx_first_s']:.2f} s) | {r['onnx_identical']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profiles", default="none,mla")
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--calibration-tokens", type=int, default=8192)
    parser.add_argument("--out", default="bench/results/deploy.json")
    args = parser.parse_args()
    names = args.profiles.split(",")
    unknown = [n for n in names if n not in PROFILES]
    if unknown:
        raise SystemExit(f"unknown profile(s) {unknown}; choose from {', '.join(PROFILES)}")
    model, tokenizer = models.load("smollm2")
    ids = torch.tensor(tokenizer(models.heldout_text())["input_ids"])
    calibration = ids[:args.calibration_tokens].unsqueeze(0)
    start = args.calibration_tokens
    prompt = torch.stack([ids[start + i * args.prompt:start + (i + 1) * args.prompt] for i in range(args.batch)])
    with tempfile.TemporaryDirectory(prefix="dscompile-deploy-") as work:
        forward = forward_export(model, prompt, Path(work))
        rows = [measure(n, model, prompt, calibration, args.new, Path(work)) for n in names]
    print(table(rows))
    write_result(Path(args.out), {"machine": platform.platform(), "processor": platform.processor(),
                                  "threads": torch.get_num_threads(), "torch": torch.__version__,
                                  "batch": args.batch, "prompt": args.prompt, "new": args.new,
                                  "forward_export": forward, "rows": rows})


if __name__ == "__main__":
    main()
