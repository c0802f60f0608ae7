"""Generation where the compiler owns the KV cache: static buffers, prefill and a compiled decode step."""

from .generate import Runtime
from .sampling import choose_next

__all__ = ["Runtime", "choose_next"]
