"""ONNX of the optimized runtime: prefill, decode and draft graphs with the cache as inputs and outputs, checked in
onnxruntime before they are kept, and greedy generation in onnxruntime token-identical to the PyTorch runtime."""

from __future__ import annotations

import json

import onnx
import pytest
import torch
from tiny import ids, tiny_llama
from transformers import LlamaConfig, LlamaForCausalLM
from zoo import built

import dscompile
from dscompile import ConfigError, LoweringError, UnsupportedError, cli
from dscompile.lower import onnx_runtime
from dscompile.monitor import Monitor

CALIBRATION = torch.randint(0, 128, (2, 256), generator=torch.Generator().manual_seed(0))


def varied_llama() -> LlamaForCausalLM:
    """A tiny Llama whose greedy continuations do not collapse into one repeated token, so untrained MTP drafts
    are sometimes kept and sometimes not."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=False, initializer_range=0.2, attn_implementation="sdpa")
    return LlamaForCausalLM(cfg).eval()


def padded_pair(vocab: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randint(1, vocab, (2, 7), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(x)
    mask[1, :3] = 0
    return x.masked_fill(mask == 0, 0), mask


def assert_same_generation(opt, folder, new=16, padding=True, **kwargs):
    """Batch 1, then batch 2 (left padding where the model takes a mask): onnxruntime gives PyTorch's tokens."""
    x, mask = padded_pair(kwargs.pop("vocab", 128))
    cases = [(x[:1], None), (x, mask) if padding else (x, None)]
    for prompt, prompt_mask in cases:
        expected = opt.generate(prompt, attention_mask=prompt_mask, max_new_tokens=new, eos_token_id=[])
        got = dscompile.onnx_generate(folder, prompt, attention_mask=prompt_mask, max_new_tokens=new,
                                      eos_token_id=[], **kwargs)
        assert torch.equal(got, expected)


def cache_inputs(path):
    graph = onnx.load(str(path), load_external_data=False).graph
    return {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}


def test_mla_with_mtp_exports_a_latent_cache_and_speculates_in_onnxruntime(tmp_path):
    """MLA's latent replaces K and V in the exported cache; MTP's heads draft and the decode graph verifies."""
    profile = {"mla": {"kv_ratio": 0.5}, "mtp": {"depth": 2, "speculation": "always"}}
    opt = dscompile.optimize(varied_llama(), profile, CALIBRATION, example_inputs=ids(), lower="eager")
    folder = tmp_path / "mla_mtp"
    checks = dscompile.export_onnx_runtime(opt, folder)
    assert {c.graph for c in checks} == {"prefill", "decode", "draft"}
    assert all(c.max_abs_diff < 1e-4 for c in checks)
    assert sorted(p.name for p in folder.iterdir()) == ["decode.onnx", "draft.onnx", "prefill.onnx", "runtime.json"]
    assert not list(tmp_path.glob(".*"))  # no temporary folder left behind
    inputs = cache_inputs(folder / "prefill.onnx")
    latent = [n for n in inputs if n.startswith("latent_")]
    assert latent and not [n for n in inputs if n.startswith(("key_", "value_"))]
    full = 2 * 16 * 2  # kv heads x (key + value head dims)
    assert all(inputs[n] == ["batch", "capacity", 32] and inputs[n][-1] < full for n in latent)
    assert inputs["slot_positions"] == ["batch", "capacity"]
    manifest = json.loads((folder / "runtime.json").read_text())
    assert manifest["mtp"]["depth"] == 2 and manifest["slot_positions"]
    assert manifest["cache_bytes_per_token"] == opt.runtime().program.cache_bytes_per_token()

    assert_same_generation(opt, folder, new=24)
    monitor = Monitor()
    x = padded_pair()[0][:1]
    assert torch.equal(dscompile.onnx_generate(folder, x, max_new_tokens=24, eos_token_id=[], monitor=monitor),
                       dscompile.onnx_generate(folder, x, max_new_tokens=24, eos_token_id=[], speculate=False))
    stats = monitor.last.extra
    assert 1.0 < stats["mtp_tokens_per_step"] < 3.0  # drafts kept and rejected: both paths ran
    assert monitor.last.cache_bytes == manifest["cache_bytes_per_token"] * stats["capacity"]


def test_moe_with_mla_absorb_exports_separate_prefill_and_decode_graphs(tmp_path):
    profile = {"mla": {"kv_ratio": 0.5, "rope_mode": "absorb"}, "moe": {"n_experts": 16, "n_shared": 2, "top_k": 6}}
    opt = dscompile.optimize(tiny_llama(), profile, CALIBRATION, example_inputs=ids(), lower="eager")
    folder = tmp_path / "moe"
    checks = dscompile.export_onnx_runtime(opt, folder)
    assert [c.graph for c in checks] == ["prefill", "prefill", "decode", "decode"]
    inputs = cache_inputs(folder / "decode.onnx")
    assert inputs["rope_key_0"][:3] == ["batch", 2, "capacity"] and inputs["latent_0"][:2] == ["batch", "capacity"]
    assert_same_generation(opt, folder)


