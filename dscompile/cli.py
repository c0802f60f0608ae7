"""The ``dscompile`` command line: ``inspect``, ``optimize`` (the main job) and ``export-onnx``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .errors import DscompileError

log = logging.getLogger("dscompile")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dscompile", description=__doc__)
    parser.add_argument("--log", default=None, help="log level: debug, info, warning, error (or DSCOMPILE_LOG)")
    sub = parser.add_subparsers(dest="command", required=True)

    def model_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", default="smollm2", help="an embedded model name or a local HF checkpoint dir")
        p.add_argument("--json", dest="json_path", default=None, help="also write the result as JSON here")

    p_inspect = sub.add_parser("inspect", help="print a per-layer table of matches and near-misses")
    model_args(p_inspect)
    p_inspect.add_argument("--path", choices=("export", "dynamo"), default="export", help="capture path")

    p_opt = sub.add_parser("optimize", help="compile a model under a profile and compare it with the original")
    model_args(p_opt)
    p_opt.add_argument("--profile", default="none", help="a preset name or a .toml/.yaml profile file")
    p_opt.add_argument("--lower", default="inductor", choices=("inductor", "eager", "tensorrt"))
    p_opt.add_argument("--window", type=int, default=256, help="tokens per perplexity window")
    p_opt.add_argument("--windows", type=int, default=8, help="held-out windows to measure perplexity on")
    p_opt.add_argument("--generate", type=int, default=32, help="new tokens to generate in the runtime (0: skip)")
    p_opt.add_argument("--calibration-tokens", type=int, default=8192,
                       help="tokens of held-out text, after the perplexity windows, that lossy rewrites are fitted to")
    p_opt.add_argument("--heal-minutes", type=float, default=0.0,
                       help="then heal the rewritten model this long on the calibration text (lossy profiles)")
    p_opt.add_argument("--mtp-minutes", type=float, default=0.0,
                       help="MTP profiles: train the heads this long on continuations of the calibration text")
    p_opt.add_argument("--save-mtp", default=None, help="MTP profiles: save the trained heads to this file")
    p_opt.add_argument("--save", default=None, metavar="DIR",
                       help="save the optimized model (profile, rewrites, trained heads) for dscompile.load_optimized")
    p_opt.add_argument("--offload-experts", type=int, default=None, metavar="N",
                       help="MoE profiles: keep N routed experts per FFN in memory and the rest in files")
    p_opt.add_argument("--expert-dir", default=None, metavar="DIR",
                       help="where --offload-experts writes the expert files (default: a temporary folder)")
    p_opt.add_argument("--report", default=None, metavar="PATH.html",
                       help="write a self-contained HTML report with plots (KV rank, expert load, MTP acceptance)")
    p_opt.add_argument("--png-dir", default=None, metavar="DIR", help="also write the report's plots as PNG files")
    p_opt.add_argument("--monitor", action="store_true",
                       help="show live tokens/s, cache bytes, acceptance and expert load on stderr while generating")

    p_onnx = sub.add_parser("export-onnx", help="export token ids -> logits, or the optimized runtime, to ONNX, "
                            "checked in onnxruntime")
    model_args(p_onnx)
    p_onnx.add_argument("--out", required=True,
                        help="the .onnx file to write (forward), or the folder (runtime: a profile with rewrites, or "
                             "--runtime)")
    p_onnx.add_argument("--profile", default="none", help="a preset name or a .toml/.yaml profile file")
    p_onnx.add_argument("--runtime", action="store_true",
                        help="export the generation runtime (prefill, decode and MTP draft graphs with the KV cache "
                             "as inputs and outputs) even for profile none; run it with dscompile.onnx_generate")
    p_onnx.add_argument("--calibration-tokens", type=int, default=8192,
                        help="tokens of held-out text that MLA/MoE rewrites are fitted to")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the process exit code (errors dscompile raises on purpose give 2)."""
    args = _parser().parse_args(argv)
    from .log import configure

    configure(args.log or "info")
    try:
        result = _COMMANDS[args.command](args)
    except DscompileError as exc:
        print(f"dscompile: error: {exc}", file=sys.stderr)
        return 2
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(result, indent=2, default=str), encoding="utf-8")
        print(f"wrote {args.json_path}")
    return 0


def _load(name: str) -> tuple[torch.nn.Module, Any]:
    from . import models

    return models.load(name)


