"""Perplexity and throughput helpers: same windows for every model, errors for too little text."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from tiny import ids, tiny_llama

from dscompile import ConfigError
from dscompile.evaluate import logits_of, perplexity, tokens_per_second, windows


def test_windows_drop_the_ragged_tail():
    got = windows(torch.arange(10), 4)
    assert [w.tolist() for w in got] == [[[0, 1, 2, 3]], [[4, 5, 6, 7]]]
    assert len(windows(torch.arange(100), 4, max_windows=3)) == 3
    with pytest.raises(ConfigError, match="fewer than one window"):
        windows(torch.arange(3), 4)
    with pytest.raises(ConfigError, match="at least 2"):
        windows(torch.arange(3), 1)


def test_uniform_model_has_vocabulary_perplexity():
    uniform = lambda x: torch.zeros(*x.shape, 200)  # noqa: E731
    assert perplexity(uniform, [ids(1, 9), ids(2, 5)]) == pytest.approx(200.0)


def test_perplexity_matches_hf_loss_and_counts_progress():
    model, x = tiny_llama(), ids(1, 16)
    seen = []
    ppl = perplexity(model, [x], progress=seen.append)
    with torch.no_grad():
        loss = model(x, labels=x).loss
    assert ppl == pytest.approx(math.exp(float(loss)), rel=1e-5)
    assert seen == [1]
    with pytest.raises(ConfigError, match="at least one window"):
        perplexity(model, [])


def test_logits_of_every_output_style():
    t = torch.ones(1, 2, 3)
    assert logits_of(t) is t
    assert logits_of(SimpleNamespace(logits=t)) is t
    assert logits_of((t, None)) is t
    with pytest.raises(ConfigError, match="cannot find logits"):
        logits_of({"x": 1})


def test_tokens_per_second_is_positive_and_counts_tokens():
    calls = []
    rate = tokens_per_second(lambda x: calls.append(x.numel()), ids(2, 8), repeats=2)
    assert rate > 0 and calls == [16, 16, 16]
