"""The ``mtp`` pass on forward graphs: records where the MTP heads attach, and leaves the forward unchanged.

MTP changes how tokens are generated, not what the model computes: the forward keeps its outputs exactly (DESIGN:
full backward compatibility). The rewrite of the LM-head subgraph happens in the generation runtime's program
(:mod:`.mtp_program`), which also returns the hidden state feeding the head so the heads can draft from it.
"""

from __future__ import annotations

from torch.fx import GraphModule

from .base import PassContext, PassResult


def mtp_pass(gm: GraphModule, ctx: PassContext) -> PassResult:
    """Note the LM head the heads will draft from, or why MTP cannot attach to this graph."""
    config = ctx.profile.mtp
    assert config is not None, "the pass manager runs mtp only for profiles with an MTP config"
    result = PassResult("mtp", gm)
    if not ctx.matches.lm_head:
        result.skipped.append("no LM head in this graph: MTP heads attach where the vocabulary projection is")
        return result
    head = ctx.matches.lm_head[0]
    result.notes.append(f"{head.layer}: {config.depth} {config.head} MTP head(s) draft from its input "
                        f"(hidden {head.hidden_size}, draft vocabulary {min(config.draft_vocab, head.vocab_size)} of "
                        f"{head.vocab_size}); the forward is unchanged, generation verifies drafts losslessly")
    return result