def _example(tokenizer: Any) -> torch.Tensor:
    text = "The quick brown fox jumps over the lazy dog because it wants to see the river."
    if tokenizer is None:
        return torch.arange(1, 17).unsqueeze(0)
    return torch.tensor([tokenizer(text)["input_ids"]], dtype=torch.long)


def _inspect(args: argparse.Namespace) -> dict[str, Any]:
    from .api import inspect

    model, tokenizer = _load(args.model)
    matches = inspect(model, _example(tokenizer), path=args.path)
    print(matches.table())
    counts = matches.counts()
    print(f"\n{counts['attention']} attention, {counts['ffn']} FFN, {counts['lm_head']} LM head, "
          f"{len(matches.near_misses)} near-miss(es)")
    return matches.to_dict()


def _heldout_ids(tokenizer: Any, tokens: int) -> torch.Tensor:
    from .models import heldout_text

    if tokenizer is None:
        raise DscompileError("the model has no tokenizer, so there is no text to measure perplexity on")
    return torch.tensor(tokenizer(heldout_text(max_chars=tokens * 8))["input_ids"], dtype=torch.long)


def _heldout_windows(tokenizer: Any, window: int, count: int) -> list[torch.Tensor]:
    from .evaluate import windows

    return windows(_heldout_ids(tokenizer, window * count), window, count)


def _calibration(tokenizer: Any, skip: int, tokens: int) -> torch.Tensor:
    """``tokens`` of held-out text that start after the first ``skip`` (the perplexity windows): never scored."""
    ids = _heldout_ids(tokenizer, skip + tokens)[skip:skip + tokens]
    if ids.numel() < tokens:
        raise DscompileError(f"the held-out text has only {ids.numel()} tokens left for calibration")
    return ids.unsqueeze(0)


def _measure(name: str, model: Any, batches: list[torch.Tensor]) -> dict[str, float]:
    from tqdm import tqdm

    from .evaluate import perplexity, tokens_per_second

    with tqdm(total=len(batches), desc=f"perplexity ({name})", unit="window", file=sys.stderr) as bar:
        ppl = perplexity(model, batches, progress=bar.update)
    return {"perplexity": ppl, "tokens_per_s": tokens_per_second(model, batches[0])}


def _optimize(args: argparse.Namespace) -> dict[str, Any]:
    from .api import optimize
    from .profile import resolve_profile

    profile = resolve_profile(args.profile)  # a bad profile fails before the model loads
    if args.offload_experts is not None and profile.moe is None:
        raise DscompileError("--offload-experts needs a profile with MoE (such as 'moe')")
    model, tokenizer = _load(args.model)
    batches = _heldout_windows(tokenizer, args.window, args.windows)
    before = _measure("original", model, batches)
    log.info("compiling with %s (Inductor takes a minute or two on a CPU)", args.lower)
    start = time.perf_counter()
    calibration = _calibration(tokenizer, args.window * args.windows, args.calibration_tokens) \
        if profile.rewrites else None
    optimized = optimize(model, profile, calibration, example_inputs=batches[0], lower=args.lower)
    compile_s = time.perf_counter() - start
    if args.heal_minutes > 0 and profile.rewrites:
        from .heal import heal

        heal(optimized, calibration, max_minutes=args.heal_minutes)
    if profile.mtp is not None and args.mtp_minutes > 0:
        from .train_mtp import train_mtp

        trained = train_mtp(optimized, calibration, max_minutes=args.mtp_minutes)
        print(f"MTP heads: held-out acceptance by depth {[round(a, 3) for a in trained.acceptance]}, "
              f"expected {trained.tokens_per_step:.2f} tokens per step")
    if args.save_mtp:
        if profile.mtp is None:
            raise DscompileError("--save-mtp needs a profile with MTP")
        optimized.save_mtp(args.save_mtp)
        print(f"wrote {args.save_mtp}")
    if args.save:
        optimized.save(args.save, source=args.model)
        print(f"wrote {args.save}")
    if args.offload_experts is not None:
        optimized.offload_experts(args.offload_experts, args.expert_dir)
    after = _measure("optimized", optimized, batches)
    report = optimized.report().to_dict()
    print(optimized.report().diff)
    rows = [
        ("perplexity (held-out)", before["perplexity"], after["perplexity"], "{:.3f}"),
        (f"forward tokens/s ({args.window} tokens)", before["tokens_per_s"], after["tokens_per_s"], "{:.0f}"),
        ("KV bytes per token", report["kv_bytes_per_token_before"], report["kv_bytes_per_token_after"], "{:,}"),
        ("parameters", report["params_before"], report["params_after"], "{:,}"),
    ]
    print(f"\nprofile {profile.name}, lowered with {args.lower}, compiled in {compile_s:.1f} s")
    print(f"{'metric':<34}{'original':>14}{'optimized':>14}{'change':>10}")
    for label, b, a, fmt in rows:
        change = f"{(a / b - 1) * 100:+.2f}%" if b else "n/a"
        print(f"{label:<34}{fmt.format(b):>14}{fmt.format(a):>14}{change:>10}")
    result = {"profile": profile.to_dict(), "before": before, "after": after, "compile_seconds": compile_s,
              "report": report}
    if args.generate > 0:
        result["generation"] = _generate(optimized, tokenizer, args.generate, monitor=args.monitor)
    if args.report or args.png_dir:
        _write_report(args, optimized, profile.name, rows, result.get("generation"))
    return result


