"""What every example needs: a model (``--model``, default the embedded SmolLM2-135M), some text to calibrate on
and a prompt. A checkpoint without a tokenizer (the CI smoke test uses a tiny random one) gets token ids instead."""

from __future__ import annotations

import argparse
from typing import Any

import torch

import dscompile


def setup(description: str) -> tuple[torch.nn.Module, Any, Any, torch.Tensor, argparse.Namespace]:
    """``(model, tokenizer, calibration, prompt_ids, args)`` from the command line."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", default="smollm2", help="an embedded model name or a local HF checkpoint folder")
    parser.add_argument("--out", default="example-output", help="where files are written")
    parser.add_argument("--minutes", type=float, default=2.0, help="time budget of healing or training")
    args = parser.parse_args()
    model, tokenizer = dscompile.models.load(args.model)
    if tokenizer is not None:
        calibration = [dscompile.models.heldout_text()[:40_000]]
        prompt = torch.tensor([tokenizer("def fibonacci(n):")["input_ids"]])
    else:
        vocab = model.config.vocab_size
        calibration = torch.randint(1, vocab, (4, 512), generator=torch.Generator().manual_seed(0))
        prompt = torch.randint(1, vocab, (1, 8), generator=torch.Generator().manual_seed(1))
    return model, tokenizer, calibration, prompt, args


def show(tokenizer: Any, ids: torch.Tensor) -> str:
    return tokenizer.decode(ids[0]) if tokenizer is not None else str(ids[0].tolist())
