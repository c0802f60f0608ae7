"""MTP: heads built from the model, speculative decoding exact against plain greedy decoding, speculative
sampling keeping the model's distribution, training by self-distillation, save/load, report, and clear errors."""

from __future__ import annotations

import pytest
import torch
from tiny import assert_same_or_near_tie, greedy_by_forward, ids, tiny_llama
from transformers import LlamaConfig, LlamaForCausalLM
from zoo import ZOO, built

import dscompile
from dscompile import ConfigError, MatchError, MTPConfig
from dscompile.passes.mtp_heads import MTPHeads
from dscompile.runtime.speculative import accept_greedy, accept_sampled, compact

HAND_WRITTEN = ("nanogpt", "meta_llama", "sdpa_lm", "table_lm")


def varied_llama(seed: int = 0) -> LlamaForCausalLM:
    """A tiny Llama whose greedy continuations do not collapse into one repeated token (wide random weights)."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=False, initializer_range=0.2, attn_implementation="sdpa")
    return LlamaForCausalLM(cfg).eval()


def noisy(heads: MTPHeads, rate: float = 0.35, seed: int = 0) -> None:
    """Replace a share of the heads' drafts by random tokens, so every step sees a mix of kept and rejected drafts
    (tiny random models are otherwise too easy to predict)."""
    real = heads.draft
    gen = torch.Generator().manual_seed(seed)

    def draft(h, token, pick=None):
        tokens, logits = real(h, token, pick)
        flip = torch.rand(tokens.shape, generator=gen) < rate
        return torch.where(flip, torch.randint(0, heads.vocab, tokens.shape, generator=gen), tokens), logits

    heads.draft = draft  # type: ignore[method-assign]


def mtp_model(model: torch.nn.Module, x: torch.Tensor, depth: int = 3, **mtp: object) -> dscompile.OptimizedModel:
    """MTP that drafts at every step unless ``speculation`` says otherwise (the acceptance figures stay exact)."""
    mtp = {"speculation": "always", **mtp}
    return dscompile.optimize(model, {"mtp": {"depth": depth, **mtp}}, example_inputs=x, lower="eager")


@pytest.mark.parametrize("name", list(ZOO))
def test_speculative_greedy_equals_plain_greedy_on_the_zoo(name):
    """Batch 1 and 4 (left padding on HF models): the output is the model's greedy output, drafts kept or not."""
    model, example, expect = built(name)
    opt = mtp_model(model, example[:1])
    noisy(opt.mtp_heads())
    hand_written = name in HAND_WRITTEN
    for batch in (1, 4):
        x = torch.randint(1, expect.vocab, (batch, 6), generator=torch.Generator().manual_seed(batch))
        mask = torch.ones_like(x)
        if batch == 4 and not hand_written:
            mask[1, :3] = 0
            mask[2, :1] = 0
            x = x.masked_fill(mask == 0, 0)
        got = opt.generate(x, attention_mask=mask, max_new_tokens=64, eos_token_id=[])
        if hand_written:
            assert_same_or_near_tie(model, got, greedy_by_forward(model, x, 64))
        else:
            with torch.no_grad():
                expected = model.generate(x, attention_mask=mask, max_new_tokens=64, do_sample=False,
                                          eos_token_id=None, pad_token_id=0)
            assert_same_or_near_tie(model, got, expected, mask)
        stats = opt.monitor.last.extra
        assert len(stats["mtp_acceptance"]) == 3
        assert 1.0 <= stats["mtp_tokens_per_step"] <= 4.0
        assert stats["mtp_acceptance"][0] >= stats["mtp_acceptance"][2]  # a later draft is kept only after earlier


