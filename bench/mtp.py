"""MTP on the embedded model: train the heads once, then tau, acceptance by position and decode speed by depth and
batch against the same runtime without MTP, in one run.

Usage: .venv/bin/python bench/mtp.py [--depths 1,2,3,4] [--batches 1,8] [--train-minutes 40] [--prompts 512]
                                     [--heads bench/results/mtp_heads.safetensors] [--retrain] [--new 128]
                                     [--speculation always|adaptive] [--draft-nodes chain,auto,7]
                                     [--batch1-prompts 8]

Training data: prompts cut from the first part of Python's documentation topics (pydoc_data) and from the standard
library's ``collections``, ``json`` and ``argparse`` sources, continued by the model itself (``train_mtp`` does
that). Heads are trained once at the largest depth: a depth-``d`` profile loads the first ``d`` of them (head ``k``
reads only the heads before it). Evaluation prompts (128 tokens) come from text training did not see: a later part
of the documentation and the ``inspect`` and ``typing`` sources: at batch 1, ``--batch1-prompts`` of them one after
another, at batch 8 one batch of 8. Each configuration generates ``--new`` greedy tokens from each after one warm-up
call; its output is compared token by token with the runtime without MTP, measured again right before it.
"""

from __future__ import annotations

import argparse
import collections
import inspect
import json
import platform
import sys
import time
import typing
from pathlib import Path

import torch

import dscompile
from dscompile import models
from dscompile.passes.mtp_heads import draft_tree
from dscompile.runtime.draft_tree import DraftTree, tree_tokens_per_step

sys.path.insert(0, str(Path(__file__).parent))
from mla import write_result  # noqa: E402

PROMPT = 128


def _texts(tokenizer: typing.Any) -> tuple[list[int], list[int], list[int]]:
    docs = tokenizer(models.heldout_text())["input_ids"]
    train_code = tokenizer(inspect.getsource(collections) + inspect.getsource(json) +
                           inspect.getsource(argparse))["input_ids"]
    held_code = tokenizer(inspect.getsource(inspect) + inspect.getsource(typing))["input_ids"]
    return docs, train_code, held_code


