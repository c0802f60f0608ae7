"""Runs the passes a profile asks for, in order, then cleanup; a pass that fails leaves the graph untouched."""

from __future__ import annotations

import copy
import logging

from torch.fx import GraphModule

from ..errors import UnsupportedError
from ..profile import Profile
from .base import PassContext, PassFn, PassResult, pass_uuid
from .cleanup import cleanup
from .mla_forward import mla_pass
from .moe_forward import moe_pass
from .mtp_forward import mtp_pass

log = logging.getLogger("dscompile")

# Rewrite name -> pass. Passes register here as they land; a profile naming one that is absent is refused
# before any work (see check_supported).
REGISTRY: dict[str, PassFn] = {"mla": mla_pass, "moe": moe_pass, "mtp": mtp_pass}
ORDER = ("mla", "moe", "mtp")


def check_supported(profile: Profile) -> None:
    """Refuse a profile whose rewrites this version does not have, before any capture or compile."""
    missing = [name for name in profile.rewrites if name not in REGISTRY]
    if missing:
        raise UnsupportedError(
            f"profile {profile.name!r} asks for the {', '.join(m.upper() for m in missing)} rewrite(s), which "
            f"this version of dscompile does not implement yet; available rewrites: "
            f"{', '.join(REGISTRY) or 'none'} (use profile='none' to compile without rewriting)"
        )


def run_passes(gm: GraphModule, ctx: PassContext) -> list[PassResult]:
    """Apply the profile's passes to ``gm`` in place, in ``ORDER``; return what each did."""
    check_supported(ctx.profile)
    results: list[PassResult] = []
    for name in ORDER:
        if getattr(ctx.profile, name) is None:
            continue
        fn = REGISTRY[name]
        backup = copy.deepcopy(gm.graph)
        try:
            result = fn(gm, ctx)
        except Exception as exc:  # a failing pass must never crash the user's compile (DESIGN decision 6)
            log.warning("pass %s failed and was skipped, graph left unchanged: %s", name, exc)
            gm.graph = backup
            gm.recompile()
            result = PassResult(name, gm, skipped=[f"pass failed: {exc}"])
        log.info("pass %s (%s): %d rewrite(s)", name, pass_uuid(fn), result.rewrites)
        results.append(result)
    results.append(cleanup(gm, ctx))
    return results