def test_varied_model_batch_eight_with_holes_and_compaction(monkeypatch):
    """Rows accept different lengths; with few spare slots the cache is packed mid-generation, still exact."""
    import dscompile.runtime.generate as generate
    import dscompile.runtime.speculative as speculative

    monkeypatch.setattr(speculative, "HOLE_SLOTS", 4)
    monkeypatch.setattr(generate, "BUCKET", 8)  # no spare slots from rounding the capacity up
    packs = []
    real_compact = speculative.compact
    monkeypatch.setattr(speculative, "compact", lambda *a: packs.append(1) or real_compact(*a))
    model = varied_llama()
    x = ids(8, 8, seed=3)
    opt = mtp_model(model, x[:1], depth=4)
    noisy(opt.mtp_heads(), rate=0.5)
    opt.runtime().max_verify_rows = None  # speculate even where a CPU verification is compute-bound
    got = opt.generate(x, max_new_tokens=100, eos_token_id=[])
    assert_same_or_near_tie(model, got, greedy_by_forward(model, x, 100))
    assert packs, "the cache was never packed: the test did not exercise compaction"
    assert 1.0 < opt.monitor.last.extra["mtp_tokens_per_step"] < 5.0


@pytest.mark.parametrize("draft_nodes", [2, None])  # the chain, and the default tree (4 nodes)
def test_compiled_verify_and_draft_steps_are_exact(monkeypatch, draft_nodes):
    """Inductor compiles the verification step and the drafting (thin products as native kernels); warm_up
    compiles the shapes generate uses (the adaptive gate's plain steps too), so generate compiles nothing more.
    Batch 1: there a row picked from a wider tensor has strides a fresh one lacks, and compiled steps key on them."""
    from dscompile.runtime.gate import SpeculationGate

    turns = iter([True, True, False] * 40)
    monkeypatch.setattr(SpeculationGate, "speculate", lambda self: next(turns))
    model = varied_llama()
    x = ids(1, 8, seed=16)
    opt = dscompile.optimize(model, {"mtp": {"depth": 2, "draft_nodes": draft_nodes}}, example_inputs=x)
    runtime = opt.runtime()
    assert runtime.draft_tree(1).size == (draft_nodes or 4)
    runtime.warm_up(1, 8 + 24)
    counters = torch._dynamo.utils.counters
    frames, steps = counters["stats"]["unique_graphs"], runtime.decode_step().compiles
    got = opt.generate(x, max_new_tokens=24)
    # Nothing recompiled: neither the draft step (Dynamo) nor the verify and plain decode steps (two signatures).
    assert counters["stats"]["unique_graphs"] == frames and runtime.decode_step().compiles == steps == 2
    assert_same_or_near_tie(model, got, greedy_by_forward(model, x, 24))
    assert opt.monitor.last.extra["mtp_plain_steps"] > 0


def test_cpu_batches_whose_verification_is_compute_bound_decode_plainly():
    from dscompile.lower.thin_matmul import THIN_ROWS
    from dscompile.runtime.generate import VERIFY_ROWS

    assert VERIFY_ROWS == THIN_ROWS
    model = varied_llama()
    x = ids(5, 8, seed=17)
    opt = mtp_model(model, x[:1], depth=3)  # 5 rows x 4 tokens = 20 verified rows > 16
    assert opt.runtime().speculates(4) and not opt.runtime().speculates(5)
    got = opt.generate(x, max_new_tokens=20)
    assert opt.monitor.last.extra["mtp"].startswith("off: batch 5 x 4 verified tokens")
    assert "mtp_tokens_per_step" not in opt.monitor.last.extra
    assert_same_or_near_tie(model, got, greedy_by_forward(model, x, 20))


def test_eos_inside_an_accepted_chain_ends_the_row():
    model = varied_llama()
    x = ids(2, 8, seed=4)
    plain = greedy_by_forward(model, x, 30)
    eos = int(plain[0, 8 + 10])  # the 11th new token of row 0 becomes the end token
    opt = mtp_model(model, x[:1])
    got = opt.generate(x, max_new_tokens=30, eos_token_id=eos)
    reference = dscompile.optimize(model, "none", example_inputs=x[:1], lower="eager")
    expected = reference.generate(x, max_new_tokens=30, eos_token_id=eos)
    assert torch.equal(got, expected)
    first = int((got[0, 8:] == eos).nonzero()[0])
    assert (got[0, 8 + first + 1:] == eos).all()  # padded with the end token, as HF pads


def test_streamer_receives_every_token_in_order():
    model = varied_llama()
    x = ids(1, 8, seed=5)
    opt = mtp_model(model, x)
    seen: list[int] = []
    got = opt.generate(x, max_new_tokens=25, streamer=lambda t: seen.extend(t.tolist()))
    assert seen == got[0, 8:].tolist()


