"""The kv_cache pass and the generation runtime: exact against the original, HF semantics, clear errors."""

from __future__ import annotations

import pytest
import torch
from chunked import chunked_logits
from tiny import assert_same_or_near_tie, greedy_by_forward, ids, tiny_llama
from zoo import ZOO, built

import dscompile
from dscompile import ConfigError, MatchError, UnsupportedError
from dscompile.evaluate import logits_of
from dscompile.passes.kv_cache import build_cached_program, layer_windows
from dscompile.runtime import Runtime, choose_next
from dscompile.runtime.generate import attention_bias

HF = [n for n in ZOO if n not in ("nanogpt", "meta_llama", "sdpa_lm", "table_lm")]
HAND_WRITTEN = ["nanogpt", "meta_llama", "sdpa_lm", "table_lm"]


@pytest.fixture(scope="module")
def tiny_opt():
    """One optimized tiny Llama whose runtime is built once for the request-validation tests."""
    opt = dscompile.optimize(tiny_llama(), example_inputs=ids(), lower="eager")
    opt.runtime()
    return opt


@pytest.fixture(scope="module")
def programs():
    cache: dict[str, object] = {}

    def get(name):
        if name not in cache:
            cache[name] = build_cached_program(built(name)[0], logits="all")
        return cache[name]

    return get


