"""MoE experts offloaded to files: the store's reads and evictions, exact outputs through its slots (decode and
streamed prefill), ``offload_experts`` end to end (forward, generation, report, the dense weights paged out) and
what it refuses."""

from __future__ import annotations

import logging
import os

import pytest
import torch
from tiny import ids, tiny_llama

import dscompile
from dscompile import ConfigError
from dscompile.evaluate import logits_of
from dscompile.passes.moe_offload import ExpertStore
from dscompile.passes.moe_ops import moe_ffn

HALF = {"moe": {"n_experts": 16, "n_shared": 2, "top_k": 6}}  # 14 routed experts of 8 neurons per FFN


def _experts(routed=6, width=4, hidden=12, gated=True, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    experts = (r(routed, width, hidden) if gated else None, r(routed, width, hidden), r(routed, width, hidden),
               r(routed, width) if gated and bias else None, r(routed, width) if bias else None)
    down_t = experts[2].reshape(-1, hidden).T.contiguous()
    return experts, down_t, r(routed, hidden), r(routed), r(2, 5, hidden)


def test_the_store_reads_experts_back_exactly_and_evicts_the_least_recently_used(tmp_path):
    experts, *_ = _experts()
    store = ExpertStore.write(tmp_path / "e", experts, capacity=3, activation="silu")
    assert os.path.getsize(tmp_path / "e") == 6 * store.expert_bytes == 6 * 3 * 4 * 12 * 4

    def holds(expert, slot):
        return all(torch.equal(store.slots[p, slot], experts[p][expert]) for p in range(3)) and \
            torch.equal(store.slot_up_bias[slot], experts[4][expert])

    slots = store.fetch([0, 1, 2])
    assert all(holds(e, s) for e, s in zip([0, 1, 2], slots)) and (store.hits, store.misses) == (0, 3)
    store.fetch([1, 0])  # 2 is now the least recently used
    slot = store.fetch([4])[0]
    assert slot == slots[2] and holds(4, slot) and list(store.resident) == [1, 0, 4]
    assert store.stats() == {"capacity": 3, "experts": 6, "hits": 2, "misses": 4, "hit_rate": 0.3333,
                             "bytes_read": 4 * store.expert_bytes}
    with pytest.raises(ConfigError, match="1 to 6 experts"):
        ExpertStore.write(tmp_path / "f", experts, capacity=7, activation="silu")
    with pytest.raises(ConfigError, match="a folder of its own"):  # never rewrites a store's file
        ExpertStore.write(tmp_path / "e", experts, capacity=3, activation="silu")
    store.close()
    with pytest.raises(RuntimeError, match="closed"):
        torch.ops.dscompile.moe_offloaded(torch.zeros(1, 12), torch.zeros(1, 1, dtype=torch.long), store.id)


@pytest.mark.parametrize("native_kernel", [True, False])
@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("capacity", [2, 6])
def test_offloaded_experts_compute_what_the_experts_in_memory_do(tmp_path, monkeypatch, native_kernel, gated,
                                                                 capacity):
    experts, down_t, router, bias, x = _experts(gated=gated)
    store = ExpertStore.write(tmp_path / "e", experts, capacity=capacity, activation="gelu_tanh")
    if not native_kernel:
        monkeypatch.setattr(ExpertStore, "_native", lambda self, rows: False)
    for rows in (x[:1, :1], x[:, :1], x):  # 1, 2 and 10 tokens: slots at once, or streamed a slot-full at a time
        for top_k in (1, 3, 6):
            expect = moe_ffn(rows, None, experts, down_t, router, bias, None, top_k, "gelu_tanh", False)
            with torch.no_grad():
                got = moe_ffn(rows, None, (None,) * 5, None, router, bias, None, top_k, "gelu_tanh", True,
                              offload=store.id)
            torch.testing.assert_close(got, expect, atol=1e-4, rtol=1e-5)
    assert store.misses > 0 and (store.hits > 0 if capacity == 6 else True)
    store.close()


def test_offload_experts_keeps_the_model_exact_and_pages_the_dense_weights_out(tmp_path, caplog):
    model = tiny_llama()
    calibration = torch.randint(0, 128, (4, 300), generator=torch.Generator().manual_seed(0))
    optimized = dscompile.optimize(model, HALF, calibration=calibration, lower="inductor")
    x = ids(2, 12)
    with torch.no_grad():
        forward, original = logits_of(optimized(x)), logits_of(model(x))
    generated = optimized.generate(x, max_new_tokens=6, eos_token_id=[])
    report = optimized.report().to_dict()
    with caplog.at_level(logging.WARNING, logger="dscompile"):
        stores = optimized.offload_experts(4, tmp_path)
    assert "smaller than top_k" in caplog.text  # 4 slots for 6 experts a token: reads at every step
    assert len(stores) == 2 and all(os.path.getsize(s.path) == 14 * 3 * 8 * 64 * 4 for s in stores)
    with torch.no_grad():
        torch.testing.assert_close(logits_of(optimized(x)), forward, atol=1e-5, rtol=0)
        torch.testing.assert_close(logits_of(model(x)), original, atol=0, rtol=0)  # the source model still runs
    assert torch.equal(optimized.generate(x, max_new_tokens=6, eos_token_id=[]), generated)
    after = optimized.report().to_dict()
    assert (after["params_after"], after["active_params_per_token"]) == \
        (report["params_after"], report["active_params_per_token"])
    assert sorted(after["moe_expert_cache"]) == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert all(c["capacity"] == 4 and c["misses"] > 0 for c in after["moe_expert_cache"].values())
    # the carved programs hold no routed experts; the dense FFN weights are a file's pages now
    program = optimized.runtime().program
    assert not [n for n, _ in program.decode_gm.named_parameters() if "experts_" in n or "down_t" in n]
    mapped = os.path.getsize(tmp_path / "dense_ffn.weights")
    for name, p in model.named_parameters():
        assert (p.untyped_storage().nbytes() == mapped) == (".mlp." in name), name


def test_offloaded_experts_refuse_healing_and_saving_and_bad_requests(tmp_path):
    model = tiny_llama()
    with pytest.raises(ConfigError, match="nothing to offload"):
        dscompile.optimize(model, "none", example_inputs=ids(1, 8), lower="eager").offload_experts(4)
    calibration = torch.randint(0, 128, (4, 300), generator=torch.Generator().manual_seed(0))
    optimized = dscompile.optimize(model, HALF, calibration=calibration, lower="eager")
    with pytest.raises(ConfigError, match="1 to 14 experts"):
        optimized.offload_experts(15)
    optimized.offload_experts(14, page_out_dense=False)
    assert all(p.untyped_storage().nbytes() == p.numel() * 4 for p in model.parameters())
    with pytest.raises(ConfigError, match="cannot heal: the routed experts are offloaded"):
        dscompile.heal(optimized, calibration, max_steps=1, progress=False)
    with pytest.raises(ConfigError, match="cannot save"):
        optimized.save(str(tmp_path / "saved"))


def test_a_saved_model_loads_with_its_experts_offloaded(tmp_path):
    model = tiny_llama()
    calibration = torch.randint(0, 128, (4, 300), generator=torch.Generator().manual_seed(0))
    optimized = dscompile.optimize(model, HALF, calibration=calibration, lower="eager")
    x = ids(1, 10)
    expect = optimized.generate(x, max_new_tokens=5, eos_token_id=[])
    optimized.save(str(tmp_path / "saved"))
    loaded = dscompile.load_optimized(tmp_path / "saved", tiny_llama(), offload_experts=14,
                                      expert_folder=tmp_path / "experts")
    assert torch.equal(loaded.generate(x, max_new_tokens=5, eos_token_id=[]), expect)
    assert len(list((tmp_path / "experts").glob("*.experts"))) == 2
    stores = loaded.offload_experts(14, tmp_path / "experts")  # again: nothing more to move, nothing rewritten
    assert len(stores) == 2 and torch.equal(loaded.generate(x, max_new_tokens=5, eos_token_id=[]), expect)
    stats = loaded.report().to_dict()["moe_expert_cache"]["model.layers.0.mlp"]
    assert stats["hits"] > 0 and stats["capacity"] == 14


def test_only_file_pages_that_still_hold_the_files_bytes_are_dropped(tmp_path):
    from dscompile.passes.moe_offload import drop_file_pages

    path = tmp_path / "w"
    values = torch.arange(1 << 20, dtype=torch.float32)  # 4 MiB
    path.write_bytes(values.numpy().tobytes())
    mapped = torch.from_file(str(path), shared=False, size=1 << 20, dtype=torch.float32)
    assert torch.equal(mapped, values)  # every page read in
    whole = (mapped.data_ptr(), 4 << 20)
    assert drop_file_pages([whole]) == 4 << 20 and torch.equal(mapped, values)  # read back from the file
    mapped[5] = -1.0  # a page changed in memory is not the file's any more: kept
    assert drop_file_pages([whole]) == 0 and mapped[5] == -1.0
    anonymous = values.clone()
    assert drop_file_pages([(anonymous.data_ptr(), 4 << 20)]) == 0 and torch.equal(anonymous, values)
