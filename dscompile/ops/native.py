"""Native CPU kernels, built on first use with the machine's C++ compiler and kept in the user cache.

A CPU decode step is bound by reading weights and cache, and runs fastest with kernels written for that: thin
products that stream each weight row once for all rows of the step (``thin_linear.cpp``, used by
``lower.thin_matmul``), attention that reads each cached key and value once for all query heads
(``decode_attention.cpp``, ``lower.decode_attention``), and MoE experts read once for all tokens that chose them
(``moe_experts.cpp``, ``passes.moe_ops``), and the choice and chosen down rows of experts routed by activation
(``activation_choice.cpp``). They are built for the very CPU they run on (``-march=native``), so they
ship as source: the first call compiles them (a few seconds), later processes load the cached library. The cache key
covers the source, torch's version and ABI, the compiler and the CPU's instruction sets, so a changed machine or
torch builds anew. Without a compiler, or when the build fails, :func:`load` says why once and returns False; the
callers then keep their portable path. ``DSCOMPILE_NATIVE_KERNELS=0`` turns the kernels off.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger("dscompile")

SOURCES = ("thin_linear.cpp", "decode_attention.cpp", "moe_experts.cpp", "activation_choice.cpp")
HEADERS = ("vector.h", "thin_rows.h")
LIBRARY = "libdscompile_kernels.so"
_state: dict[str, object] = {}


def enabled() -> bool:
    """Whether native kernels may be used (``DSCOMPILE_NATIVE_KERNELS`` is not 0/false/no/off)."""
    return os.environ.get("DSCOMPILE_NATIVE_KERNELS", "1").strip().lower() not in ("0", "false", "no", "off")


def load() -> bool:
    """Build (once per machine) and load the kernels; True when ``torch.ops.dscompile`` has them."""
    if "loaded" in _state:
        return bool(_state["loaded"])
    if not enabled():
        return False
    try:
        path = library_path()
        if not path.exists():
            build(path)
        torch.ops.load_library(str(path))
        _register_fakes()
        _state["loaded"] = True
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        log.warning("native CPU kernels unavailable, decode steps use Inductor's reductions instead: %s", error)
        _state["loaded"] = False
    return bool(_state["loaded"])


def source_files(headers: bool = True) -> tuple[str, ...]:
    """The kernels' source files, headers included (their hash is part of the compiled graphs' cache key)."""
    return tuple(str(Path(__file__).parent / name) for name in SOURCES + (HEADERS if headers else ()))


def compiler() -> str:
    """The C++ compiler's path: ``$CXX``, else ``g++``, else ``c++``."""
    for name in (os.environ.get("CXX"), "g++", "c++"):
        found = shutil.which(name) if name else None
        if found:
            return found
    raise OSError("no C++ compiler found (set CXX, or install g++)")


def library_path() -> Path:
    """Where the library for this source, torch, compiler and CPU lives in the cache."""
    from ..models import cache_dir

    key = hashlib.sha256()
    for name in source_files():
        key.update(Path(name).read_bytes())
    key.update(" ".join([torch.__version__, str(torch._C._GLIBCXX_USE_CXX11_ABI), compiler(), _cpu_flags(),
                         *compile_command(Path("x"))]).encode())
    return cache_dir() / "kernels" / key.hexdigest()[:16] / LIBRARY


def compile_command(output: Path, arch: str = "native", tune: str | None = None) -> list[str]:
    """The compiler's command line for ``output`` (``arch`` is ``-march``'s value, ``tune`` ``-mtune``'s).

    ``-ffp-contract=off``: the kernels fuse multiply-adds only where they say so (``vector.h``'s ``madd``), so a
    row's result does not depend on the CPU the compiler tuned for or on how many rows shared its block."""
    root = Path(torch.__file__).parent
    return [
        compiler(), "-O3", f"-march={arch}", *([f"-mtune={tune}"] if tune else []), "-ffp-contract=off",
        "-std=c++17", "-fopenmp", "-shared", "-fPIC", "-w",
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        f"-I{root / 'include'}", f"-I{root / 'include' / 'torch' / 'csrc' / 'api' / 'include'}",
        *source_files(headers=False), f"-L{root / 'lib'}", f"-Wl,-rpath,{root / 'lib'}", "-ltorch_cpu", "-lc10",
        "-o", str(output),
    ]


def build(path: Path, arch: str = "native", tune: str | None = None) -> Path:
    """Compile the kernels into ``path`` (written to a temporary name first, so a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        staged = Path(tmp) / LIBRARY
        log.info("building native CPU kernels into %s", path.parent)
        done = subprocess.run(compile_command(staged, arch, tune), capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise RuntimeError(f"{compiler()} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
        os.replace(staged, path)
    return path


def _cpu_flags() -> str:
    """The CPU's feature flags (what ``-march=native`` compiles for); empty where /proc/cpuinfo is missing."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    return next((line for line in text.splitlines() if line.startswith(("flags", "Features"))), "")


def _register_fakes() -> None:
    """Shapes for tracing: Dynamo and Inductor call these instead of the kernels on fake tensors."""

    @torch.library.register_fake("dscompile::thin_linear")
    def _thin_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        return x.new_empty(x.shape[0], w.shape[0])

    @torch.library.register_fake("dscompile::thin_linear_many")
    def _thin_linear_many(x: torch.Tensor, ws: list[torch.Tensor], bs: list[torch.Tensor | None]
                          ) -> list[torch.Tensor]:
        return [x.new_empty(x.shape[0], w.shape[0]) for w in ws]

    @torch.library.register_fake("dscompile::moe_experts")
    def _moe_experts(x: torch.Tensor, idx: torch.Tensor, gate: torch.Tensor | None, up: torch.Tensor,
                     down: torch.Tensor, gate_bias: torch.Tensor | None, up_bias: torch.Tensor | None,
                     activation: str) -> torch.Tensor:
        return x.new_empty(x.shape)

    @torch.library.register_fake("dscompile::top_weighted_rows")
    def _top_weighted_rows(scores: torch.Tensor, a: torch.Tensor, rows: torch.Tensor, k: int
                           ) -> tuple[torch.Tensor, torch.Tensor]:
        return a.new_empty(a.shape[0], rows.shape[1]), scores.new_empty(scores.shape[0], k, dtype=torch.long)

    @torch.library.register_fake("dscompile::top_mask")
    def _top_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
        return torch.empty_like(scores)

    @torch.library.register_fake("dscompile::decode_attention")
    def _decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                          scale: float) -> torch.Tensor:
        batch, heads, queries, _ = q.shape
        return q.new_empty(batch, queries, heads, v.shape[-1]).permute(0, 2, 1, 3)  # the flash kernel's layout
