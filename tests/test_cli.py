"""The command line: the main job end to end on the embedded model, inspect, export-onnx and errors."""

from __future__ import annotations

import json

import pytest
import torch
from tiny import tiny_llama

from dscompile import cli


@pytest.fixture
def tiny_checkpoint(tmp_path):
    """A local HF checkpoint directory (random weights, no tokenizer)."""
    path = tmp_path / "tiny"
    tiny_llama().save_pretrained(path)
    return path


@pytest.mark.slow
def test_optimize_main_job_on_smollm2(tmp_path, capsys):
    out = tmp_path / "result.json"
    code = cli.main(["optimize", "--model", "smollm2", "--lower", "eager", "--windows", "2", "--window", "64",
                     "--json", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "graph diff (no changes)" in printed
    assert "attention matched 30 -> 30" in printed and "KV bytes per token   46,080 -> 46,080" in printed
    assert "perplexity (held-out)" in printed and "forward tokens/s" in printed
    result = json.loads(out.read_text())
    assert result["before"]["perplexity"] == pytest.approx(result["after"]["perplexity"], rel=1e-4)
    assert 1.0 < result["before"]["perplexity"] < 100.0
    assert result["report"]["matches"]["counts"] == {"attention": 30, "ffn": 30, "lm_head": 1}
    assert "generation: batch 1" in printed and "tok/s" in printed
    assert result["generation"]["new_tokens"] == 32 and result["generation"]["cache_bytes"] > 0


@pytest.mark.slow
def test_optimize_with_mtp_trains_saves_and_speculates(tmp_path, capsys):
    heads = tmp_path / "heads.safetensors"
    code = cli.main(["optimize", "--model", "smollm2", "--profile", "mtp", "--lower", "eager", "--windows", "1",
                     "--window", "64", "--calibration-tokens", "512", "--mtp-minutes", "0.5", "--save-mtp",
                     str(heads), "--generate", "24", "--json", str(tmp_path / "r.json")])
    assert code == 0
    printed = capsys.readouterr().out
    assert "MTP heads: held-out acceptance by depth" in printed and f"wrote {heads}" in printed
    assert heads.is_file()
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["before"]["perplexity"] == pytest.approx(result["after"]["perplexity"], rel=1e-4)  # lossless
    generation = result["generation"]
    assert len(generation["extra"]["mtp_acceptance"]) == 3 and generation["extra"]["mtp_tokens_per_step"] >= 1.0
    assert "tokens/step" in printed


@pytest.mark.slow
def test_inspect_smollm2_table(capsys, tmp_path):
    assert cli.main(["inspect", "--model", "smollm2", "--json", str(tmp_path / "m.json")]) == 0
    printed = capsys.readouterr().out
    assert "30 attention, 30 FFN, 1 LM head, 0 near-miss(es)" in printed
    assert "model.layers.29.self_attn" in printed and "heads=9 kv_heads=3 head_dim=64" in printed
    data = json.loads((tmp_path / "m.json").read_text())
    assert data["lm_head"][0]["tied"] is True and data["lm_head"][0]["vocab_size"] == 49152


def test_inspect_local_checkpoint_dynamo_path(tiny_checkpoint, capsys):
    assert cli.main(["inspect", "--model", str(tiny_checkpoint), "--path", "dynamo"]) == 0
    assert "2 attention, 2 FFN, 1 LM head" in capsys.readouterr().out


def test_export_onnx_command(tiny_checkpoint, tmp_path, capsys):
    target = tmp_path / "m.onnx"
    assert cli.main(["export-onnx", "--model", str(tiny_checkpoint), "--out", str(target)]) == 0
    assert target.is_file() and "onnxruntime shape (2, 12)" in capsys.readouterr().out


def test_errors_exit_2_with_a_message(capsys, tiny_checkpoint):
    assert cli.main(["optimize", "--model", "smollm2", "--profile", "warp"]) == 2
    assert "unknown profile 'warp'" in capsys.readouterr().err
    assert cli.main(["optimize", "--model", "smollm2", "--offload-experts", "8"]) == 2
    assert "--offload-experts needs a profile with MoE" in capsys.readouterr().err
    assert cli.main(["inspect", "--model", "no-such-model"]) == 2
    assert "no-such-model" in capsys.readouterr().err
    assert cli.main(["optimize", "--model", str(tiny_checkpoint), "--lower", "eager"]) == 2
    assert "no tokenizer" in capsys.readouterr().err


def test_bad_arguments_are_usage_errors(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["optimize", "--lower", "tvm"])
    assert exc.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_example_ids_without_tokenizer():
    ids = cli._example(None)
    assert ids.shape == (1, 16) and ids.dtype == torch.long


@pytest.mark.slow
def test_optimize_mla_calibrates_on_text_it_does_not_score_and_heals(tmp_path, capsys):
    out = tmp_path / "result.json"
    code = cli.main(["optimize", "--model", "smollm2", "--profile", "mla", "--lower", "eager", "--windows", "2",
                     "--window", "64", "--calibration-tokens", "2560", "--heal-minutes", "0.05", "--generate", "4",
                     "--save", str(tmp_path / "saved"), "--json", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "KV bytes per token   46,080 -> 23,040" in printed
    result = json.loads(out.read_text())
    report = result["report"]
    assert report["mla_calibration_tokens"] == 2560 and set(report["mla_ranks"].values()) == {192}
    assert 1.0 < result["after"]["perplexity"] / result["before"]["perplexity"] < 1.5
    assert result["generation"]["cache_bytes"] == 23_048 * result["generation"]["extra"]["capacity"]
    import dscompile  # the saved folder names its source, so it loads without calibrating or healing again

    loaded = dscompile.load_optimized(tmp_path / "saved", lower="eager").report().to_dict()
    assert loaded["mla_ranks"] == report["mla_ranks"] and loaded["kv_bytes_per_token_after"] == 23_040