@pytest.mark.parametrize("name", list(ZOO))
def test_prefill_then_decode_equals_full_forward(name, programs):
    """Chunks of 5, 1, 1 and 2 tokens through the cache give the logits of one cache-free forward."""
    model, _, expect = built(name)
    program = programs(name)
    x = torch.randint(0, expect.vocab, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        reference = logits_of(model(x))
    torch.testing.assert_close(chunked_logits(program, x), reference, atol=1e-4, rtol=0)
    assert len(program.layers) == expect.layers
    assert [layer.window for layer in program.layers] == list(expect.windows)
    assert program.cache_bytes_per_token() == sum(layer.values_per_token for layer in program.layers) * 4


@pytest.mark.parametrize("name", HF)
def test_greedy_matches_transformers_generate(name, programs):
    model, _, expect = built(name)
    runtime = Runtime(programs(name), lower="eager", eos_token_id=None)
    for batch in (1, 4):
        x = torch.randint(1, expect.vocab, (batch, 7), generator=torch.Generator().manual_seed(batch))
        mask = torch.ones_like(x)
        if batch == 4:
            mask[1, :3] = 0
            mask[2, :1] = 0
            x = x.masked_fill(mask == 0, 0)
        with torch.no_grad():
            expected = model.generate(x, attention_mask=mask, max_new_tokens=64, do_sample=False,
                                      eos_token_id=None, pad_token_id=0)
        got = runtime.generate(x, attention_mask=mask, max_new_tokens=64)
        assert got.shape == expected.shape
        assert_same_or_near_tie(model, got, expected, mask)


@pytest.mark.parametrize("name", HAND_WRITTEN)
def test_greedy_matches_full_recompute_on_hand_written_models(name, programs):
    model, _, expect = built(name)
    runtime = Runtime(programs(name), lower="eager", max_positions=programs(name).max_positions)
    for batch in (1, 4):
        x = torch.randint(0, expect.vocab, (batch, 6), generator=torch.Generator().manual_seed(batch))
        got = runtime.generate(x, max_new_tokens=64)
        assert_same_or_near_tie(model, got, greedy_by_forward(model, x, 64))


def test_inductor_decode_is_exact_and_compiled_once():
    model = tiny_llama()
    opt = dscompile.optimize(model, example_inputs=ids(), lower="eager")
    runtime = Runtime(opt.runtime().program, lower="inductor")
    x = ids(2, 5)
    assert runtime.warm_up(2, 17) > 0 and runtime.capacity_for(17) == 128
    compiled = runtime.decode_step().compiles
    first = runtime.generate(x, max_new_tokens=12)
    assert runtime.decode_step().compiles == compiled == 1  # warm-up compiled this shape
    second = runtime.generate(x, max_new_tokens=12)
    with torch.no_grad():
        expected = model.generate(x, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(first, expected) and torch.equal(second, expected)
    assert runtime.decode_step() is runtime.decode_step()


def test_sampling_is_reproducible_with_a_seed():
    opt = dscompile.optimize(tiny_llama(), example_inputs=ids(), lower="eager")
    kwargs = {"max_new_tokens": 20, "do_sample": True, "temperature": 1.5, "top_k": 50, "top_p": 0.95}
    a = opt.generate(ids(2, 4), generator=torch.Generator().manual_seed(7), **kwargs)
    b = opt.generate(ids(2, 4), generator=torch.Generator().manual_seed(7), **kwargs)
    c = opt.generate(ids(2, 4), generator=torch.Generator().manual_seed(8), **kwargs)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_choose_next_filters():
    logits = torch.tensor([[1.0, 3.0, 2.0, -1.0]])
    assert choose_next(logits).tolist() == [1]
    g = torch.Generator().manual_seed(0)
    assert all(choose_next(logits, do_sample=True, top_k=1, generator=g).item() == 1 for _ in range(20))
    assert all(choose_next(logits, do_sample=True, top_p=0.01, generator=g).item() == 1 for _ in range(20))
    seen = {choose_next(logits, do_sample=True, top_k=2, temperature=5.0, generator=g).item() for _ in range(200)}
    assert seen == {1, 2}


def test_attention_bias_causal_window_and_padding():
    valid = torch.tensor([[False, True, True, True, False]])
    bias = attention_bias(valid, torch.tensor([1, 2, 3]), window=2, dtype=torch.float32)
    allowed = (bias[0, 0] == 0).int().tolist()
    assert allowed == [[0, 1, 0, 0, 0], [0, 1, 1, 0, 0], [0, 0, 1, 1, 0]]
    pad_row = attention_bias(torch.tensor([[False, True]]), torch.tensor([0]), None, torch.float32)
    assert (pad_row[0, 0, 0] == 0).tolist() == [True, False]  # a pad query sees itself, so nothing is NaN


def test_layer_windows_from_config():
    class Cfg:
        sliding_window = 8
        layer_types = ["sliding_attention", "full_attention"]

    assert layer_windows(Cfg(), 2) == [8, None]
    assert layer_windows(Cfg(), 3) == [8, 8, 8]
    assert layer_windows(None, 2) is None


def test_eos_stops_rows_and_pads_like_hf():
    model = tiny_llama()
    x = ids(2, 5)
    with torch.no_grad():
        free = model.generate(x, max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
    eos = int(free[0, 6])  # row 0's second new token
    with torch.no_grad():
        expected = model.generate(x, max_new_tokens=6, do_sample=False, eos_token_id=eos, pad_token_id=3)
    runtime = Runtime(build_cached_program(model), lower="eager", eos_token_id=eos, pad_token_id=3)
    assert torch.equal(runtime.generate(x, max_new_tokens=6), expected)


def test_streaming_and_monitor():
    model = tiny_llama()
    runtime = Runtime(build_cached_program(model), lower="eager")
    seen: list[list[int]] = []

    class Streamer:
        ended = False

        def put(self, tokens):
            seen.append(tokens.tolist())

        def end(self):
            Streamer.ended = True

    out = runtime.generate(ids(2, 5), max_new_tokens=7, streamer=Streamer())
    assert Streamer.ended and len(seen) == 7 and seen[0] == out[:, 5].tolist()
    calls = []
    runtime.generate(ids(1, 3), max_new_tokens=4, streamer=calls.append)
    assert len(calls) == 4
    stats = runtime.monitor.last
    assert stats.batch == 1 and stats.new_tokens == 4 and stats.prompt_tokens == 3
    # 2 layers x (K + V) x 1 row x 2 KV heads x 128 slots x 16 dims x 4 bytes
    assert stats.cache_bytes == 2 * 2 * 2 * 128 * 16 * 4
    assert stats.peak_memory_bytes > 0 and stats.decode_tokens_per_s > 0
    assert "tok/s" in str(stats) and stats.to_dict()["decode_tokens_per_s"] > 0


@pytest.mark.parametrize("kwargs, message", [
    ({"input_ids": torch.zeros(1, 0, dtype=torch.long), "max_new_tokens": 2}, "prompt is empty"),
    ({"input_ids": torch.zeros(2, dtype=torch.float32), "max_new_tokens": 2}, "LongTensor"),
    ({"input_ids": ids(1, 4)}, "max_new_tokens"),
    ({"input_ids": ids(1, 4), "max_new_tokens": 0}, "at least 1"),
    ({"input_ids": ids(1, 4), "max_length": 3}, "leaves no room"),
    ({"input_ids": ids(1, 100), "max_new_tokens": 40}, "beyond the model's 128 positions"),
    ({"input_ids": ids(1, 4), "max_new_tokens": 2, "do_sample": True, "temperature": 0.0}, "temperature"),
    ({"input_ids": ids(1, 4), "max_new_tokens": 2, "do_sample": True, "top_k": 0}, "top_k"),
    ({"input_ids": ids(1, 4), "max_new_tokens": 2, "do_sample": True, "top_p": 1.5}, "top_p"),
    ({"input_ids": ids(2, 4), "attention_mask": torch.ones(2, 3), "max_new_tokens": 2}, "differs from input_ids"),
    ({"input_ids": ids(1, 3), "attention_mask": torch.tensor([[1, 1, 0]]), "max_new_tokens": 2}, "on the left"),
])
def test_bad_requests_fail_before_work(kwargs, message, tiny_opt):
    opt = tiny_opt
    calls = len(opt.monitor.history)
    with pytest.raises(ConfigError, match=message):
        opt.generate(**kwargs)
    assert len(opt.monitor.history) == calls  # refused before any work was recorded


def test_max_length_counts_the_prompt(tiny_opt):
    opt = tiny_opt
    assert opt.generate(ids(1, 4), max_length=10).shape == (1, 10)
    with pytest.raises(ConfigError, match="valid: inductor, eager"):
        Runtime(opt.runtime().program, lower="tvm")


def test_models_the_runtime_cannot_cache():
    with pytest.raises(MatchError, match="no attention"):
        build_cached_program(torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10)))


@pytest.mark.slow
def test_smollm2_greedy_matches_transformers_with_compiled_decode(smollm2):
    model, tokenizer = smollm2
    opt = dscompile.optimize(model, example_inputs=torch.tensor([[1, 2, 3]]), lower="eager")
    runtime = Runtime(opt.runtime().program, lower="inductor", eos_token_id=2, pad_token_id=2,
                      max_positions=opt.runtime().max_positions)
    prompts = ["def fibonacci(n):", "The capital of France is", "Once upon a time, in a land far away,",
               "import numpy as np\n"]
    enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    x, mask = enc["input_ids"], enc["attention_mask"]  # batch 4 with left padding (batch 1: the tiny models)
    with torch.no_grad():
        expected = model.generate(x, attention_mask=mask, max_new_tokens=64, do_sample=False)
    got = runtime.generate(x, attention_mask=mask, max_new_tokens=64)
    assert_same_or_near_tie(model, got, expected, mask)
    assert runtime.monitor.last.cache_bytes == 30 * 2 * 4 * 3 * 128 * 64 * 4  # capacity 128 slots


def test_unsupported_attention_is_refused_clearly(monkeypatch):
    from dscompile.passes import kv_cache

    monkeypatch.setattr(kv_cache, "eager_anchor", lambda cg, node: "softmax is not fed by one Q @ K^T matmul")
    with pytest.raises(UnsupportedError, match="not fed by one"):
        build_cached_program(built("nanogpt")[0])


def test_last_position_logits_only_by_default():
    model, x = tiny_llama(), ids(2, 6)
    program = build_cached_program(model)
    valid = torch.ones(2, 8, dtype=torch.bool)
    slots = torch.arange(6)
    caches = program.new_caches(2, 8)
    with torch.no_grad():
        out = program.gm(x, slots.expand(2, -1), slots, attention_bias(valid, slots, None, program.dtype), *caches)[0]
        torch.testing.assert_close(out, model(x).logits[:, -1:], atol=1e-5, rtol=0)
    with pytest.raises(ConfigError, match="'last' or 'all'"):
        build_cached_program(model, logits="some")


@pytest.mark.parametrize("path", ["export", "dynamo"])
def test_value_heads_wider_than_query_heads_match(path):
    from wide_values import HEADS, QK_DIM, V_DIM, wide_value_lm

    matches = dscompile.inspect(wide_value_lm(), torch.randint(0, 72, (2, 6)), path=path)
    (attn,) = matches.attention
    assert (attn.head_dim, attn.v_head_dim, attn.n_heads) == (QK_DIM, V_DIM, HEADS)
    assert attn.kv_width == HEADS * (QK_DIM + V_DIM) and attn.causal is True


def test_value_heads_wider_than_query_heads_generate_exactly():
    from wide_values import V_DIM, wide_value_lm

    model = wide_value_lm()
    program = build_cached_program(model)
    assert [(layer.head_dim, layer.v_head_dim) for layer in program.layers] == [(16, V_DIM)]
    runtime = Runtime(program, lower="eager")
    x = torch.randint(0, 72, (2, 5), generator=torch.Generator().manual_seed(0))
    assert_same_or_near_tie(model, runtime.generate(x, max_new_tokens=20), greedy_by_forward(model, x, 20))


@pytest.mark.parametrize("name", ["mistral", "table_lm", "gemma2"])
def test_chunked_prefill_equals_one_prefill(name, programs):
    """Long prompts are prefilled in chunks; causal masking makes that exact, windows and padding included."""
    model, _, expect = built(name)
    x = torch.randint(1, expect.vocab, (2, 11), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(x)
    mask[1, :4] = 0
    one = Runtime(programs(name), lower="eager")
    chunked = Runtime(programs(name), lower="eager", prefill_tokens=6)  # 3 tokens per row: 4 chunks
    whole = one.generate(x, attention_mask=mask, max_new_tokens=8, eos_token_id=[])
    assert torch.equal(chunked.generate(x, attention_mask=mask, max_new_tokens=8, eos_token_id=[]), whole)
