"""Capture and matching time on the embedded model, both capture paths (Inductor compile excluded).

Usage: .venv/bin/python bench/capture.py [--model smollm2] [--repeats 3] [--out bench/results/capture.json]
Target (issue 2): under 10 s on the 2-core CPU machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from dscompile import models
from dscompile.capture import capture_dynamo, capture_export
from dscompile.patterns import MatchSet, match_all


def _timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def _dynamo_matches(model, example, dynamic):
    merged = MatchSet()
    for graph in capture_dynamo(model, example, dynamic=dynamic):
        merged.extend(match_all(graph))
    return merged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="bench/results/capture.json")
    args = parser.parse_args()

    (model, tokenizer), load_s = _timed(lambda: models.load(args.model))
    example = torch.tensor([tokenizer("def main():\n    return 42\n")["input_ids"]])
    rows = []
    for path in ("export", "dynamo"):
        for dynamic in (False, True):
            best = None
            for _ in range(args.repeats):
                if path == "export":
                    captured, capture_s = _timed(lambda d=dynamic: capture_export(model, example, dynamic=d))
                    matches, match_s = _timed(lambda c=captured: match_all(c))
                else:  # the dynamo collector matches inside the backend, so time both together
                    matches, capture_s = _timed(lambda d=dynamic: _dynamo_matches(model, example, d))
                    match_s = 0.0
                total = capture_s + match_s
                if best is None or total < best["total_s"]:
                    best = {"path": path, "dynamic": dynamic, "capture_s": capture_s, "match_s": match_s,
                            "total_s": total, "counts": matches.counts()}
            rows.append(best)

    print(f"model {args.model} (loaded in {load_s:.2f} s), {torch.get_num_threads()} threads, "
          f"best of {args.repeats}")
    print(f"{'path':<8}{'dynamic':<9}{'capture s':>10}{'match s':>9}{'total s':>9}  matches")
    for r in rows:
        c = r["counts"]
        print(f"{r['path']:<8}{str(r['dynamic']):<9}{r['capture_s']:>10.2f}{r['match_s']:>9.2f}{r['total_s']:>9.2f}"
              f"  attention {c['attention']}, ffn {c['ffn']}, lm_head {c['lm_head']}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": args.model, "load_s": load_s, "machine": platform.platform(),
                               "cpus": torch.get_num_threads(), "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
