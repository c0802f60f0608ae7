"""Profiles: presets, files, validation errors that name the bad field."""

from __future__ import annotations

import pytest

from dscompile import PRESETS, ConfigError, MLAConfig, MoEConfig, MTPConfig, Profile, load_profile_file
from dscompile.profile import resolve_profile


def test_presets_have_the_documented_names_and_rewrites():
    assert set(PRESETS) == {"none", "mla", "moe", "mtp", "balanced", "aggressive"}
    assert PRESETS["none"].rewrites == []
    assert PRESETS["balanced"].rewrites == ["mla", "moe", "mtp"]
    assert resolve_profile("mla").mla == MLAConfig(kv_ratio=0.5)


def test_unknown_preset_lists_the_presets():
    with pytest.raises(ConfigError, match="presets: none, mla, moe, mtp, balanced, aggressive"):
        resolve_profile("fastest")


@pytest.mark.parametrize("make, message", [
    (lambda: MLAConfig(kv_ratio=1.0), "kv_ratio must be in"),
    (lambda: MLAConfig(kv_ratio=0.0), "kv_ratio must be in"),
    (lambda: MLAConfig(rope_mode="spin"), "rope_mode"),
    (lambda: MLAConfig(shrinkage=1.2), "mla.shrinkage must be in"),
    (lambda: MoEConfig(n_experts=1), "n_experts must be at least 2"),
    (lambda: MoEConfig(n_experts=8, n_shared=8), "n_shared"),
    (lambda: MoEConfig(n_experts=8, n_shared=2, top_k=7), "top_k must be between 1 and the routed expert count 6"),
    (lambda: MTPConfig(depth=0), "depth must be an integer of at least 1"),
    (lambda: MTPConfig(head="eagle"), "head must be"),
])
def test_impossible_configs_are_refused(make, message):
    with pytest.raises(ConfigError, match=message):
        make()


def test_active_fraction():
    assert MoEConfig(n_experts=64, n_shared=8, top_k=24).active_fraction == 0.5


def test_toml_file_round_trip(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text('[mla]\nkv_ratio = 0.25\nrope_mode = "absorb"\n[mtp]\ndepth = 2\n')
    profile = load_profile_file(path)
    assert profile.name == "mine"
    assert profile.mla == MLAConfig(kv_ratio=0.25, rope_mode="absorb")
    assert profile.moe is None and profile.mtp == MTPConfig(depth=2)
    assert Profile.from_dict(profile.to_dict()) == profile
    assert resolve_profile(str(path)) == profile


def test_json_file_and_true_means_defaults(tmp_path):
    path = tmp_path / "p.json"
    path.write_text('{"moe": true}')
    assert load_profile_file(path).moe == MoEConfig()


@pytest.mark.parametrize("text, message", [
    ("[mla]\nrank = 3\n", r"profile.mla: unknown field\(s\) rank; valid fields: kv_ratio, rope_mode, refine"),
    ("[mlp]\n", r"unknown field\(s\) mlp"),
    ("[mla\n", "could not be parsed"),
    ("mla = 3\n", "profile.mla must be a table"),
    ("[mla]\nkv_ratio = 2.0\n", "kv_ratio must be in"),
])
def test_bad_files_name_the_bad_field(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_profile_file(path)


def test_missing_file_and_wrong_suffix(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_profile_file(tmp_path / "nope.toml")
    other = tmp_path / "p.ini"
    other.write_text("x")
    with pytest.raises(ConfigError, match="use a .toml"):
        load_profile_file(other)


def test_resolve_accepts_profile_mapping_and_none():
    p = Profile(mtp=MTPConfig(depth=4))
    assert resolve_profile(p) is p
    assert resolve_profile({"mtp": {"depth": 4}}).mtp == MTPConfig(depth=4)
    assert resolve_profile(None).rewrites == []
    with pytest.raises(ConfigError, match="must be a Profile"):
        resolve_profile(3)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="must be a mapping"):
        Profile.from_dict([1])  # type: ignore[arg-type]
