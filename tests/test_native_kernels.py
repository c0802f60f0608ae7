"""The native CPU kernels (``dscompile/ops``): built on first use, equal to PyTorch's products and attention, in
both vector widths; a missing compiler or a failed build falls back with a warning."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dscompile.ops import native

pytestmark = pytest.mark.skipif(not native.load(), reason="native kernels need a C++ compiler")
MIN = torch.finfo(torch.float32).min


def _products(seed: int = 0):
    """(x, w, b) cases: 1-16 rows (every count below 8 is its own block), widths with and without a vector tail, row
    counts that leave rows over, a weight whose rows are strided (a column slice), an activation that is not
    contiguous."""
    g = torch.Generator().manual_seed(seed)
    cases = []
    for rows in (1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 15, 16):  # every remainder block after eight rows
        for k, n in ((576, 193), (37, 11), (1536, 64)):
            x, w, b = torch.randn(rows, k, generator=g), torch.randn(n, k, generator=g), torch.randn(n, generator=g)
            cases.append((x, w, b))
    wide = torch.randn(40, 100, generator=g)
    cases.append((torch.randn(4, 60, generator=g), wide[:, 20:80], None))
    cases.append((torch.randn(60, 4, generator=g).t(), torch.randn(7, 60, generator=g), None))
    return cases


@pytest.mark.parametrize("case", range(len(_products())))
def test_thin_linear_equals_the_product(case):
    x, w, b = _products()[case]
    expected = x @ w.t() + (b if b is not None else 0)
    torch.testing.assert_close(torch.ops.dscompile.thin_linear(x, w, b), expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("rows", [2, 5, 8, 9, 12, 16, 20])
def test_a_thin_linear_row_does_not_depend_on_the_other_rows(rows):
    """Each output row is summed in the same order whatever the number of rows (blocks of eight, then one of the
    rest): a verified token computes bitwise what a plain decode step computes for it."""
    g = torch.Generator().manual_seed(rows)
    x, w = torch.randn(rows, 576, generator=g), torch.randn(1536 + 5, 576, generator=g)
    together = torch.ops.dscompile.thin_linear(x, w, None)
    for r in range(rows):
        assert torch.equal(torch.ops.dscompile.thin_linear(x[r:r + 1], w, None), together[r:r + 1])


@pytest.mark.parametrize("case", range(0, len(_products()), 3))
def test_thin_linear_reads_bfloat16_weights_exactly(case):
    """A bfloat16 weight is widened as it is loaded: the product is the float32 product of the widened weight (to
    the rounding of a different tail loop), alone or among float32 weights in one call."""
    x, w, b = _products()[case]
    half = w.bfloat16()
    got = torch.ops.dscompile.thin_linear(x, half, b)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, x @ half.float().t() + (b if b is not None else 0), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(got, torch.ops.dscompile.thin_linear(x, half.float(), b), rtol=1e-6, atol=1e-5)
    mixed = torch.ops.dscompile.thin_linear_many(x, [w, half], [b, b])
    assert torch.equal(mixed[1], got) and torch.equal(mixed[0], torch.ops.dscompile.thin_linear(x, w, b))


def test_thin_linear_many_equals_each_product_and_keeps_biases_apart():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(8, 576, generator=g)
    ws = [torch.randn(576, 576, generator=g), torch.randn(192, 576, generator=g), torch.randn(5, 576, generator=g)]
    bs = [None, torch.randn(192, generator=g), torch.randn(5, generator=g)]
    outs = torch.ops.dscompile.thin_linear_many(x, ws, bs)
    assert [tuple(o.shape) for o in outs] == [(8, 576), (8, 192), (8, 5)]
    for out, w, b in zip(outs, ws, bs):
        torch.testing.assert_close(out, x @ w.t() + (b if b is not None else 0), rtol=1e-5, atol=1e-4)
    unbiased = torch.ops.dscompile.thin_linear_many(x, ws[:2], [])
    torch.testing.assert_close(unbiased[1], x @ ws[1].t(), rtol=1e-5, atol=1e-4)


def test_thin_linear_refuses_what_it_cannot_compute():
    with pytest.raises(RuntimeError, match="float32 only|float32 CPU"):
        torch.ops.dscompile.thin_linear(torch.randn(2, 8, dtype=torch.float64), torch.randn(3, 8, dtype=torch.float64))
    with pytest.raises(RuntimeError, match=r"w \[N, K\]|weights \[N, 8\]"):
        torch.ops.dscompile.thin_linear(torch.randn(2, 8), torch.randn(3, 9))
    with pytest.raises(RuntimeError, match="bias"):
        torch.ops.dscompile.thin_linear(torch.randn(2, 8), torch.randn(3, 8), torch.randn(4))


@pytest.mark.parametrize(("hidden", "width"), [(576, 1), (37, 3), (37, 5)])  # 5: runs of rows with tails
def test_top_weighted_rows_chooses_the_top_experts_and_a_token_does_not_depend_on_the_others(hidden, width):
    """Each token's top k experts by score, in ascending order, and the sum of their neurons' rows weighted by the
    activations (MoE routed by activation), in an order that depends on nothing but the token: alone it computes
    bitwise what it computes among eight."""
    g = torch.Generator().manual_seed(hidden)
    experts, k = 1536 // width, 768 // width
    rows, a = torch.randn(experts * width, hidden, generator=g), torch.randn(8, experts * width, generator=g)
    scores = torch.randn(8, experts, generator=g)
    out, idx = torch.ops.dscompile.top_weighted_rows(scores, a, rows, k)
    assert torch.equal(idx, scores.topk(k, -1).indices.sort(-1).values)
    keep = torch.zeros(8, experts).scatter(1, idx, 1.0).repeat_interleave(width, 1)
    torch.testing.assert_close(out, ((a * keep).double() @ rows.double()).float(), rtol=1e-5, atol=1e-4)
    for t in range(8):
        alone, alone_idx = torch.ops.dscompile.top_weighted_rows(scores[t:t + 1], a[t:t + 1], rows, k)
        assert torch.equal(alone, out[t:t + 1]) and torch.equal(alone_idx, idx[t:t + 1])
    tied = torch.zeros(1, experts)  # ties: exactly k of them, the lowest expert ids
    assert torch.equal(torch.ops.dscompile.top_weighted_rows(tied, a[:1], rows, 3)[1], torch.tensor([[0, 1, 2]]))
    mask = torch.ops.dscompile.top_mask(scores, k)  # the same choice as a mask, for the masked formulation
    assert torch.equal(mask, torch.zeros(8, experts).scatter(1, idx, 1.0))
    assert torch.equal(torch.ops.dscompile.top_mask(tied, 3).nonzero()[:, 1], torch.tensor([0, 1, 2]))
    with pytest.raises(RuntimeError, match="k must be in"):
        torch.ops.dscompile.top_mask(scores, 0)
    with pytest.raises(RuntimeError, match="k must be in"):
        torch.ops.dscompile.top_weighted_rows(scores, a, rows, experts + 1)
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.dscompile.top_weighted_rows(scores.double(), a, rows, k)


def test_top_choice_is_exact_with_duplicates_negatives_and_signed_zeros():
    """The radix selection against a stable sort: many equal scores (the lowest ids win), negative scores, and -0.0
    equal to +0.0, for several k."""
    g = torch.Generator().manual_seed(3)
    scores = torch.randint(-4, 5, (16, 300), generator=g).float() * 0.5
    scores[0, ::2] = -0.0
    scores[0, 1::2] = 0.0
    for k in (1, 7, 150, 299, 300):
        order = torch.sort(-scores, dim=1, stable=True).indices[:, :k]  # by score, then by id
        expected = torch.zeros_like(scores).scatter(1, order, 1.0)
        assert torch.equal(torch.ops.dscompile.top_mask(scores, k), expected)
        idx = torch.ops.dscompile.top_weighted_rows(scores, torch.ones(16, 300), torch.ones(300, 4), k)[1]
        assert torch.equal(idx, order.sort(1).values)


def _attention_case(batch, heads, kv_heads, queries, slots, dim, v_dim, seed=0, masked=0.3):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, queries, heads, dim, generator=g).transpose(1, 2) * 2  # the layout decode steps pass
    k = torch.randn(batch, kv_heads, slots, dim, generator=g)
    v = torch.randn(batch, kv_heads, slots, v_dim, generator=g)
    keep = torch.rand(batch, 1, queries, slots, generator=g) >= masked
    keep[..., 0] = True
    keep[..., slots - slots // 4:] = False  # the unfilled end of a static cache
    return q, k, v, torch.zeros(keep.shape).masked_fill(~keep, MIN)


def _sdpa64(q, k, v, mask, scale):
    out = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), scale=scale, enable_gqa=True,
                                         attn_mask=None if mask is None else mask.double())
    return out.float()


@pytest.mark.parametrize("shape", [(8, 9, 3, 1, 256, 64, 64), (1, 4, 4, 3, 37, 20, 23), (2, 8, 2, 5, 1100, 64, 64),
                                   (1, 2, 1, 1, 5, 7, 7), (3, 6, 3, 16, 130, 128, 32)])
def test_decode_attention_equals_sdpa(shape):
    q, k, v, mask = _attention_case(*shape)
    got = torch.ops.dscompile.decode_attention(q, k, v, mask, 0.3)
    torch.testing.assert_close(got, _sdpa64(q, k, v, mask, 0.3), rtol=1e-4, atol=2e-5)
    # The CPU flash kernel's output layout ([batch, queries, heads, dim] in memory), so the views after it hold.
    assert got.transpose(1, 2).is_contiguous()
    if shape[5] == shape[6]:
        flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k.repeat_interleave(q.shape[1] // k.shape[1], 1), v.repeat_interleave(q.shape[1] // v.shape[1], 1),
            attn_mask=mask, scale=0.3)[0]
        assert got.stride() == flash.stride()
    unmasked = torch.ops.dscompile.decode_attention(q, k, v, None, shape[5] ** -0.5)
    torch.testing.assert_close(unmasked, _sdpa64(q, k, v, None, shape[5] ** -0.5), rtol=1e-4, atol=2e-5)


def test_decode_attention_of_a_fully_masked_row_averages_like_sdpa():
    q, k, v, _ = _attention_case(2, 4, 2, 2, 40, 16, 16)
    mask = torch.full((2, 1, 2, 40), MIN)
    torch.testing.assert_close(torch.ops.dscompile.decode_attention(q, k, v, mask, 0.25),
                               F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.25, enable_gqa=True))


def test_decode_attention_refuses_mismatched_heads():
    q, k, v, mask = _attention_case(1, 4, 2, 1, 8, 16, 16)
    with pytest.raises(RuntimeError, match="multiple of KV heads"):
        torch.ops.dscompile.decode_attention(q[:, :3], k, v, mask, 0.25)
    with pytest.raises(RuntimeError, match="must match"):
        torch.ops.dscompile.decode_attention(q, k[:, :, :5], v, mask, 0.25)


@pytest.mark.slow
def test_the_narrower_vector_build_computes_the_same(tmp_path):
    """The AVX2 path (8-wide vectors, one weight row at a time) that CPUs without AVX-512 compile: built here with
    ``-march=haswell`` and checked in a fresh process (the operators can be registered once per process). Tuned for
    AMD Zen, where GCC avoids FMA chains: before the kernels fused their multiply-adds explicitly, a row's sum there
    depended on how many rows shared its block (a CI machine's failure)."""
    library = native.build(tmp_path / native.LIBRARY, arch="haswell", tune="znver3")
    check = textwrap.dedent(f"""
        import sys, torch, torch.nn.functional as F
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        torch.ops.load_library({str(library)!r})
        from test_native_kernels import _attention_case, _products, _sdpa64
        for x, w, b in _products(seed=1):
            expected = x @ w.t() + (b if b is not None else 0)
            torch.testing.assert_close(torch.ops.dscompile.thin_linear(x, w, b), expected, rtol=1e-5, atol=1e-4)
            torch.testing.assert_close(torch.ops.dscompile.thin_linear(x, w.bfloat16(), b),
                                       x @ w.bfloat16().float().t() + (b if b is not None else 0), rtol=1e-5,
                                       atol=1e-4)
        for rows in (2, 5, 9, 12):
            x, w = torch.randn(rows, 576), torch.randn(1536 + 5, 576)
            together = torch.ops.dscompile.thin_linear(x, w, None)
            assert all(torch.equal(torch.ops.dscompile.thin_linear(x[r:r + 1], w, None), together[r:r + 1])
                       for r in range(rows))
        q, k, v, mask = _attention_case(2, 8, 2, 3, 700, 64, 40)
        torch.testing.assert_close(torch.ops.dscompile.decode_attention(q, k, v, mask, 0.2),
                                   _sdpa64(q, k, v, mask, 0.2), rtol=1e-4, atol=2e-5)
        together = torch.ops.dscompile.decode_attention(q, k, v, mask, 0.2)
        alone = torch.ops.dscompile.decode_attention(q[:, :, :1], k, v, mask[:, :, :1], 0.2)
        assert torch.equal(alone, together[:, :, :1])
        print("ok")
    """)
    env = {**os.environ, "DSCOMPILE_NATIVE_KERNELS": "0"}  # importing this file must not load the native build
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


def test_a_failed_build_falls_back_with_a_warning(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setenv("DSCOMPILE_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setattr(native.shutil, "which", lambda name: str(tmp_path / "false") if name == "g++" else None)
    (tmp_path / "false").write_text("#!/bin/sh\necho 'cannot compile here' >&2\nexit 3\n")
    (tmp_path / "false").chmod(0o755)
    with caplog.at_level(logging.WARNING, logger="dscompile"):
        assert native.load() is False
    assert "native CPU kernels unavailable" in caplog.text and "cannot compile here" in caplog.text
    assert native.load() is False  # decided once per process
    assert not any(tmp_path.glob("kernels/*/*.so"))


def test_no_compiler_and_switched_off(monkeypatch):
    monkeypatch.setattr(native.shutil, "which", lambda name: None)
    with pytest.raises(OSError, match="no C\\+\\+ compiler"):
        native.compiler()
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setenv("DSCOMPILE_NATIVE_KERNELS", "0")
    assert not native.enabled() and native.load() is False


def test_the_cache_key_follows_source_and_machine(monkeypatch):
    path = native.library_path()
    assert path.name == native.LIBRARY and path.exists()
    monkeypatch.setattr(native, "_cpu_flags", lambda: "flags : another machine")
    assert native.library_path() != path


@pytest.mark.parametrize("shape", [(1, 9, 3, 8, 328, 64, 64), (2, 4, 2, 5, 700, 20, 23), (1, 4, 4, 3, 37, 64, 64)])
def test_a_decode_attention_row_does_not_depend_on_the_other_queries(shape):
    """Speculative decoding is lossless only if a verified row scores exactly as a plain step would: each query's
    output must be bitwise the same alone as among the step's other queries (drafts, tree nodes)."""
    q, k, v, mask = _attention_case(*shape)
    together = torch.ops.dscompile.decode_attention(q, k, v, mask, 0.125)
    for t in range(q.shape[2]):
        alone = torch.ops.dscompile.decode_attention(q[:, :, t:t + 1], k, v, mask[:, :, t:t + 1], 0.125)
        assert torch.equal(alone, together[:, :, t:t + 1])