def _prompts(docs: list[int], code: list[int], batch: int, sets: int = 1) -> list[torch.Tensor]:
    """``sets`` batches of ``batch`` held-out prompts, alternating documentation and code, spread over each text
    (a batch of 8 is 8 different prompts already; at batch 1 several sets measure more than one prompt's luck)."""
    count = batch * sets
    rows = []
    for i in range(count):
        source = docs[70_000:] if i % 2 == 0 else code
        start = (i // 2) * (len(source) - PROMPT) // max(1, (count + 1) // 2)
        rows.append(source[start:start + PROMPT])
    return [torch.tensor(rows[j * batch:(j + 1) * batch]) for j in range(sets)]


def train(model: torch.nn.Module, docs: list[int], code: list[int], args: argparse.Namespace) -> dict:
    depth = max(int(d) for d in args.depths.split(","))
    opt = dscompile.optimize(model, {"mtp": {"depth": depth}}, example_inputs=torch.tensor([docs[:16]]))
    data = [torch.tensor([docs[:60_000]]), torch.tensor([code])]
    report = dscompile.train_mtp(opt, data, max_minutes=args.train_minutes, prompts=args.prompts)
    Path(args.heads).parent.mkdir(parents=True, exist_ok=True)
    opt.save_mtp(args.heads)
    print(f"trained depth {depth}: {report.to_dict()}", flush=True)
    return {"depth": depth, "minutes": args.train_minutes, "prompts": args.prompts, **report.to_dict()}


def measure_heldout(model: torch.nn.Module, docs: list[int], args: argparse.Namespace) -> dict:
    """The heads on documentation neither training (the first 60,000 tokens) nor the evaluation prompts (from token
    70,000) use, with ``dscompile.measure_mtp``: chained acceptance, and the tokens per step of the draft tree, over
    128 continuations (12,000 positions, against one prompt's 128 tokens in the speed rows). Heads saved before rank
    shares were measured keep these (saved with them), so their tree is chosen on held-out text as ``train_mtp``
    chooses it. (Measured on the training prompts, the first choice was right 94% of the time, against about half
    on new text: rank shares must come from held-out text.)"""
    depth = max(int(d) for d in args.depths.split(","))
    opt = dscompile.optimize(model, {"mtp": {"depth": depth, "heads": args.heads}},
                             example_inputs=torch.tensor([docs[:16]]))
    saved = opt.mtp_heads().rank_shares
    found = dscompile.measure_mtp(opt, torch.tensor([docs[60_000:70_000]]), prompts=128)
    if saved is None:
        opt.save_mtp(args.heads)
    shares = saved if saved is not None else found["rank_shares"]  # what the speed rows' trees are chosen by
    by_depth = {}
    for d in (int(d) for d in args.depths.split(",")):
        tree = draft_tree(shares, d)
        by_depth[d] = {"chain": tree_tokens_per_step(DraftTree.chain(d), found["ranks"]),
                       "tree": tree_tokens_per_step(tree, found["ranks"]), "nodes": tree.size}
    row = {"acceptance": found["acceptance"], "positions": int(found["ranks"].shape[0]),
           "tokens_per_step_by_depth": by_depth, "rank_shares": found["rank_shares"], "shares_saved": saved is None}
    print(f"held-out: {row}", flush=True)
    return row


def speed(opt: dscompile.OptimizedModel, prompts: list[torch.Tensor], new: int) -> tuple[list[torch.Tensor], dict]:
    """Every prompt set's ``new`` tokens after one warm-up call: decode tokens over decode seconds of all of them,
    and tau and acceptance over all their speculative steps."""
    opt.generate(prompts[0], max_new_tokens=new)  # warm-up: compiles the step
    outs, decoded, seconds, wall = [], 0, 0.0, 0.0
    steps, tokens, plain, accepted = 0, 0.0, 0, None
    for batch in prompts:
        start = time.perf_counter()
        outs.append(opt.generate(batch, max_new_tokens=new))
        wall += time.perf_counter() - start
        stats = opt.monitor.last
        decoded += stats.decode_tokens_per_s * stats.decode_s
        seconds += stats.decode_s
        n = stats.extra.get("mtp_steps") or 0
        steps += n
        tokens += n * (stats.extra.get("mtp_tokens_per_step") or 0)
        plain += stats.extra.get("mtp_plain_steps") or 0
        if "mtp_acceptance" in stats.extra:
            rates = torch.tensor(stats.extra["mtp_acceptance"]) * n
            accepted = rates if accepted is None else accepted + rates
    row = {"decode_tok_s": decoded / seconds, "wall_s": wall, "prompt_sets": len(prompts),
           "mtp_tokens_per_step": round(tokens / steps, 4) if steps else None,
           "mtp_acceptance": [round(float(a), 4) for a in accepted / max(steps, 1)] if accepted is not None else None,
           "mtp_plain_steps": plain if accepted is not None else None, "mtp_steps": steps or None}
    return outs, row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", default="1,2,3,4")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--train-minutes", type=float, default=40.0)
    parser.add_argument("--prompts", type=int, default=2048)
    parser.add_argument("--heads", default="bench/results/mtp_heads.safetensors",
                        help="trained heads (trained first when missing); 'none': untrained heads, no training")
    parser.add_argument("--retrain", action="store_true")
    parser.add_argument("--train-only", action="store_true", help="train and save the heads, measure nothing")
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--batch1-prompts", type=int, default=8,
                        help="prompts measured one after another at batch 1 (one prompt's tau is mostly its luck)")
    parser.add_argument("--speculation", choices=("always", "adaptive"), default="always",
                        help="always: every step drafts (the heads' own figures); adaptive: the runtime's gate")
    parser.add_argument("--draft-nodes", default="chain,auto",
                        help="comma-separated draft shapes to measure at every depth: 'chain' (depth drafts), 'auto' "
                             "(the default tree) or a tree size (sizes not above the depth are skipped)")
    parser.add_argument("--out", default="bench/results/mtp.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tokenizer = models.load("smollm2")
    docs, train_code, held_code = _texts(tokenizer)
    result: dict = {"machine": platform.platform(), "threads": torch.get_num_threads(), "new_tokens": args.new,
                    "speculation": args.speculation}
    untrained = args.heads == "none"  # the heads as built: what the adaptive gate has to cope with
    if not untrained and (args.retrain or not Path(args.heads).is_file()):
        result["training"] = train(model, docs, train_code, args)
        Path(args.heads).with_suffix(".json").write_text(json.dumps(result["training"], indent=2))
    if not untrained:
        result["heldout"] = measure_heldout(model, docs, args)
    if args.train_only:
        return
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        prompts = _prompts(docs, held_code, batch, args.batch1_prompts if batch == 1 else 1)
        configs = [(int(d), int(d) if n == "chain" else None if n == "auto" else int(n))
                   for d in args.depths.split(",") for n in args.draft_nodes.split(",")
                   if n in ("chain", "auto") or int(n) > int(d)]
        torch._dynamo.reset()
        plain = dscompile.optimize(model, "none", example_inputs=prompts[0][:1, :16])  # built once, timed often
        for depth, nodes in configs:
            # The baseline again right before each configuration: this machine drifts by 5-10% within minutes.
            base_out, base = speed(plain, prompts, args.new)
            print(f"batch {batch} without MTP: {base['decode_tok_s']:.1f} tok/s", flush=True)
            torch._dynamo.reset()
            opt = dscompile.optimize(model, {"mtp": {"depth": depth, "heads": None if untrained else args.heads,
                                                     "speculation": args.speculation, "draft_nodes": nodes}},
                                     example_inputs=prompts[0][:1, :16])
            out, row = speed(opt, prompts, args.new)
            same = torch.cat([(o == b).all(dim=1) for o, b in zip(out, base_out)])
            row.update(batch=batch, depth=depth, draft_nodes=nodes,
                       drafted=opt.runtime().draft_tree(batch).size if opt.runtime().speculates(batch) else 0,
                       speedup=row["decode_tok_s"] / base["decode_tok_s"],
                       baseline_tok_s=base["decode_tok_s"], rows_identical=int(same.sum()), rows=len(same),
                       first_difference=[int((o != b).nonzero()[0]) if not bool((o == b).all()) else None
                                         for outs, bases in zip(out, base_out) for o, b in zip(outs, bases)])
            print(f"batch {batch} depth {depth} nodes {row['drafted']}: tau {row['mtp_tokens_per_step']}, acceptance "
                  f"{row['mtp_acceptance']}, plain steps {row['mtp_plain_steps']}, "
                  f"{row['decode_tok_s']:.1f} tok/s ({row['speedup']:.2f}x), "
                  f"identical rows {row['rows_identical']}/{len(same)}", flush=True)
            rows.append(row)
    result["rows"] = rows
    write_result(Path(args.out), result)


if __name__ == "__main__":
    main()
