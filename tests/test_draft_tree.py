"""Draft trees: the topology chosen from rank shares, tree acceptance, the tree attention mask, and speculative
decoding with trees exact against plain greedy decoding (compiled too), with chains where trees cannot verify."""

from __future__ import annotations

import pytest
import torch
from test_mtp import mtp_model, varied_llama
from tiny import assert_same_or_near_tie, greedy_by_forward, ids
from zoo import built

import dscompile
from dscompile import ConfigError, MTPConfig
from dscompile.passes.mtp_heads import MTPHeads
from dscompile.runtime.draft_tree import DEFAULT_RANK_SHARES, DraftTree, accept_tree, path_tokens, tree_tokens_per_step
from dscompile.runtime.generate import attention_bias
from dscompile.runtime.speculative import accept_greedy


def noisy_tree(heads: MTPHeads, rate: float = 0.4, seed: int = 0) -> None:
    """Replace a share of the tree's drafts by random tokens (siblings may then coincide: acceptance must still
    keep one path)."""
    real = heads.draft_tree
    gen = torch.Generator().manual_seed(seed)

    def draft_tree(h, token, tree):
        tokens = real(h, token, tree)
        flip = torch.rand(tokens.shape, generator=gen) < rate
        return torch.where(flip, torch.randint(0, heads.vocab, tokens.shape, generator=gen), tokens)

    heads.draft_tree = draft_tree  # type: ignore[method-assign]


def test_chain_is_the_tree_of_first_choices():
    chain = DraftTree.chain(3)
    assert chain.is_chain and chain.size == 3 and chain.depth == 3 and chain.depths == (0, 1, 2, 3)
    assert torch.equal(chain.ancestors(), torch.tril(torch.ones(4, 4, dtype=torch.bool)))
    assert chain.path_nodes()[2].tolist() == [0, 1, 2, 2]
    assert chain.levels() == [[1], [2], [3]]


def test_best_tree_keeps_the_most_probable_paths():
    shares = [[0.5, 0.2, 0.1], [0.4, 0.1, 0.05]]
    # (0,) .5; then (1,) .2 ties (0, 0) .2 and the shallower wins; then (0, 0) .2; then (2,) .1 over (1, 0) .08.
    tree = DraftTree.best(shares, 4)
    assert tree.parents == (0, 0, 0, 1) and tree.ranks == (0, 1, 2, 0)
    assert not tree.is_chain and tree.depth == 2 and tree.depths == (0, 1, 1, 1, 2)
    anc = tree.ancestors()
    assert anc[4].tolist() == [True, True, False, False, True]  # node 4 sees the root, node 1 and itself
    assert tree.path_nodes()[4].tolist() == [0, 1, 4]
    assert DraftTree.best([[0.9, 0.01]] * 3, 3).is_chain  # confident heads: the chain
    assert DraftTree.best([[0.3, 0.3]], 5).size == 2  # no more paths than ranks times depths


@pytest.mark.parametrize("parents, ranks, message", [
    ((0, 2), (0, 0), "must come before it"),
    ((0, 0), (1, 1), "share a parent and a rank"),
    ((), (), "at least one node"),
])
def test_malformed_trees_are_refused(parents, ranks, message):
    with pytest.raises(ValueError, match=message):
        DraftTree(parents, ranks)


def test_tree_acceptance_on_a_chain_is_chain_acceptance():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 5, 7, generator=gen)
    target = logits.argmax(-1)
    drafts = torch.where(torch.rand(64, 4, generator=gen) < 0.7, target[:, :4], torch.randint(0, 7, (64, 4),
                                                                                              generator=gen))
    chain = DraftTree.chain(4)
    accepted, token, last, in_path = accept_tree(chain, drafts, logits, chain.ancestors())
    expect_accepted, expect_token = accept_greedy(drafts, logits)
    assert torch.equal(accepted, expect_accepted) and torch.equal(token, expect_token)
    assert torch.equal(last, accepted)
    assert torch.equal(in_path, torch.arange(5)[None] <= accepted[:, None])
    assert set(accepted.tolist()) >= {0, 1, 4}  # every case happened


def test_tree_acceptance_follows_the_child_the_model_agrees_with():
    tree = DraftTree.best([[0.5, 0.2, 0.1], [0.4, 0.1, 0.05]], 4)  # nodes 1-3 after the root, node 4 after 1
    logits = torch.full((3, 5, 10), -1.0)
    drafts = torch.tensor([[3, 5, 6, 7], [3, 5, 6, 7], [3, 3, 6, 7]])
    logits[0, 0, 5] = logits[0, 2, 9] = 1.0  # row 0: the root's choice is node 2's token, then 9
    logits[1, 0, 3] = logits[1, 1, 7] = logits[1, 4, 8] = 1.0  # row 1: node 1, then its child node 4, then 8
    logits[2, 0, 3] = logits[2, 1, 2] = logits[2, 2, 1] = 1.0  # row 2: nodes 1 and 2 agree (duplicate siblings)
    accepted, token, last, in_path = accept_tree(tree, drafts, logits, tree.ancestors())
    assert accepted.tolist() == [1, 2, 1] and token.tolist() == [9, 8, 2] and last.tolist() == [2, 4, 1]
    assert in_path.tolist() == [[True, False, True, False, False], [True, True, False, False, True],
                                [True, True, False, False, False]]  # one path per row
    emitted = path_tokens(drafts, token, last, accepted, tree.path_nodes())
    assert emitted[0, :2].tolist() == [5, 9] and emitted[1].tolist() == [3, 7, 8] and emitted[2, :2].tolist() == [3, 2]