def test_accept_greedy_keeps_the_agreed_prefix_and_the_models_next_token():
    logits = torch.full((2, 4, 10), -1.0)
    for row, chosen in enumerate(([3, 5, 7, 9], [1, 2, 3, 4])):
        for pos, tok in enumerate(chosen):
            logits[row, pos, tok] = 1.0
    drafts = torch.tensor([[3, 5, 0], [0, 2, 3]])
    accepted, token = accept_greedy(drafts, logits)
    assert accepted.tolist() == [2, 0]
    assert token.tolist() == [7, 1]


def test_speculative_sampling_keeps_the_models_distribution():
    """Whatever the draft distribution q, the first token kept is distributed as the model's p."""
    n, vocab = 40_000, 6
    gen = torch.Generator().manual_seed(0)
    p_logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, 0.3])
    q = torch.tensor([0.05, 0.5, 0.1, 0.2, 0.1, 0.05])
    drafts = torch.multinomial(q, n, replacement=True, generator=gen)[:, None]
    logits = p_logits.expand(n, 2, vocab)
    sample = {"temperature": 1.0, "top_k": None, "top_p": None, "generator": gen}
    accepted, token = accept_sampled(drafts, q.expand(n, 1, vocab), logits, sample)
    first = torch.where(accepted > 0, drafts[:, 0], token)
    freq = torch.bincount(first, minlength=vocab).float() / n
    torch.testing.assert_close(freq, p_logits.softmax(-1), atol=0.01, rtol=0)
    assert 0.2 < accepted.float().mean() < 0.9  # drafts were both kept and resampled


