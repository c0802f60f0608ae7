"""Lowering through Inductor, the default."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch.fx import GraphModule


def lower_inductor(gm: GraphModule, example_inputs: Sequence[Any], mode: str | None = None) -> Callable[..., Any]:
    """Compile the rewritten graph with Inductor; ``mode`` is torch.compile's (``max-autotune`` and so on)."""
    import torch._inductor
    from torch._inductor.compile_fx import compile_fx

    patches = torch._inductor.list_mode_options(mode) if mode and mode != "default" else {}
    return compile_fx(gm, list(example_inputs), config_patches=patches)