def _write_report(args: argparse.Namespace, optimized: Any, profile: str, rows: list[tuple[Any, ...]],
                  generation: dict[str, Any] | None) -> None:
    """The HTML report and/or PNG plots; the report is taken after generation, so MTP acceptance is in it."""
    from .report_html import save_plots, write_html_report

    report = optimized.report()
    if args.report:
        title = f"dscompile report: {args.model}, profile {profile}, lowered with {args.lower}"
        write_html_report(report, args.report, table=rows, generation=generation, png_dir=args.png_dir, title=title)
        print(f"wrote {args.report}")
        if args.png_dir:
            print(f"wrote plots to {args.png_dir}")
    else:
        paths = save_plots(report, args.png_dir, generation=generation)
        print(f"wrote {len(paths)} plot(s) to {args.png_dir}")


def _generate(optimized: Any, tokenizer: Any, new_tokens: int, *, monitor: bool = False) -> dict[str, Any]:
    """Greedy generation in the runtime that owns the KV cache, with the monitor's figures (and, with ``monitor``,
    a live status line on stderr while it runs)."""
    prompt = "def fibonacci(n):"
    ids = torch.tensor([tokenizer(prompt)["input_ids"]], dtype=torch.long)
    log.info("compiling the decode step, then generating %d tokens", new_tokens)
    optimized.runtime().warm_up(ids.shape[0], ids.shape[1] + new_tokens)  # compile time is not decode time
    streamer = None
    if monitor:
        from .live import LiveMonitor

        streamer = LiveMonitor.for_model(optimized, sys.stderr, prompt_tokens=ids.shape[1])
    out = optimized.generate(ids, max_new_tokens=new_tokens, streamer=streamer)
    stats = optimized.monitor.last
    print(f"\ngenerated: {tokenizer.decode(out[0, ids.shape[1]:])!r}")
    print(f"generation: {stats}")
    return {"prompt": prompt, "tokens": out[0].tolist(), **stats.to_dict()}


def _export_onnx(args: argparse.Namespace) -> dict[str, Any]:
    from .lower.onnx import export_onnx
    from .profile import resolve_profile

    profile = resolve_profile(args.profile)  # a bad profile fails before the model loads
    model, tokenizer = _load(args.model)
    runtime = args.runtime or bool(profile.rewrites)
    if runtime:
        from .lower.onnx_runtime import export_onnx_runtime

        calibration = _calibration(tokenizer, 0, args.calibration_tokens) \
            if profile.mla is not None or profile.moe is not None else None
        checks = export_onnx_runtime(model, args.out, profile, calibration, _example(tokenizer))
    else:
        checks = export_onnx(model, args.out, example_inputs=_example(tokenizer))
    for c in checks:
        where = f"{c.graph} " if runtime else ""
        print(f"onnxruntime {where}shape {c.shape}: max abs diff {c.max_abs_diff:.2e}")
    print(f"wrote {args.out}" + (" (run it with dscompile.onnx_generate)" if runtime else ""))
    return {"path": args.out, "runtime": runtime,
            "checks": [{"graph": c.graph, "shape": list(c.shape), "max_abs_diff": c.max_abs_diff} for c in checks]}


_COMMANDS = {"inspect": _inspect, "optimize": _optimize, "export-onnx": _export_onnx}


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