def test_hand_written_model_with_position_tables(tmp_path):
    """A model without position_ids or attention_mask: positions are the cache slots, rows are not padded.
    An OptimizedModel given to export_onnx exports its runtime."""
    model, example, expect = built("table_lm")
    opt = dscompile.optimize(model, "none", example_inputs=example, lower="eager")
    folder = tmp_path / "table"
    checks = dscompile.export_onnx(opt, folder)
    assert [c.graph for c in checks] == ["prefill", "prefill"]
    manifest = json.loads((folder / "runtime.json").read_text())
    assert manifest["slot_is_position"] and not manifest["takes_attention_mask"]
    assert_same_generation(opt, folder, new=12, padding=False, vocab=expect.vocab)


def test_command_line_exports_the_runtime(tmp_path, capsys):
    checkpoint = tmp_path / "ckpt"
    tiny_llama().save_pretrained(checkpoint)
    folder = tmp_path / "out"
    assert cli.main(["export-onnx", "--model", str(checkpoint), "--out", str(folder), "--runtime"]) == 0
    assert "onnxruntime prefill shape (1, 5, 9)" in capsys.readouterr().out
    assert (folder / "runtime.json").is_file() and not (folder / "decode.onnx").exists()
    opt = dscompile.optimize(tiny_llama(), "none", example_inputs=ids(), lower="eager")
    assert_same_generation(opt, folder, new=8)
    # a profile that needs calibration text, on a checkpoint without a tokenizer: a clear error, nothing written
    assert cli.main(["export-onnx", "--model", str(checkpoint), "--out", str(tmp_path / "m"), "--profile", "mla"]) == 2
    assert "no tokenizer" in capsys.readouterr().err and not (tmp_path / "m").exists()


def test_missing_or_corrupt_exports_are_refused_clearly(tmp_path):
    with pytest.raises(ConfigError, match="not a folder holding an exported runtime"):
        dscompile.onnx_generate(tmp_path / "nowhere", ids(), max_new_tokens=2)
    with pytest.raises(ConfigError, match="holds no runtime.json"):
        dscompile.onnx_generate(tmp_path, ids(), max_new_tokens=2)
    (tmp_path / "runtime.json").write_text("{not json")
    with pytest.raises(ConfigError, match="corrupt"):
        dscompile.onnx_generate(tmp_path, ids(), max_new_tokens=2)
    (tmp_path / "runtime.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ConfigError, match="not a dscompile-onnx-runtime-1 manifest"):
        dscompile.onnx_generate(tmp_path, ids(), max_new_tokens=2)
    manifest = {"format": onnx_runtime.FORMAT, "files": {"prefill": "prefill.onnx", "decode": "prefill.onnx"}}
    (tmp_path / "runtime.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match="lacks the prefill graph"):
        dscompile.onnx_generate(tmp_path, ids(), max_new_tokens=2)
    (tmp_path / "prefill.onnx").write_bytes(b"truncated")
    with pytest.raises(ConfigError, match="incomplete"):
        dscompile.onnx_generate(tmp_path, ids(), max_new_tokens=2)
    manifest.update(layers=[], dtype="float32", inputs=[], outputs=[], windows=[None], takes_attention_mask=True,
                    slot_positions=False)
    (tmp_path / "runtime.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match="onnxruntime could not load"):
        dscompile.onnx_generate(tmp_path, ids(), max_new_tokens=2)


def test_a_failed_export_leaves_nothing(tmp_path, monkeypatch):
    def reject(*args, **kwargs):
        raise LoweringError("onnxruntime output differs")

    monkeypatch.setattr(onnx_runtime, "_export_all", reject)
    opt = dscompile.optimize(tiny_llama(), "none", example_inputs=ids(), lower="eager")
    with pytest.raises(LoweringError, match="differs"):
        dscompile.export_onnx_runtime(opt, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []  # neither the folder nor the temporary one
    with pytest.raises(ConfigError, match="carries its own profile"):
        dscompile.export_onnx_runtime(opt, tmp_path / "out", profile="mla")
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="is a file"):
        dscompile.export_onnx_runtime(opt, tmp_path / "file")
    with pytest.raises(UnsupportedError, match="export_onnx_runtime"):
        dscompile.export_onnx(tiny_llama(), tmp_path / "x.onnx", profile="mla", example_inputs=ids())