def test_sampling_with_a_seed_is_reproducible():
    model = varied_llama()
    x = ids(3, 8, seed=6)
    opt = mtp_model(model, x[:1])
    runs = [opt.generate(x, max_new_tokens=30, do_sample=True, temperature=0.8, top_k=20,
                         generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    other = opt.generate(x, max_new_tokens=30, do_sample=True, temperature=0.8, top_k=20,
                         generator=torch.Generator().manual_seed(8))
    assert not torch.equal(runs[0], other)


def test_compact_packs_valid_slots_in_order():
    valid = torch.tensor([[1, 0, 1, 1, 0, 0], [1, 1, 0, 0, 1, 0]], dtype=torch.bool)
    k = torch.arange(2 * 2 * 6 * 3, dtype=torch.float).reshape(2, 2, 6, 3)
    latent = torch.arange(2 * 6 * 4, dtype=torch.float).reshape(2, 6, 4)
    slots = torch.arange(12).reshape(2, 6)
    before = (k.clone(), latent.clone(), slots.clone())
    free = compact(valid, [k, latent, slots])
    assert free == 3
    assert valid.tolist() == [[True] * 3 + [False] * 3] * 2
    assert torch.equal(k[0, :, :3], before[0][0, :, [0, 2, 3]])
    assert torch.equal(latent[1, :3], before[1][1, [0, 1, 4]])
    assert slots[1, :3].tolist() == [6, 7, 10]


def test_training_teaches_the_heads_the_models_next_tokens(tmp_path):
    """Four prompts, each repeated: the held-out continuations are ones training saw, so the heads must learn them."""
    model = varied_llama()
    data = torch.randint(0, 128, (4, 8), generator=torch.Generator().manual_seed(9)).repeat(1, 16)
    opt = mtp_model(model, data[:1, :8], depth=2)
    report = dscompile.train_mtp(opt, data, steps=150, prompts=64, prompt_tokens=8, new_tokens=40, lr=3e-3,
                                 progress=False)
    assert report.steps == 150 and report.tokens == 64 * 48
    assert report.losses[-1] < 0.5 * report.losses[0]
    assert report.draft_coverage == 1.0  # 128 tokens fit the default draft vocabulary
    assert report.acceptance[0] > 0.6 and report.acceptance[1] <= report.acceptance[0]
    assert report.tokens_per_step == pytest.approx(1 + sum(report.acceptance))
    x = data[1:2, :8]
    got = opt.generate(x, max_new_tokens=40)
    assert_same_or_near_tie(model, got, greedy_by_forward(model, x, 40))
    assert opt.monitor.last.extra["mtp_tokens_per_step"] > 1.5
    path = tmp_path / "heads.safetensors"
    opt.save_mtp(str(path))

    loaded = mtp_model(model, x, depth=1, heads=str(path))  # a deeper file serves a shallower profile
    h = torch.randn(3, 64)
    token = torch.tensor([1, 2, 3])
    torch.testing.assert_close(loaded.mtp_heads().draft(h, token)[1], opt.mtp_heads().draft(h, token)[1][:, :1])
    assert loaded.mtp_heads().trained

    with pytest.raises(ConfigError, match="another model"):
        mtp_model(varied_llama(seed=1), x, depth=2, heads=str(path)).mtp_heads()
    with pytest.raises(ConfigError, match="asks for 3"):
        mtp_model(model, x, depth=3, heads=str(path)).mtp_heads()
    with pytest.raises(ConfigError, match="does not exist"):
        mtp_model(model, x, heads=str(tmp_path / "missing.safetensors")).mtp_heads()


def test_medusa_heads_and_a_small_draft_vocabulary():
    model = varied_llama()
    x = ids(2, 8, seed=12)
    opt = mtp_model(model, x[:1], depth=2, head="medusa", draft_vocab=32)
    heads = opt.mtp_heads()
    assert heads.draft_ids.numel() == 32 and heads.draft_weight.shape == (32, 64)
    drafts, logits = heads.draft(torch.randn(2, 64), torch.tensor([5, 6]))
    assert drafts.shape == (2, 2) and logits.shape == (2, 2, 32)
    assert set(drafts.reshape(-1).tolist()) <= set(heads.draft_ids.tolist())
    got = opt.generate(x, max_new_tokens=30)
    assert_same_or_near_tie(model, got, greedy_by_forward(model, x, 30))


def test_report_and_monitor_show_acceptance():
    model = varied_llama()
    x = ids(1, 8, seed=13)
    opt = mtp_model(model, x)
    with pytest.raises(KeyError):
        opt.report().to_dict()["mtp_tokens_per_step"]
    opt.generate(x, max_new_tokens=20)
    report = opt.report().to_dict()
    assert report["mtp_acceptance"] == opt.monitor.last.extra["mtp_acceptance"]
    assert report["mtp_tokens_per_step"] == opt.monitor.last.extra["mtp_tokens_per_step"]
    assert "tokens/step (drafts of a 6-node draft tree kept by depth: " in str(opt.monitor.last)
    notes = [n for p in report["passes"] if p["name"] == "mtp" for n in p["notes"]]
    assert notes and "3 deepseek MTP head(s)" in notes[0]


def test_backend_forward_is_unchanged_with_mtp():
    model = tiny_llama()
    x = ids(2, 8)
    compiled = torch.compile(model, backend="deepseek_opt", options={"profile": {"mtp": {"depth": 2}}})
    with torch.no_grad():
        torch.testing.assert_close(compiled(x).logits, model(x).logits, atol=1e-5, rtol=0)


def test_mtp_composes_with_mla():
    model = varied_llama()
    calibration = torch.randint(0, 128, (4, 128), generator=torch.Generator().manual_seed(14))
    x = ids(2, 8, seed=15)
    mla = {"mla": {"kv_ratio": 0.5}}
    plain = dscompile.optimize(model, mla, calibration, example_inputs=x[:1], lower="eager")
    both = dscompile.optimize(model, {**mla, "mtp": {"depth": 2}}, calibration, example_inputs=x[:1], lower="eager")
    noisy(both.mtp_heads())
    expected = plain.generate(x, max_new_tokens=30)
    got = both.generate(x, max_new_tokens=30)
    assert torch.equal(got, expected)
    assert both.runtime().program.cache_bytes_per_token() == plain.runtime().program.cache_bytes_per_token()


@pytest.mark.parametrize("mtp, message", [
    ({"depth": 0}, "depth must be an integer of at least 1"),
    ({"head": "eagle"}, "mtp.head must be"),
    ({"draft_vocab": 4}, "draft_vocab must be"),
    ({"depth": 2, "extra": 1}, "unknown field"),
])
def test_bad_mtp_profiles_are_refused(mtp, message):
    with pytest.raises(ConfigError, match=message):
        dscompile.Profile.from_dict({"mtp": mtp})


def test_bad_training_requests_are_refused():
    model = varied_llama()
    x = ids(1, 8)
    opt = mtp_model(model, x, depth=2)
    with pytest.raises(ConfigError, match="no token data"):
        dscompile.train_mtp(opt, None)
    with pytest.raises(ConfigError, match="loss_weights needs 2"):
        dscompile.train_mtp(opt, x, loss_weights=[1.0])
    with pytest.raises(ConfigError, match="at least 2 prompts"):
        dscompile.train_mtp(opt, torch.arange(40), prompt_tokens=32, progress=False)
    plain = dscompile.optimize(model, "none", example_inputs=x, lower="eager")
    with pytest.raises(ConfigError, match="has no MTP"):
        dscompile.train_mtp(plain, x)
    assert MTPConfig().depth == 3


def test_models_without_an_lm_head_cannot_draft(monkeypatch):
    from dscompile.passes import mtp_program
    from dscompile.passes.kv_cache import build_cached_program

    program = build_cached_program(tiny_llama())
    program.hidden = None
    with pytest.raises(MatchError, match="LM head"):
        mtp_program.expose_hidden(program)


@pytest.mark.slow
@pytest.mark.parametrize("draft_nodes", [4, None])  # the chain, and the default tree (7 nodes)
def test_smollm2_speculative_greedy_equals_plain_greedy(smollm2, monkeypatch, draft_nodes):
    """128 new tokens at batch 1 and 8 (left-padded prompts of different lengths) on the real model. The drafts come
    from the plain runtime's own output with a third corrupted, so long chains are kept, some cut short, and rows
    keep different lengths (holes in the cache). In a tree every node drafts the true token of its depth, so
    siblings coincide too."""
    from dscompile.runtime import speculative

    model, tokenizer = smollm2
    prompts = ["def fibonacci(n):", "The capital of France is", "Once upon a time, in a land far away,",
               "import numpy as np\n", "SELECT name FROM users WHERE", "The theory of relativity",
               "Dear hiring manager,", "for i in range(10):"]
    enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    plain = dscompile.optimize(model, "none", example_inputs=torch.tensor([[1, 2, 3]]), lower="eager")
    mtp = dscompile.optimize(model, {"mtp": {"depth": 4, "speculation": "always", "draft_nodes": draft_nodes}},
                             example_inputs=torch.tensor([[1, 2, 3]]), lower="eager")
    mtp.runtime().max_verify_rows = None
    gen = torch.Generator().manual_seed(0)
    for batch in (1, 8):
        x, mask = enc["input_ids"][:batch], enc["attention_mask"][:batch]
        if batch == 1:
            x, mask = x[:, mask[0].bool()], mask[:, mask[0].bool()]
        expected = plain.generate(x, attention_mask=mask, max_new_tokens=128, eos_token_id=[])
        reference = torch.cat([expected, torch.zeros(batch, 8, dtype=torch.long)], 1)

        def oracle(self, hidden, token, sampling, reference=reference, prompt=x.shape[1]):
            depths = torch.tensor(self.tree.depths[1:]) - 1  # each node's true token is the one at its depth
            rows = []
            for row, count in enumerate(self.count):
                rows.append(reference[row, prompt + count:prompt + count + self.heads.depth][depths])
            drafts = torch.stack(rows)
            flip = torch.rand(drafts.shape, generator=gen) < 0.3
            return torch.where(flip, torch.randint(0, 49152, drafts.shape, generator=gen), drafts), None

        monkeypatch.setattr(speculative.Speculation, "_draft", oracle)
        got = mtp.generate(x, attention_mask=mask, max_new_tokens=128, eos_token_id=[])
        assert_same_or_near_tie(model, got, expected, mask)
        assert mtp.monitor.last.extra["mtp_tokens_per_step"] > 1.5
        assert mtp.monitor.last.extra["mtp_draft_nodes"] == (draft_nodes or 7)