def test_tokens_per_step_of_a_tree_from_measured_ranks():
    ranks = torch.tensor([[0, 0, 1], [1, 0, 0], [0, 2, 0], [0, 0, 0]])  # rows: positions; columns: depths 1-3
    assert tree_tokens_per_step(DraftTree.chain(3), ranks) == 2.5  # keeps 2, 0, 1 and 3 drafts
    tree = DraftTree((0, 0, 0, 1), (0, 1, 2, 0))  # first choices two deep, and the second and third at depth 1
    assert tree_tokens_per_step(tree, ranks) == 2.5  # keeps 2, 1 (the second choice), 1 and 2
    assert tree_tokens_per_step(DraftTree.chain(1), ranks) == 1.75


def test_attention_bias_lets_tree_nodes_see_only_their_ancestors():
    tree = DraftTree.best([[0.5, 0.2, 0.1], [0.4, 0.1, 0.05]], 4)
    valid = torch.zeros(1, 12, dtype=torch.bool)
    valid[:, :8] = True
    slots = torch.arange(3, 8)  # the step's 5 slots, after 3 earlier tokens
    bias = attention_bias(valid, slots, None, torch.float32, step_mask=tree.ancestors())[0, 0]
    seen = bias == 0
    assert seen[:, :3].all()  # every node sees the context before the step
    assert torch.equal(seen[:, 3:8], tree.ancestors())
    assert not seen[:, 8:].any()


def test_heads_draft_a_tree_whose_first_path_is_the_chain():
    model = varied_llama()
    x = ids(1, 8, seed=21)
    opt = mtp_model(model, x, depth=3, draft_nodes=7)
    heads = opt.mtp_heads()
    tree = heads.tree()
    assert tree.size == 7 and tree.depth <= 3 and not tree.is_chain
    h, token = torch.randn(2, heads.hidden), torch.tensor([3, 9])
    got = heads.draft_tree(h, token, tree)
    assert got.shape == (2, 7)
    chain = heads.draft_tree(h, token, DraftTree.chain(3))
    assert torch.equal(chain, heads.draft(h, token)[0])  # the tree code drafts a chain as draft() does
    firsts = [j for j in range(1, tree.size + 1) if tree.parents[j - 1] == 0]
    assert len(set(got[0, [j - 1 for j in firsts]].tolist())) == len(firsts)  # the root's children differ


@pytest.mark.parametrize("batch", [1, 2])
def test_tree_speculation_equals_plain_greedy(batch):
    model = varied_llama()
    x = ids(batch, 8, seed=22 + batch)
    opt = mtp_model(model, x[:1], depth=3, draft_nodes=6)
    noisy_tree(opt.mtp_heads())
    got = opt.generate(x, max_new_tokens=60, eos_token_id=[])
    assert_same_or_near_tie(model, got, greedy_by_forward(model, x, 60))
    stats = opt.monitor.last.extra
    assert opt.runtime().draft_tree(batch).size == stats["mtp_draft_nodes"] == 6
    assert 1.0 < stats["mtp_tokens_per_step"] <= 4.0
    assert capacity_with_holes(opt, batch, 8 + 60)


def capacity_with_holes(opt: dscompile.OptimizedModel, batch: int, total: int) -> bool:
    """Trees leave holes even at batch 1: the cache holds room for them."""
    from dscompile.runtime.speculative import HOLE_SLOTS

    return opt.monitor.last.extra["capacity"] >= total + HOLE_SLOTS


