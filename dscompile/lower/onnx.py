"""ONNX export of a model's forward (token ids -> logits), checked in onnxruntime before it is kept.

The file is written under a temporary name and renamed only after onnxruntime has run it at two or more shapes
and matched PyTorch (DESIGN decision 8: some exporter settings produce models onnxruntime rejects for batch > 1,
so one shape proves little).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..capture import check_model
from ..errors import ConfigError, LoweringError

log = logging.getLogger("dscompile")

# Protobuf caps one file at 2 GiB; above this, weights go to a side file next to the model.
_INLINE_LIMIT = 1_800_000_000


class LogitsOnly(torch.nn.Module):
    """``input_ids -> logits`` without a cache: the one signature every exported model shares."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        from ..evaluate import logits_of

        kwargs: dict[str, Any] = {}
        config = getattr(self.model, "config", None)
        if config is not None and hasattr(config, "use_cache"):
            kwargs["use_cache"] = False
        return logits_of(self.model(input_ids, **kwargs))


@dataclass
class OnnxCheck:
    """What the onnxruntime check saw at one input shape (of one graph, for a runtime export)."""

    shape: tuple[int, ...]
    max_abs_diff: float
    graph: str = "forward"


def export_onnx(
    model: torch.nn.Module,
    path: str | os.PathLike[str],
    profile: Any = "none",
    example_inputs: torch.Tensor | None = None,
    *,
    check_shapes: Sequence[tuple[int, int]] = ((1, 7), (2, 12)),
    atol: float = 1e-4,
    opset: int | None = None,
) -> list[OnnxCheck]:
    """Export ``model`` (``input_ids -> logits``, batch and sequence dynamic) to ``path`` and verify it.

    Returns the per-shape checks. Nothing is written at ``path`` unless onnxruntime ran every shape in
    ``check_shapes`` within ``atol`` of PyTorch (relative to the logits' magnitude where that exceeds 1). An
    :class:`~dscompile.OptimizedModel` exports its generation runtime instead, to the folder ``path`` (see
    :func:`.onnx_runtime.export_onnx_runtime`).
    """
    from ..api import OptimizedModel
    from ..profile import resolve_profile

    if isinstance(model, OptimizedModel):
        from .onnx_runtime import export_onnx_runtime

        return export_onnx_runtime(model, path, atol=atol, opset=opset)
    check_model(model)
    resolved = resolve_profile(profile)
    if resolved.rewrites:
        from ..errors import UnsupportedError

        raise UnsupportedError(
            f"export_onnx writes the plain forward (profile='none'); profile {resolved.name!r} rewrites the model, "
            "so export its generation runtime: dscompile.export_onnx_runtime(model, out_dir, profile, calibration)"
        )
    if not isinstance(example_inputs, torch.Tensor) or example_inputs.dim() != 2:
        raise ConfigError("export_onnx needs example_inputs: a [batch, seq] LongTensor of token ids")
    if len(check_shapes) < 2:
        raise ConfigError("export_onnx checks at two or more shapes; pass at least two (batch, seq) pairs")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    wrapper = LogitsOnly(model).eval()
    batch, seq = torch.export.Dim("batch", min=1, max=1024), torch.export.Dim("seq", min=2, max=1 << 16)
    # Tracing with a size of 1 would specialise that dim; trace at batch 2 and at least 3 tokens.
    traced = example_inputs.expand(2, -1) if example_inputs.shape[0] == 1 else example_inputs
    if traced.shape[1] < 3:
        traced = traced.repeat(1, 2)
    chatter = io.StringIO()  # the exporter prints progress; the library logs instead
    try:
        with torch.no_grad(), contextlib.redirect_stdout(chatter):
            program = torch.onnx.export(
                wrapper, (traced,), dynamo=True, dynamic_shapes=({0: batch, 1: seq},),
                input_names=["input_ids"], output_names=["logits"], opset_version=opset, optimize=True,
            )
    except Exception as exc:  # the exporter's errors vary; say where it broke
        raise LoweringError(f"ONNX export of {type(model).__name__} failed: {exc}") from exc
    finally:
        log.debug("torch.onnx: %s", chatter.getvalue().strip())
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        external = param_bytes > _INLINE_LIMIT
        program.save(str(tmp), external_data=external)
        checks = _check(tmp, wrapper, example_inputs, check_shapes, atol)
        if external:
            os.replace(f"{tmp}.data", f"{target}.data")
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        with contextlib.suppress(FileNotFoundError):
            Path(f"{tmp}.data").unlink()
    log.info("exported %s to %s; onnxruntime matched PyTorch at %s", type(model).__name__, target,
             ", ".join(f"{c.shape} (max diff {c.max_abs_diff:.2e})" for c in checks))
    return checks


def _check(
    path: Path, wrapper: torch.nn.Module, example: torch.Tensor, shapes: Sequence[tuple[int, int]], atol: float
) -> list[OnnxCheck]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    vocab_hi = int(example.max()) + 1
    generator = torch.Generator().manual_seed(0)
    checks: list[OnnxCheck] = []
    for shape in shapes:
        ids = torch.randint(0, vocab_hi, tuple(shape), generator=generator, dtype=example.dtype)
        with torch.no_grad():
            expected = wrapper(ids).float().numpy()
        try:
            (got,) = session.run(["logits"], {"input_ids": ids.numpy()})
        except Exception as exc:  # onnxruntime rejects some exported graphs at some shapes
            raise LoweringError(f"onnxruntime could not run the exported model at shape {tuple(shape)}: {exc}") from exc
        diff = float(abs(got.astype("float32") - expected).max())
        bound = atol * max(1.0, float(abs(expected).max()))  # relative where logits exceed 1, as for the runtime
        if not diff <= bound:
            raise LoweringError(
                f"onnxruntime output differs from PyTorch at shape {tuple(shape)}: max abs diff {diff:.3e} > "
                f"{bound:.3e}"
            )
        checks.append(OnnxCheck(tuple(shape), diff))
    return checks
