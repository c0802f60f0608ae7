"""The ``moe`` pass on forward graphs: each matched FFN becomes shared and routed experts behind a router.

``torch.compile`` hands the backend cache-free forward graphs; there every carved FFN is computed in the ``masked``
formulation of :mod:`.moe_ops` (the numbers the runtime computes, whatever the token count). The experts come from
the model's plan when ``optimize`` made one (calibrated on the user's text), or else from the graph's own example
inputs, with a warning about how few tokens that was.
"""

from __future__ import annotations

from torch.fx import GraphModule

from .base import PassContext, PassResult, session_plan
from .cleanup import cleanup
from .moe_plan import MoEPlan, plan_graph, rewrite_ffn


def moe_pass(gm: GraphModule, ctx: PassContext) -> PassResult:
    """Carve every supported FFN with the plan's experts; report the FFNs left dense."""
    config = ctx.profile.moe
    assert config is not None, "the pass manager runs moe only for profiles with a MoE config"
    ffns = ctx.matches.ffn
    plan: MoEPlan = session_plan(ctx, "moe_plan", ffns, plan_graph, config)
    result = PassResult("moe", gm)
    for i, ffn in enumerate(ffns):
        carved = plan.carved(ffn)
        if carved is None:
            result.skipped.append(f"{ffn.layer}: {plan.skipped.get(ffn.layer, 'no experts for this FFN in the plan')}")
            continue
        rewrite_ffn(gm, ffn.up.input, ffn.down.node, carved, f"moe_{i}", gathered=False)
        result.rewrites += 1
        result.notes.append(f"{ffn.layer}: {ffn.intermediate_size} neurons as {config.n_shared} shared + "
                            f"{carved.n_routed} routed experts, top {carved.top_k}")
    if result.rewrites:
        cleanup(gm, ctx)
    return result