def test_trees_with_compaction_and_a_left_padded_batch(monkeypatch):
    import dscompile.runtime.generate as generate
    import dscompile.runtime.speculative as speculative

    monkeypatch.setattr(speculative, "HOLE_SLOTS", 4)
    monkeypatch.setattr(generate, "BUCKET", 8)
    packs = []
    real_compact = speculative.compact
    monkeypatch.setattr(speculative, "compact", lambda *a: packs.append(1) or real_compact(*a))
    model, example, expect = built("llama")
    opt = mtp_model(model, example[:1], depth=2, draft_nodes=5)
    noisy_tree(opt.mtp_heads(), rate=0.5)
    x = torch.randint(1, expect.vocab, (2, 6), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(x)
    mask[1, :2] = 0
    x = x.masked_fill(mask == 0, 0)
    got = opt.generate(x, attention_mask=mask, max_new_tokens=40, eos_token_id=[])
    with torch.no_grad():
        expected = model.generate(x, attention_mask=mask, max_new_tokens=40, do_sample=False, eos_token_id=None,
                                  pad_token_id=0)
    assert_same_or_near_tie(model, got, expected, mask)
    assert packs, "the cache was never packed: the test did not exercise compaction"


def test_trees_give_way_to_chains_where_they_cannot_verify():
    model = varied_llama()
    x = ids(3, 8, seed=27)
    opt = mtp_model(model, x[:1], depth=2, draft_nodes=5)  # 6 verified rows a sequence
    runtime = opt.runtime()
    assert runtime.draft_tree(2).size == 5  # 12 rows fit the 16 a CPU verifies memory-bound
    assert runtime.draft_tree(3).is_chain  # 18 do not: the chain (9 rows) still speculates
    assert runtime.draft_tree(1, sampling=True).is_chain  # speculative sampling verifies chains
    got = opt.generate(x, max_new_tokens=20, eos_token_id=[])
    assert_same_or_near_tie(model, got, greedy_by_forward(model, x, 20))
    sampled = opt.generate(x[:1], max_new_tokens=20, do_sample=True, generator=torch.Generator().manual_seed(0))
    assert sampled.shape == (1, 28)
    hand_written, example, _ = built("nanogpt")  # positions are cache slots: no holes, so no trees
    chain_only = mtp_model(hand_written, example[:1], depth=2, draft_nodes=5).runtime()
    assert chain_only.program.slot_is_position and chain_only.draft_tree(1).is_chain


def test_measured_rank_shares_are_saved_and_shape_the_tree(tmp_path):
    model = varied_llama()
    data = ids(1, 600, seed=28)
    opt = mtp_model(model, data[:, :8], depth=2, draft_nodes=4)
    report = dscompile.train_mtp(opt, data, steps=3, prompts=16, prompt_tokens=8, new_tokens=16, progress=False)
    shares = report.rank_shares
    assert len(shares) == 2 and all(len(s) == 8 for s in shares)
    assert all(0.0 <= sum(s) <= 1.0 + 1e-6 for s in shares)
    assert report.to_dict()["rank_shares"] == [[round(v, 4) for v in s] for s in shares]
    assert 1.0 <= report.tree_tokens_per_step <= 3.0
    heads = opt.mtp_heads()
    assert heads.rank_shares == shares and heads.tree() == DraftTree.best(shares, 4)
    path = tmp_path / "heads.safetensors"
    opt.save_mtp(str(path))
    again = mtp_model(model, data[:, :8], depth=1, draft_nodes=3, heads=str(path)).mtp_heads()
    assert again.rank_shares == shares[:1] and again.tree() == DraftTree.best(shares[:1], 3)


@pytest.mark.parametrize("nodes", [2, 64, 3.5])
def test_bad_draft_tree_sizes_are_refused(nodes):
    with pytest.raises(ConfigError, match="mtp.draft_nodes must be an integer from depth"):
        MTPConfig(depth=3, draft_nodes=nodes)


def test_speculation_refuses_a_tree_where_it_cannot_verify_one():
    from dscompile.runtime.speculative import Speculation

    model = varied_llama()
    x = ids(1, 8, seed=29)
    opt = mtp_model(model, x, depth=2, draft_nodes=4)
    sample = {"do_sample": True, "temperature": 1.0, "top_k": None, "top_p": None, "generator": None}
    with pytest.raises(ConfigError, match="draft trees verify greedily"):
        Speculation(opt.runtime(), opt.mtp_heads(), x, 8, set(), 0, sample, None, tree=opt.mtp_heads().tree())


def test_measure_mtp_shapes_the_tree_of_heads_saved_without_rank_shares():
    model = varied_llama()
    data = ids(1, 600, seed=30)
    opt = mtp_model(model, data[:, :8], depth=2)
    heads = opt.mtp_heads()
    assert heads.rank_shares is None and heads.tree() == DraftTree.best([[*DEFAULT_RANK_SHARES]] * 2, 4)
    found = dscompile.measure_mtp(opt, data, prompts=8, prompt_tokens=8, new_tokens=12, progress=False)
    assert heads.rank_shares == found["rank_shares"] and len(found["rank_shares"]) == 2
    assert found["tree"] == heads.tree() == DraftTree.best(found["rank_shares"], 4)
    assert found["tokens_per_step"] == pytest.approx(1 + sum(found["acceptance"]))
    assert 1.0 <= found["tree_tokens_per_step"] <= 1.0 + found["tree"].depth
    assert found["acceptance"][0] <= sum(found["rank_shares"][0][:1]) + 1e-6  # a chain keeps only first choices
    with pytest.raises(ConfigError, match="prompts must be at least 2"):
        dscompile.measure_mtp(opt, data, prompts=1)


@pytest.mark.parametrize("depth, nodes", [(1, 2), (3, 6), (4, 7), (8, 8)])
def test_the_default_tree_doubles_the_depth_up_to_eight_verified_rows(depth, nodes):
    model = varied_llama()
    opt = mtp_model(model, ids(1, 8), depth=depth)
    tree = opt.mtp_heads().tree()
    assert tree.size == nodes and tree.is_chain == (depth == 8)
