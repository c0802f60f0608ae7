"""dscompile.optimize / inspect / OptimizedModel.report: the public skeleton later rewrites fill in."""

from __future__ import annotations

import logging

import pytest
import torch
from tiny import VOCAB, ids, tiny_llama

import dscompile
from dscompile import CaptureError, ConfigError, OptimizedModel, UnsupportedError
from dscompile.passes import manager
from dscompile.session import CompileSession, last_session


class CharTokenizer:
    """Enough of a tokenizer for calibration texts: one id per character."""

    def __call__(self, text: str) -> dict[str, list[int]]:
        return {"input_ids": [ord(c) % VOCAB for c in text]}


def test_optimize_none_is_exact_and_reports():
    model, x = tiny_llama(), ids(1, 12)
    opt = dscompile.optimize(model, "none", example_inputs=x, lower="eager")
    assert isinstance(opt, OptimizedModel) and isinstance(opt, torch.nn.Module)
    with torch.no_grad():
        out, ref = opt(x), model(x)
    assert type(out) is type(ref)
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=0)
    report = opt.report().to_dict()
    for key in ("kv_bytes_per_token_before", "kv_bytes_per_token_after", "params_before", "params_after",
                "active_params_per_token", "matches"):
        assert key in report
    # 2 layers x 2 KV heads x (16 + 16) values x 4 bytes
    assert report["kv_bytes_per_token_before"] == report["kv_bytes_per_token_after"] == 2 * 2 * 32 * 4
    n_params = sum(p.numel() for p in model.parameters())
    assert report["params_before"] == report["params_after"] == n_params
    assert report["active_params_per_token"] == n_params  # tied: the embedding is the head, read in full
    assert report["matches"]["counts"] == {"attention": 2, "ffn": 2, "lm_head": 1}
    assert opt.config is model.config and opt.matches().counts()["ffn"] == 2
    assert "KV bytes per token   512 -> 512" in str(opt.report())


def test_untied_head_embedding_rows_are_not_active():
    model = tiny_llama(tied=False)
    opt = dscompile.optimize(model, example_inputs=ids(), lower="eager")
    n_params = sum(p.numel() for p in model.parameters())
    assert opt.report().active_params_per_token == n_params - (VOCAB - 1) * 64


def test_calibration_texts_serve_as_example(caplog):
    model = tiny_llama()
    with caplog.at_level(logging.INFO, logger="dscompile"):
        opt = dscompile.optimize(model, "none", calibration=["hello world, calibration"], tokenizer=CharTokenizer(),
                                 lower="eager")
    assert opt.report().matches.counts()["attention"] == 2
    opt = dscompile.optimize(model, "none", calibration=[ids(2, 6), ids(1, 9)], lower="eager")
    assert opt.report().graphs == 1


def test_short_calibration_warns_for_lossy_profiles(monkeypatch, caplog):
    monkeypatch.setattr(manager, "REGISTRY", {"mla": lambda gm, ctx: manager.PassResult("mla", gm)})
    with caplog.at_level(logging.WARNING, logger="dscompile"):
        dscompile.optimize(tiny_llama(), "mla", calibration=ids(1, 16), lower="eager")
    assert "calibration holds 16 tokens" in caplog.text


@pytest.mark.parametrize("kwargs, error, message", [
    ({"example_inputs": None}, CaptureError, "example inputs are required"),
    ({"example_inputs": "abc"}, CaptureError, "example inputs must be a tensor"),
    ({"example_inputs": ids(), "lower": "tvm"}, ConfigError, "valid targets"),
    ({"example_inputs": ids(), "profile": "nope"}, ConfigError, "presets"),
    ({"calibration": ["text"]}, ConfigError, "without a tokenizer"),
    ({"calibration": torch.randn(2, 3)}, ConfigError, "integer tensor"),
    ({"calibration": [ids(), "text"]}, ConfigError, "not a mix"),
    ({"calibration": torch.zeros(1, 0, dtype=torch.long)}, ConfigError, "empty"),
    ({"calibration": torch.zeros(1, 2, 3, dtype=torch.long)}, ConfigError, "1-D or 2-D"),
    ({"calibration": 3}, ConfigError, "must be a LongTensor"),
])
def test_bad_input_is_refused_before_work(kwargs, error, message):
    with pytest.raises(error, match=message):
        dscompile.optimize(tiny_llama(), **kwargs)


def test_rewrites_this_version_lacks_are_refused(monkeypatch):
    monkeypatch.setattr(manager, "REGISTRY", {})
    with pytest.raises(UnsupportedError, match="profile 'balanced' asks for the MLA, MOE, MTP rewrite"):
        dscompile.optimize(tiny_llama(), "balanced", example_inputs=ids())


@pytest.mark.parametrize("model, message", [
    ("not a model", "expected a torch.nn.Module"),
    (torch.nn.ReLU(), "no parameters"),
    (torch.nn.Linear(2, 2).to(torch.float64), "unsupported parameter dtype"),
])
def test_models_that_cannot_be_language_models(model, message):
    with pytest.raises(CaptureError, match=message):
        dscompile.optimize(model, example_inputs=ids())


@pytest.mark.parametrize("path", ["export", "dynamo"])
def test_inspect_both_paths(path):
    matches = dscompile.inspect(tiny_llama(), ids(), path=path)
    assert matches.counts() == {"attention": 2, "ffn": 2, "lm_head": 1}
    assert matches.attention[0].n_kv_heads == 2 and matches.lm_head[0].tied
    table = matches.table()
    assert "model.layers.1.mlp" in table and "rope=rotate_half/16/base=10000.0" in table


def test_inspect_bad_path():
    with pytest.raises(ConfigError, match="valid paths: export, dynamo"):
        dscompile.inspect(tiny_llama(), ids(), path="jit")


def test_report_before_any_compile():
    with pytest.raises(ValueError, match="nothing was compiled yet"):
        dscompile.Report.from_session(CompileSession(), dscompile.PRESETS["none"])
    assert isinstance(last_session(), CompileSession)


def test_models_attribute_is_lazy():
    assert dscompile.models.__name__ == "dscompile.models"
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        dscompile.nothing  # noqa: B018


def _bert_like():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, attn_implementation="sdpa")
    return BertModel(cfg).eval()


class _EncoderWithHead(torch.nn.Module):
    """Bidirectional attention plus a vocabulary projection: has everything but causality."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(VOCAB, 32)
        self.qkv = torch.nn.Linear(32, 96)
        self.head = torch.nn.Linear(32, VOCAB, bias=False)

    def forward(self, ids):
        q, k, v = self.qkv(self.emb(ids)).unsqueeze(1).chunk(3, dim=-1)
        return self.head(torch.nn.functional.scaled_dot_product_attention(q, k, v).squeeze(1))


@pytest.mark.parametrize("make, message", [
    (lambda: torch.nn.Sequential(torch.nn.Embedding(VOCAB, 8), torch.nn.Linear(8, VOCAB)), "no attention was found"),
    (_bert_like, "no LM head"),
    (_EncoderWithHead, "not a causal language model"),
])
def test_models_that_are_not_causal_lms(make, message):
    with pytest.raises(dscompile.MatchError, match=message):
        dscompile.optimize(make(), example_inputs=ids(), lower="eager")


def test_dynamo_that_skips_the_backend_is_reported():
    with torch._dynamo.config.patch(recompile_limit=0), pytest.raises(CaptureError, match="recompile limit"):
        dscompile.optimize(tiny_llama(), example_inputs=ids(), lower="eager")
    assert torch._dynamo.config.recompile_limit > 0
