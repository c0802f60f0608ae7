"""Model -> FX graph that the matchers understand, on the Dynamo path and on the ``torch.export`` path.

Both paths end in a :class:`CapturedGraph`: the GraphModule, the real value of every placeholder (weights are
placeholders under Dynamo and under export alike) and a map from weight placeholders to their qualified names.
Linear and SDPA stay whole on both paths: Dynamo graphs are torch-level, and the export path keeps the
pre-dispatch ATen IR in which ``aten.linear`` and ``aten.scaled_dot_product_attention`` are not decomposed.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
from torch.export import ExportedProgram
from torch.fx import GraphModule, Node

from .errors import CaptureError

log = logging.getLogger("dscompile")

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class WeightRef:
    """A weight (parameter or buffer) that a graph reads, by its qualified name in the original model."""

    name: str
    node: Node
    tensor: torch.Tensor | None

    @property
    def shape(self) -> tuple[int, ...]:
        if self.tensor is not None:
            return tuple(self.tensor.shape)
        val = node_value(self.node)
        return tuple(int(d) for d in val.shape) if isinstance(val, torch.Tensor) else ()

    @property
    def nbytes(self) -> int:
        if self.tensor is None:
            return 0
        return self.tensor.numel() * self.tensor.element_size()


@dataclass
class CapturedGraph:
    """A captured forward graph with the real values of its placeholders."""

    gm: GraphModule
    source: str  # "dynamo", "export" or "fx"
    inputs: list[Any]  # one value per placeholder, in placeholder order
    weights: dict[str, WeightRef] = field(default_factory=dict)  # placeholder/get_attr node name -> weight
    exported: ExportedProgram | None = None

    @property
    def graph(self) -> torch.fx.Graph:
        return self.gm.graph

    def weight(self, node: object) -> WeightRef | None:
        """The weight a node stands for, if it is a weight placeholder or attribute."""
        return self.weights.get(node.name) if isinstance(node, Node) else None

    def placeholders(self) -> list[Node]:
        return [n for n in self.graph.nodes if n.op == "placeholder"]

    def read_weights(self) -> list[WeightRef]:
        """The weights some node still reads: a rewrite leaves the weights it replaced as unused placeholders (a
        Dynamo graph's signature cannot change), which the model no longer reads."""
        used = {n.name for n in self.graph.nodes if n.users}
        return [ref for name, ref in self.weights.items() if name in used]

    def param_bytes(self) -> int:
        """Bytes of distinct weights the graph reads (tied weights counted once)."""
        seen: set[int] = set()
        total = 0
        for ref in self.read_weights():
            if ref.tensor is None or id(ref.tensor) in seen:
                continue
            seen.add(id(ref.tensor))
            total += ref.nbytes
        return total

    def param_count(self) -> int:
        """Parameters (not buffers such as RoPE tables) the graph reads, tied ones counted once."""
        return count_params(self.read_weights())

    def runnable(self) -> bool:
        """True when every placeholder has a value, so the graph can be interpreted."""
        return len(self.inputs) == len(self.placeholders())

    def snapshot(self) -> CapturedGraph:
        """A copy of the graph (weights shared) that later in-place rewrites of this one do not touch."""
        graph = copy.deepcopy(self.gm.graph)
        gm = GraphModule(self.gm, graph)
        by_name = {n.name: n for n in graph.nodes}
        weights = {k: WeightRef(w.name, by_name[k], w.tensor) for k, w in self.weights.items() if k in by_name}
        return CapturedGraph(gm=gm, source=self.source, inputs=list(self.inputs), weights=weights,
                             exported=self.exported)

    def run(self, record: Sequence[Node] = ()) -> dict[str, Any]:
        """Interpret the graph on its example inputs and return the values of ``record`` nodes by name."""
        return _RecordingInterpreter(self.gm, {n.name for n in record}).run_and_record(self.inputs)


class _RecordingInterpreter(torch.fx.Interpreter):
    def __init__(self, gm: GraphModule, wanted: set[str]):
        super().__init__(gm)
        self.wanted = wanted
        self.recorded: dict[str, Any] = {}

    def run_node(self, n: Node) -> Any:
        out = super().run_node(n)
        if n.name in self.wanted:
            self.recorded[n.name] = out
        return out

    def run_and_record(self, inputs: Sequence[Any]) -> dict[str, Any]:
        with torch.no_grad():
            self.run(*inputs)
        return self.recorded


def count_params(refs: Iterable[WeightRef]) -> int:
    """Elements of the distinct ``nn.Parameter`` tensors among ``refs``."""
    seen: set[int] = set()
    total = 0
    for ref in refs:
        if isinstance(ref.tensor, torch.nn.Parameter) and id(ref.tensor) not in seen:
            seen.add(id(ref.tensor))
            total += ref.tensor.numel()
    return total


def node_value(node: object) -> Any:
    """The example value (a FakeTensor or SymInt) that tracing recorded for a node."""
    if not isinstance(node, Node):
        return node
    if "val" in node.meta:
        return node.meta["val"]
    return node.meta.get("example_value", node.meta.get("tensor_meta"))


def dynamo_weight_name(placeholder_name: str) -> str | None:
    """``l_self_modules_model_modules_layers_modules_0_modules_q_proj_parameters_weight_`` ->
    ``model.layers.0.q_proj.weight``; None when the name does not look like a module attribute."""
    if "_parameters_" not in placeholder_name and "_buffers_" not in placeholder_name:
        return None
    name = placeholder_name
    name = re.sub(r"^l_(self|fn|model|mod|args_\d+)_", "", name)  # args_0: transformers >= 5.24 wraps forward
    name = re.sub(r"^(modules|parameters|buffers)_", "", name)  # an attribute of the root module itself
    name = name.rstrip("_")
    for part in ("_modules_", "_parameters_", "_buffers_"):
        name = name.replace(part, ".")
    return name


def from_dynamo(gm: GraphModule, example_inputs: Sequence[Any]) -> CapturedGraph:
    """Wrap a graph that Dynamo handed to a backend; its placeholders line up with ``example_inputs``."""
    holders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(holders) != len(example_inputs):
        raise CaptureError(
            f"the graph has {len(holders)} placeholders but {len(example_inputs)} example inputs were given"
        )
    weights: dict[str, WeightRef] = {}
    for node, value in zip(holders, example_inputs):
        name = dynamo_weight_name(node.name)
        if name is None and isinstance(value, torch.nn.Parameter):
            name = node.name
        if name is not None and isinstance(value, torch.Tensor):
            weights[node.name] = WeightRef(name, node, value)
    _add_attribute_weights(gm, weights)
    inputs = [_concrete(v) for v in example_inputs]
    return CapturedGraph(gm=gm, source="dynamo", inputs=inputs, weights=weights)


def _concrete(value: Any) -> Any:
    """Symbolic sizes that Dynamo passes for dynamic dims become their example ints, so graphs can be run."""
    if isinstance(value, torch.SymInt):
        hint = value.node.hint
        return int(hint) if hint is not None else value
    return value


def from_fx(gm: GraphModule, example_inputs: Sequence[Any]) -> CapturedGraph:
    """Wrap a plain FX graph (``symbolic_trace`` or a pass's output) whose weights are ``get_attr`` nodes."""
    weights: dict[str, WeightRef] = {}
    _add_attribute_weights(gm, weights)
    return CapturedGraph(gm=gm, source="fx", inputs=list(example_inputs), weights=weights)


def _add_attribute_weights(gm: GraphModule, weights: dict[str, WeightRef]) -> None:
    for node in gm.graph.nodes:
        if node.op != "get_attr":
            continue
        with contextlib.suppress(AttributeError):
            value = _get_attr(gm, str(node.target))
            if isinstance(value, torch.Tensor):
                weights[node.name] = WeightRef(str(node.target), node, value)


def _get_attr(root: torch.nn.Module, target: str) -> Any:
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def from_exported(ep: ExportedProgram, args: Sequence[Any], kwargs: Mapping[str, Any]) -> CapturedGraph:
    """Wrap an ExportedProgram: parameters, buffers and constants are lifted placeholders."""
    from torch.export.graph_signature import InputKind

    state = ep.state_dict
    constants = ep.constants
    user_inputs = iter(_flat_user_inputs(ep, args, kwargs))
    holders = [n for n in ep.graph_module.graph.nodes if n.op == "placeholder"]
    values: list[Any] = []
    weights: dict[str, WeightRef] = {}
    for node, spec in zip(holders, ep.graph_signature.input_specs):
        if spec.kind == InputKind.USER_INPUT:
            values.append(next(user_inputs))
            continue
        target = spec.target
        value = state.get(target) if target in state else constants.get(target)
        if value is None and target is not None:
            with contextlib.suppress(AttributeError):
                value = _get_attr(ep.module(), target)
        values.append(value)
        if spec.kind in (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR) and isinstance(
            value, torch.Tensor
        ):
            weights[node.name] = WeightRef(str(target), node, value)
    return CapturedGraph(gm=ep.graph_module, source="export", inputs=values, weights=weights, exported=ep)


def _flat_user_inputs(ep: ExportedProgram, args: Sequence[Any], kwargs: Mapping[str, Any]) -> list[Any]:
    flatten = getattr(ep, "_get_flat_args_with_check", None)
    if flatten is not None:
        flat, _spec = flatten(tuple(args), dict(kwargs))
        return list(flat)
    import torch.utils._pytree as pytree

    return pytree.tree_leaves((tuple(args), dict(kwargs)))


def check_model(model: object) -> torch.nn.Module:
    """Refuse what cannot be a language model before any work, with what to do instead."""
    if not isinstance(model, torch.nn.Module):
        raise CaptureError(f"expected a torch.nn.Module, got {type(model).__name__}")
    params = list(model.parameters())
    if not params:
        raise CaptureError("the model has no parameters; dscompile needs a language model with weights")
    dtypes = {p.dtype for p in params if p.is_floating_point()}
    if not dtypes:
        found = ", ".join(sorted({str(p.dtype) for p in params}))
        raise CaptureError(
            f"the model has no floating-point parameters (found {found}); dscompile reads float weights, so "
            "dequantize the model first (for example load it in float32 or bfloat16)"
        )
    bad = sorted(str(d) for d in dtypes if d not in SUPPORTED_DTYPES)
    if bad:
        raise CaptureError(
            f"unsupported parameter dtype(s) {', '.join(bad)}; dscompile works on float32, float16 and "
            "bfloat16 models (convert with model.to(torch.float32))"
        )
    return model


def split_inputs(example_inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Accept a tensor, a tuple/list of positional inputs, or a dict of keyword inputs."""
    if example_inputs is None:
        raise CaptureError(
            "example inputs are required: pass example_inputs=torch.tensor([[...token ids...]]) "
            "(or a dict such as {'input_ids': ids}), or pass calibration data"
        )
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, Mapping):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    raise CaptureError(
        f"example inputs must be a tensor, a tuple of tensors or a dict of keyword tensors, "
        f"not {type(example_inputs).__name__}"
    )


def _dynamic_shapes(model: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """Batch and sequence dims of every 2-D+ tensor input are dynamic (``Dim.AUTO``), keyed by parameter name."""
    import inspect

    from torch.export import Dim

    def spec(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.dim() >= 2:
            return {0: Dim.AUTO, 1: Dim.AUTO}
        return None

    try:
        bound = inspect.signature(model.forward).bind(*args, **kwargs)
    except TypeError as exc:
        raise CaptureError(f"example inputs do not fit {type(model).__name__}.forward: {exc}") from exc
    return {name: spec(value) for name, value in bound.arguments.items()}


def capture_export(model: torch.nn.Module, example_inputs: Any, *, dynamic: bool = False) -> CapturedGraph:
    """The ``torch.export`` path: ATen IR with linear and SDPA kept whole (no decomposition is run)."""
    check_model(model)
    args, kwargs = split_inputs(example_inputs)
    kwargs = _prefer_no_cache(model, kwargs)
    shapes = _dynamic_shapes(model, args, kwargs) if dynamic else None
    try:
        with torch.no_grad():
            ep = torch.export.export(model, args, kwargs, dynamic_shapes=shapes, strict=False)
    except Exception as exc:  # the exporter's own errors vary by model; say where it broke
        raise CaptureError(f"torch.export could not capture {type(model).__name__}: {exc}") from exc
    return from_exported(ep, args, kwargs)


def capture_dynamo(
    model: torch.nn.Module, example_inputs: Any, *, dynamic: bool | None = None
) -> list[CapturedGraph]:
    """The Dynamo path: every graph Dynamo hands to a backend for one call of ``model``."""
    check_model(model)
    args, kwargs = split_inputs(example_inputs)
    kwargs = _prefer_no_cache(model, kwargs)
    graphs: list[CapturedGraph] = []

    def collect(gm: GraphModule, inputs: list[Any]) -> Any:
        graphs.append(from_dynamo(gm, inputs))
        return gm.forward

    with _fresh_dynamo():
        compiled = torch.compile(model, backend=collect, dynamic=dynamic)
        with torch.no_grad():
            compiled(*args, **kwargs)
    if not graphs:
        raise CaptureError(f"Dynamo captured no graph from {type(model).__name__}")
    return graphs


@contextlib.contextmanager
def _fresh_dynamo() -> Iterator[None]:
    """Capture always traces anew: a cached frame would hand no graph to our collecting backend."""
    torch._dynamo.reset()
    try:
        yield
    finally:
        torch._dynamo.reset()


def forward_accepts(model: torch.nn.Module, name: str) -> bool:
    """True when ``model.forward`` has a parameter called ``name``."""
    import inspect

    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _prefer_no_cache(model: torch.nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Hugging Face models build a KV cache object by default; the cache-free forward is what we match."""
    config = getattr(model, "config", None)
    if (config is not None and hasattr(config, "use_cache") and "use_cache" not in kwargs
            and forward_accepts(model, "use_cache")):
        return {**kwargs, "use_cache": False}
    return kwargs


def dtype_of(captured: CapturedGraph) -> torch.dtype:
    """The floating dtype most of the graph's weights have."""
    counts: dict[torch.dtype, int] = {}
    for ref in captured.weights.values():
        if ref.tensor is not None and ref.tensor.is_floating_point():
            counts[ref.tensor.dtype] = counts.get(ref.tensor.dtype, 0) + ref.tensor.numel()
    return max(counts, key=lambda d: counts[d]) if counts else torch.float32
