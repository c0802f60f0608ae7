"""Save and load of optimized models: the rewrites, healed values and MTP heads come back without calibrating,
only onto the model they were made from, and broken folders say what is wrong."""

from __future__ import annotations

import json

import pytest
import torch
from test_compose import LOSSY, calibration
from test_mtp import varied_llama
from tiny import ids, tiny_llama

import dscompile
from dscompile import ConfigError
from dscompile.evaluate import logits_of


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A lossy MLA + MoE + MTP model with 'healed' factors and trained heads, saved once."""
    opt = dscompile.optimize(varied_llama(), LOSSY, calibration(128), example_inputs=ids(), lower="eager")
    with torch.no_grad():
        next(iter(opt.session.mla_plan.factors.values())).down.mul_(1.1)  # as healing would change it
        head = opt.mtp_heads()
        for p in head.heads.parameters():
            p.add_(0.01)
    head.trained = True
    folder = tmp_path_factory.mktemp("saved") / "model"
    opt.save(str(folder))
    return opt, folder


def test_a_loaded_model_computes_and_generates_what_the_saved_one_did(saved):
    opt, folder = saved
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json", "mtp.safetensors", "rewrites.safetensors"]
    loaded = dscompile.load_optimized(folder, varied_llama())
    x = torch.randint(1, 128, (2, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.allclose(logits_of(loaded(x)), logits_of(opt(x)), atol=1e-5)
    assert torch.equal(loaded.generate(x, max_new_tokens=16, eos_token_id=[]),
                       opt.generate(x, max_new_tokens=16, eos_token_id=[]))
    before, after = opt.report().to_dict(), loaded.report().to_dict()
    for key in ("mla_ranks", "moe_expert_load", "moe_maxvio", "kv_bytes_per_token_after", "params_after",
                "active_params_per_token"):
        assert after[key] == before[key], key
    heads, loaded_heads = opt.mtp_heads(), loaded.mtp_heads()
    assert loaded_heads.trained
    for a, b in zip(heads.heads.parameters(), loaded_heads.heads.parameters()):
        assert torch.equal(a, b)
    assert loaded.profile.mla == opt.profile.mla and loaded.profile.moe == opt.profile.moe
    assert loaded.lower == "eager"


def test_another_model_is_refused(saved):
    _, folder = saved
    with pytest.raises(ConfigError, match="saved from another model"):
        dscompile.load_optimized(folder, varied_llama(seed=5))


def test_the_source_name_loads_the_model_when_none_is_given(tmp_path, monkeypatch):
    from dscompile import models

    opt = dscompile.optimize(tiny_llama(), {"mla": {"kv_ratio": 0.5}}, calibration(128), lower="eager")
    opt.save(str(tmp_path / "m"), source="tiny")
    manifest = json.loads((tmp_path / "m" / "manifest.json").read_text())
    assert manifest["source"] == "tiny" and manifest["mtp"] is None and manifest["moe"] is None
    opt.save(str(tmp_path / "m2"))
    with pytest.raises(ConfigError, match="does not name its source model"):
        dscompile.load_optimized(tmp_path / "m2")
    asked = []
    monkeypatch.setattr(models, "load", lambda name: (asked.append(name), (tiny_llama(), None))[1])
    loaded = dscompile.load_optimized(tmp_path / "m")
    assert asked == ["tiny"]
    with torch.no_grad():
        assert torch.allclose(logits_of(loaded(ids(1, 6))), logits_of(opt(ids(1, 6))), atol=1e-5)


def test_untrained_heads_are_not_saved(tmp_path):
    opt = dscompile.optimize(tiny_llama(), {"mtp": {"depth": 1}}, example_inputs=ids(), lower="eager")
    opt.save(str(tmp_path / "m"))
    assert not (tmp_path / "m" / "mtp.safetensors").exists()
    loaded = dscompile.load_optimized(tmp_path / "m", tiny_llama())
    assert loaded.profile.mtp.depth == 1 and not loaded.mtp_heads().trained


def test_broken_folders_say_what_is_wrong(tmp_path, saved):
    _, folder = saved
    with pytest.raises(ConfigError, match="not a saved dscompile model"):
        dscompile.load_optimized(tmp_path / "nowhere", tiny_llama())
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "manifest.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        dscompile.load_optimized(bad, tiny_llama())
    (bad / "manifest.json").write_text(json.dumps({"format": "something-else/9"}))
    with pytest.raises(ConfigError, match="another version of dscompile"):
        dscompile.load_optimized(bad, tiny_llama())
    manifest = json.loads((folder / "manifest.json").read_text())
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match="rewrites.safetensors is missing"):
        dscompile.load_optimized(bad, varied_llama())
    file = tmp_path / "file"
    file.write_text("x")
    opt = dscompile.optimize(tiny_llama(), "none", example_inputs=ids(), lower="eager")
    with pytest.raises(ConfigError, match="is not a folder"):
        opt.save(str(file))
