"""ONNX of the optimized runtime: the prefill and decode-step programs with the KV cache as explicit inputs and
outputs, MLA's latent cache, MoE and MTP's draft heads included, and greedy generation in onnxruntime.

The runtime's program (:class:`..passes.kv_cache.CachedProgram`) updates its cache buffers in place; an ONNX graph
cannot. Each program is exported through a wrapper that clones the cache inputs, runs the program on the clones and
returns them after the logits, so an exported step is ``(input_ids, position_ids, cache_position, *biases,
*caches) -> (logits, [hidden], *updated caches)`` with batch, tokens and cache capacity dynamic. An export folder
holds ``prefill.onnx``, ``decode.onnx`` (only where the decode step is a graph of its own: MoE's gathered experts,
MLA's absorb mode, MTP's verification of every position), ``draft.onnx`` with MTP, and ``runtime.json``, which
says what the bookkeeping needs: the cache layout, the sliding windows, the dtype, the padding and end tokens.

:func:`onnx_generate` reuses the PyTorch runtime's bookkeeping (:class:`..runtime.Runtime`: attention biases,
positions, left padding, speculative acceptance and cache packing) with every model call made by onnxruntime, so
the two produce the same tokens by construction, not by a second implementation that could drift.

Like the forward export (:mod:`.onnx`), nothing is kept unless onnxruntime ran every graph at two shapes and matched
PyTorch: the files are written to a temporary folder beside the target and moved in only after the check.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..errors import ConfigError, LoweringError, UnsupportedError
from ..passes.moe_plan import without_counters
from ..runtime.draft_tree import DraftTree
from .onnx import _INLINE_LIMIT, OnnxCheck

if TYPE_CHECKING:
    from ..api import OptimizedModel
    from ..monitor import Monitor
    from ..passes.kv_cache import CachedProgram
    from ..passes.mtp_heads import MTPHeads
    from ..runtime import Runtime

log = logging.getLogger("dscompile")

FORMAT = "dscompile-onnx-runtime-1"
MANIFEST = "runtime.json"
FILES = ("prefill.onnx", "decode.onnx", "draft.onnx")
_DTYPES = {torch.float32: "float32", torch.float16: "float16"}

# (batch, tokens, capacity, first slot) at which each graph is checked: a prompt from slot 0 and a later chunk over
# a cache with content, or one decode token and a verified chain. Sizes avoid the model's fixed sizes (1, 2, heads).
_PREFILL_CHECKS = ((1, 5, 9, 0), (3, 3, 11, 4))
_DECODE_CHECKS = ((1, 1, 9, 4), (3, 3, 11, 5))
_TRACE = (2, 3, 7, 2)


class _Functional(torch.nn.Module):
    """A runtime program as a pure function: the caches it would update in place are returned updated instead."""

    def __init__(self, gm: torch.nn.Module, n_inputs: int):
        super().__init__()
        self.gm = gm
        self.n_inputs = n_inputs

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        caches = [c.clone() for c in args[self.n_inputs:]]
        out = self.gm(*args[:self.n_inputs], *caches)
        return (*(tuple(out) if isinstance(out, (tuple, list)) else (out,)), *caches)


class _Draft(torch.nn.Module):
    """MTP's greedy drafting, ``(hidden [b, h], token [b]) -> (drafts [b, depth], logits [b, depth, draft])``."""

    def __init__(self, heads: MTPHeads):
        super().__init__()
        self.heads = heads

    def forward(self, hidden: torch.Tensor, token: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.heads.draft(hidden, token)


def cache_names(program: CachedProgram) -> list[str]:
    """Names of the cache inputs in program order (``new_caches``): ``key_i``/``value_i``, or MLA's ``latent_i``
    (and ``rope_key_i`` in absorb mode), then ``slot_positions``."""
    names: list[str] = []
    for i, layer in enumerate(program.layers):
        if layer.latent is not None:
            names += [f"latent_{i}"] + ([f"rope_key_{i}"] if layer.rope_key else [])
        else:
            names += [f"key_{i}", f"value_{i}"]
    return names + (["slot_positions"] if program.slot_positions else [])


def _bias_names(program: CachedProgram) -> list[str]:
    return ["bias_full" if w is None else f"bias_window_{w}" for w in program.windows]


def export_onnx_runtime(
    model: torch.nn.Module,
    out_dir: str | os.PathLike[str],
    profile: Any = None,
    calibration: Any = None,
    example_inputs: Any = None,
    *,
    tokenizer: Any = None,
    atol: float = 1e-4,
    opset: int | None = None,
) -> list[OnnxCheck]:
    """Export the generation runtime of ``model`` to the folder ``out_dir`` and verify it in onnxruntime.

    ``model`` is an :class:`~dscompile.OptimizedModel` (its profile, calibrated plans and MTP heads are exported as
    they are), or a plain model that is first optimized with ``profile``, ``calibration`` and ``example_inputs``
    (see :func:`dscompile.optimize`). Returns one check per graph and shape; nothing is written in ``out_dir``
    unless every check is within ``atol`` (relative to the output's magnitude where that exceeds 1).
    """
    from ..api import OptimizedModel, optimize

    if not isinstance(model, OptimizedModel):
        if example_inputs is None and calibration is None:
            example_inputs = torch.arange(1, 9).unsqueeze(0)
        model = optimize(model, "none" if profile is None else profile, calibration, example_inputs,
                         tokenizer=tokenizer, lower="eager")
    elif profile is not None:
        raise ConfigError("export_onnx_runtime: an OptimizedModel carries its own profile; do not pass profile=")
    runtime = model.runtime()
    program = runtime.program
    if program.dtype not in _DTYPES:
        raise UnsupportedError(f"ONNX runtime export of a {program.dtype} model: onnxruntime's CPU provider runs "
                               "float32 and float16; load the model in float32")
    target = Path(out_dir)
    if target.exists() and not target.is_dir():
        raise ConfigError(f"{target} is a file; export_onnx_runtime writes a folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        checks, files = _export_all(model, runtime, work, atol, opset)
        _write_manifest(work / MANIFEST, model, runtime, files, checks)
        _move_into(work, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _LOADED.pop(str(target.resolve()), None)
    log.info("exported the %s runtime to %s; onnxruntime matched PyTorch on %d checks (max diff %.2e)",
             model.profile.name, target, len(checks), max(c.max_abs_diff for c in checks))
    return checks


def _export_all(model: OptimizedModel, runtime: Runtime, work: Path, atol: float,
                opset: int | None) -> tuple[list[OnnxCheck], dict[str, str | None]]:
    program = runtime.program
    external = sum(p.numel() * p.element_size() for p in program.gm.parameters()) > _INLINE_LIMIT
    vocab = _vocab(model, program)
    outputs = ["logits"] + (["hidden"] if runtime.drafter is not None else [])
    checks: list[OnnxCheck] = []
    files: dict[str, str | None] = {"prefill": "prefill.onnx", "decode": "prefill.onnx", "draft": None}
    graphs = [("prefill", program.gm, _PREFILL_CHECKS)]
    if program.decode_gm is not None:
        graphs.append(("decode", program.decode_gm, _DECODE_CHECKS))
        files["decode"] = "decode.onnx"
    for name, gm, shapes in graphs:
        wrapper = _Functional(without_counters(gm), 3 + len(program.windows)).eval()
        path = work / f"{name}.onnx"
        _export_program(wrapper, program, path, outputs, external, opset)
        checks += _check_program(path, wrapper, program, outputs, shapes, vocab, atol, name)
    if runtime.drafter is not None:
        path = work / "draft.onnx"
        draft = _Draft(runtime.drafter).eval()
        _export_draft(draft, program, path, external, opset)
        checks += _check_draft(path, draft, program, vocab, atol)
        files["draft"] = "draft.onnx"
    return checks, files


def _vocab(model: OptimizedModel, program: CachedProgram) -> int:
    if program.embedding is not None:
        return int(program.embedding.shape[0])
    from ..passes.kv_cache import _vocab_size

    return _vocab_size(model.original)


def _onnx_export(module: torch.nn.Module, args: tuple[Any, ...], shapes: Any, inputs: list[str], outputs: list[str],
                 path: Path, external: bool, opset: int | None) -> None:
    chatter = io.StringIO()  # the exporter prints progress; the library logs instead
    try:
        with torch.no_grad(), contextlib.redirect_stdout(chatter), warnings.catch_warnings():
            # several inputs share the batch/tokens/capacity axes: the exporter says so once per input
            warnings.filterwarnings("ignore", message=".*axis name", category=UserWarning)
            exported = torch.onnx.export(module, args, dynamo=True, dynamic_shapes=shapes, input_names=inputs,
                                         output_names=outputs, opset_version=opset, optimize=True)
    except Exception as exc:  # the exporter's errors vary by graph; say which graph broke
        raise LoweringError(f"ONNX export of the runtime's {path.stem} graph failed: {exc}") from exc
    finally:
        log.debug("torch.onnx: %s", chatter.getvalue().strip())
    exported.save(str(path), external_data=external)


def _export_program(wrapper: _Functional, program: CachedProgram, path: Path, outputs: list[str], external: bool,
                    opset: int | None) -> None:
    from torch.export import Dim

    batch, tokens = Dim("batch", min=1, max=4096), Dim("tokens", min=1, max=1 << 20)
    capacity = Dim("capacity", min=1, max=1 << 20)
    caches = program.new_caches(1, 1)
    shapes: list[dict[int, Any]] = [{0: batch, 1: tokens}, {0: batch, 1: tokens}, {0: tokens}]
    shapes += [{0: batch, 2: tokens, 3: capacity}] * len(program.windows)
    shapes += [{0: batch, 2: capacity} if c.dim() == 4 else {0: batch, 1: capacity} for c in caches]
    names = cache_names(program)
    inputs = ["input_ids", "position_ids", "cache_position", *_bias_names(program), *names]
    args = _step_inputs(program, *_TRACE, vocab=2)
    _onnx_export(wrapper, args, (tuple(shapes),), inputs, outputs + [f"{n}_out" for n in names], path, external,
                 opset)


def _export_draft(draft: _Draft, program: CachedProgram, path: Path, external: bool, opset: int | None) -> None:
    from torch.export import Dim

    batch = Dim("batch", min=1, max=4096)
    args = (torch.zeros(2, draft.heads.hidden, dtype=program.dtype), torch.zeros(2, dtype=torch.long))
    _onnx_export(draft, args, ({0: batch}, {0: batch}), ["hidden", "token"], ["drafts", "draft_logits"], path,
                 external, opset)


def _step_inputs(program: CachedProgram, batch: int, tokens: int, capacity: int, start: int, *, vocab: int,
                 seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Inputs of one program call: random tokens at slots ``start ..``, caches holding random earlier content."""
    from ..runtime.generate import attention_bias

    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, tokens), generator=generator)
    slots = torch.arange(start, start + tokens)
    valid = torch.arange(capacity).expand(batch, -1) < start + tokens
    biases = [attention_bias(valid, slots, w, program.dtype) for w in program.windows]
    caches = []
    for cache in program.new_caches(batch, capacity):
        if cache.is_floating_point():
            caches.append(torch.randn(cache.shape, generator=generator).to(cache.dtype))
        else:
            caches.append(torch.arange(capacity).expand(batch, -1).contiguous())
    return (ids, slots.expand(batch, -1).contiguous(), slots, *biases, *caches)


def _session(path: Path) -> Any:
    import onnxruntime as ort

    try:
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # a truncated or foreign file
        raise ConfigError(f"onnxruntime could not load {path}: {exc}; export the runtime again") from exc


def _feed(session: Any, names: Sequence[str], values: Sequence[torch.Tensor]) -> dict[str, Any]:
    """Session inputs by name (an input a graph does not read, such as unused positions, may have been dropped)."""
    import numpy as np

    wanted = {i.name for i in session.get_inputs()}
    return {n: np.ascontiguousarray(v.detach().cpu().numpy()) for n, v in zip(names, values) if n in wanted}


def _compare(graph: str, shape: tuple[int, ...], names: Sequence[str], got: Sequence[Any],
             expected: Sequence[torch.Tensor], atol: float) -> OnnxCheck:
    worst = 0.0
    for name, g, e in zip(names, got, expected):
        g = torch.from_numpy(g)
        if not e.is_floating_point():
            if not torch.equal(g.long(), e.long()):
                raise LoweringError(f"onnxruntime's {graph} graph output {name} differs from PyTorch at {shape}")
            continue
        diff = float((g.double() - e.double()).abs().max()) if e.numel() else 0.0
        scale = max(1.0, float(e.double().abs().max())) if e.numel() else 1.0
        if not diff <= atol * scale:
            raise LoweringError(f"onnxruntime's {graph} graph output {name} differs from PyTorch at shape {shape}: "
                                f"max abs diff {diff:.3e} > {atol * scale:.3e}")
        worst = max(worst, diff)
    return OnnxCheck(shape, worst, graph)


def _check_program(path: Path, wrapper: _Functional, program: CachedProgram, outputs: list[str],
                   shapes: Sequence[tuple[int, int, int, int]], vocab: int, atol: float, graph: str) -> list[OnnxCheck]:
    session = _session(path)
    names = ["input_ids", "position_ids", "cache_position", *_bias_names(program), *cache_names(program)]
    out_names = outputs + [f"{n}_out" for n in cache_names(program)]
    checks = []
    for seed, (batch, tokens, capacity, start) in enumerate(shapes):
        if program.max_positions is not None:
            capacity = min(capacity, program.max_positions)
            start = min(start, capacity - tokens)
        args = _step_inputs(program, batch, tokens, capacity, start, vocab=vocab, seed=seed + 1)
        with torch.no_grad():
            expected = wrapper(*args)
        try:
            got = session.run(out_names, _feed(session, names, args))
        except Exception as exc:  # onnxruntime rejects some exported graphs at some shapes
            raise LoweringError(f"onnxruntime could not run the {graph} graph at (batch, tokens, capacity) "
                                f"{(batch, tokens, capacity)}: {exc}") from exc
        checks.append(_compare(graph, (batch, tokens, capacity), out_names, got, expected, atol))
    return checks


def _check_draft(path: Path, draft: _Draft, program: CachedProgram, vocab: int, atol: float) -> list[OnnxCheck]:
    session = _session(path)
    checks = []
    for batch in (1, 3):
        generator = torch.Generator().manual_seed(batch)
        hidden = torch.randn(batch, draft.heads.hidden, generator=generator).to(program.dtype)
        token = torch.randint(0, vocab, (batch,), generator=generator)
        with torch.no_grad():
            expected = draft(hidden, token)
        got = session.run(["drafts", "draft_logits"], _feed(session, ["hidden", "token"], [hidden, token]))
        checks.append(_compare("draft", (batch,), ["drafts", "draft_logits"], got, expected, atol))
    return checks


def _write_manifest(path: Path, model: OptimizedModel, runtime: Runtime, files: dict[str, str | None],
                    checks: list[OnnxCheck]) -> None:
    program = runtime.program
    heads = runtime.drafter
    eos = runtime.eos_token_id
    manifest = {
        "format": FORMAT,
        "model": type(model.original).__name__,
        "profile": model.profile.to_dict(),
        "files": files,
        "dtype": _DTYPES[program.dtype],
        "layers": [dataclasses.asdict(layer) for layer in program.layers],
        "windows": program.windows,
        "slot_positions": program.slot_positions,
        "slot_is_position": program.slot_is_position,
        "takes_attention_mask": program.takes_attention_mask,
        "max_positions": program.max_positions,
        "pad_token_id": runtime.pad_token_id,
        "eos_token_id": list(eos) if isinstance(eos, (list, tuple)) else eos,
        "inputs": ["input_ids", "position_ids", "cache_position", *_bias_names(program), *cache_names(program)],
        "outputs": ["logits"] + (["hidden"] if heads is not None else []) + [f"{n}_out" for n in cache_names(program)],
        "cache_bytes_per_token": program.cache_bytes_per_token(),
        "mtp": None if heads is None else {"depth": heads.depth, "hidden": heads.hidden, "vocab": heads.vocab,
                                           "draft_vocab": int(heads.draft_ids.numel()), "trained": heads.trained},
        "checks": [{"graph": c.graph, "shape": list(c.shape), "max_abs_diff": c.max_abs_diff} for c in checks],
    }
    path.write_text(json.dumps(manifest, indent=2), encoding="utf-8")


def _move_into(work: Path, target: Path) -> None:
    """Move the checked files in; the manifest goes last (and an older one first), so a folder with a manifest
    never pairs it with graphs of another export."""
    target.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        (target / MANIFEST).unlink()
    for stale in [n for name in FILES for n in (name, f"{name}.data")]:  # an older export's files this one lacks
        if not (work / stale).exists():
            with contextlib.suppress(FileNotFoundError):
                (target / stale).unlink()
    for item in sorted(work.iterdir(), key=lambda p: p.name == MANIFEST):
        os.replace(item, target / item.name)


# -- generation in onnxruntime ----------------------------------------------------------------------------------


class OnnxStep(torch.nn.Module):
    """One exported graph behind the runtime program's calling convention: caches are torch tensors updated in
    place (the runtime's speculative decoding packs and masks them), and every model call runs in onnxruntime."""

    def __init__(self, session: Any, inputs: list[str], outputs: list[str], n_results: int):
        super().__init__()
        self.session = session
        self.inputs = inputs
        self.outputs = outputs
        self.n_results = n_results

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        got = self.session.run(self.outputs, _feed(self.session, self.inputs, args))
        caches = args[len(self.inputs) - (len(self.outputs) - self.n_results):]
        for cache, new in zip(caches, got[self.n_results:]):
            cache.copy_(torch.from_numpy(new))
        return tuple(torch.from_numpy(g) for g in got[:self.n_results])


class OnnxDrafter:
    """``draft.onnx`` in the place of :class:`..passes.mtp_heads.MTPHeads` (greedy drafting only)."""

    def __init__(self, session: Any, depth: int, hidden: int, vocab: int):
        self.session = session
        self.depth = depth
        self.hidden = hidden
        self.vocab = vocab

    def tree(self) -> DraftTree:
        """``draft.onnx`` drafts the chain (draft trees stay in the PyTorch runtime)."""
        return DraftTree.chain(self.depth)

    def draft(self, h: torch.Tensor, token: torch.Tensor, pick: object = None) -> tuple[torch.Tensor, torch.Tensor]:
        if pick is not None:
            raise UnsupportedError("onnx_generate drafts greedily only; sampling is not exported")
        drafts, logits = self.session.run(["drafts", "draft_logits"],
                                          _feed(self.session, ["hidden", "token"], [h, token]))
        return torch.from_numpy(drafts), torch.from_numpy(logits)


@dataclasses.dataclass
class _Loaded:
    program: CachedProgram
    drafter: OnnxDrafter | None
    manifest: dict[str, Any]
    stamp: int


_LOADED: dict[str, _Loaded] = {}


def _read_manifest(folder: Path) -> dict[str, Any]:
    how = "export it with dscompile.export_onnx_runtime(...) or `dscompile export-onnx --runtime`"
    if not folder.is_dir():
        raise ConfigError(f"{folder} is not a folder holding an exported runtime; {how}")
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise ConfigError(f"{folder} holds no {MANIFEST}, so it is not an exported dscompile runtime; {how}")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{manifest_path} is unreadable or corrupt ({exc}); {how}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise ConfigError(f"{manifest_path} is not a {FORMAT} manifest (format {found!r}); {how}")
    for key in ("prefill", "decode"):
        name = manifest.get("files", {}).get(key)
        if not isinstance(name, str) or not (folder / name).is_file():
            raise ConfigError(f"{folder} lacks the {key} graph {name!r} its {MANIFEST} names; {how}")
    return manifest


def load_onnx_runtime(path: str | os.PathLike[str]) -> tuple[CachedProgram, OnnxDrafter | None, dict[str, Any]]:
    """The exported runtime in ``path`` as a program the PyTorch runtime can drive (cached while the manifest is
    unchanged), its drafter with MTP, and the manifest."""
    from ..passes.kv_cache import CachedProgram, LayerCache
    from ..patterns import MatchSet

    folder = Path(path)
    manifest = _read_manifest(folder)
    key = str(folder.resolve())
    stamp = (folder / MANIFEST).stat().st_mtime_ns
    cached = _LOADED.get(key)
    if cached is not None and cached.stamp == stamp:
        return cached.program, cached.drafter, cached.manifest
    try:
        layers = [LayerCache(**layer) for layer in manifest["layers"]]
        dtype = {v: k for k, v in _DTYPES.items()}[manifest["dtype"]]
        inputs, outputs = list(manifest["inputs"]), list(manifest["outputs"])
        windows = list(manifest["windows"])
    except (KeyError, TypeError) as exc:
        raise ConfigError(f"{folder / MANIFEST} is incomplete ({exc!r}); export the runtime again") from exc
    n_results = 2 if manifest.get("mtp") else 1
    sessions = {name: _session(folder / name) for name in {manifest["files"]["prefill"], manifest["files"]["decode"]}}
    prefill = OnnxStep(sessions[manifest["files"]["prefill"]], inputs, outputs, n_results)
    decode = None if manifest["files"]["decode"] == manifest["files"]["prefill"] else \
        OnnxStep(sessions[manifest["files"]["decode"]], inputs, outputs, n_results)
    program = CachedProgram(prefill, layers, windows, dtype, bool(manifest["takes_attention_mask"]),  # type: ignore[arg-type]
                            MatchSet(), max_positions=manifest.get("max_positions"),
                            slot_positions=bool(manifest["slot_positions"]), decode_gm=decode,  # type: ignore[arg-type]
                            slot_is_position=bool(manifest.get("slot_is_position")))
    drafter = None
    mtp = manifest.get("mtp")
    if mtp and manifest["files"].get("draft"):
        draft_path = folder / manifest["files"]["draft"]
        if not draft_path.is_file():
            raise ConfigError(f"{folder} lacks the draft graph {draft_path.name} its {MANIFEST} names; export the "
                              "runtime again")
        drafter = OnnxDrafter(_session(draft_path), int(mtp["depth"]), int(mtp["hidden"]), int(mtp["vocab"]))
    _LOADED[key] = _Loaded(program, drafter, manifest, stamp)
    return program, drafter, manifest


def onnx_generate(
    path: str | os.PathLike[str],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int | None = None,
    *,
    eos_token_id: int | list[int] | None = None,
    max_length: int | None = None,
    streamer: Any = None,
    speculate: bool = True,
    monitor: Monitor | None = None,
) -> torch.Tensor:
    """Greedy generation from the runtime exported to ``path``, every model call in onnxruntime.

    Returns prompt plus new tokens ``[batch, prompt + new]`` like :meth:`dscompile.OptimizedModel.generate`, and the
    same tokens. Left padding goes through ``attention_mask`` (for models whose forward takes one). With MTP the
    exported heads draft and the decode graph verifies (``speculate=False`` decodes one token per step; the
    output is the same). Pass a :class:`~dscompile.monitor.Monitor` as ``monitor`` to receive the call's
    statistics (time to first token, decode time, cache bytes, MTP acceptance).
    """
    from ..runtime import Runtime

    program, drafter, manifest = load_onnx_runtime(path)
    eos = manifest.get("eos_token_id")
    runtime = Runtime(program, lower="eager", max_positions=program.max_positions,
                      pad_token_id=manifest.get("pad_token_id"), eos_token_id=eos,
                      drafter=drafter if speculate else None, speculation="always")  # type: ignore[arg-type]
    if monitor is not None:
        runtime.monitor = monitor
    return runtime.generate(input_ids, attention_mask, max_new_tokens, eos_token_id=eos_token_id,
                            max_length=max_length, streamer=streamer)
