"""One op vocabulary for two IRs.

A Dynamo graph holds torch-level calls (``torch._C._nn.linear``, ``operator.mul``, ``.view``); an exported graph
holds ATen overloads (``aten.linear.default``). Matchers ask :func:`op_class` ("is this a linear?") so that one
matcher serves both, whatever spelling the model's author chose.
"""

from __future__ import annotations

import operator
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.fx import Node

# Op classes. Strings rather than an Enum keep reports and JSON readable.
LINEAR = "linear"
ADDMM = "addmm"
MATMUL = "matmul"
SDPA = "sdpa"
SOFTMAX = "softmax"
EMBEDDING = "embedding"
SILU = "silu"
GELU = "gelu"
RELU = "relu"
TANH = "tanh"
SIGMOID = "sigmoid"
ERF = "erf"
MUL = "mul"
DIV = "div"
ADD = "add"
SUB = "sub"
NEG = "neg"
POW = "pow"
MEAN = "mean"
RSQRT = "rsqrt"
SQRT = "sqrt"
LAYER_NORM = "layer_norm"
RMS_NORM = "rms_norm"
CAT = "cat"
STACK = "stack"
SPLIT = "split"
GETITEM = "getitem"
SLICE = "slice"
VIEW = "view"
EXPAND = "expand"
REPEAT = "repeat"
CAST = "cast"
DROPOUT = "dropout"
MASKED_FILL = "masked_fill"
WHERE = "where"
COS = "cos"
SIN = "sin"
COMPLEX = "complex"
REAL = "real"
TRANSPOSE = "transpose"

ACTIVATIONS = frozenset({SILU, GELU, RELU, TANH, SIGMOID, ERF})
STRONG_ACTIVATIONS = frozenset({SILU, GELU, RELU})
ELEMENTWISE = frozenset({MUL, DIV, ADD, SUB, NEG, POW, *ACTIVATIONS, CAST, DROPOUT})
# Ops that move or relabel data without changing which values it holds; walkers look through them.
SHAPE_ONLY = frozenset({VIEW, TRANSPOSE, EXPAND, REPEAT, CAST, DROPOUT, GETITEM, SLICE, SPLIT})

_aten = torch.ops.aten


def _packets(*names: str) -> list[object]:
    """ATen overload packets that exist in this torch build (older builds lack a few)."""
    return [getattr(_aten, n) for n in names if hasattr(_aten, n)]


_FUNCTIONS: dict[str, list[object]] = {
    LINEAR: [F.linear, torch._C._nn.linear, *_packets("linear")],
    ADDMM: [torch.addmm, *_packets("addmm")],
    MATMUL: [torch.matmul, torch.bmm, torch.mm, operator.matmul, torch.einsum, torch.baddbmm,
             *_packets("matmul", "bmm", "mm", "baddbmm")],
    SDPA: [F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention,
           *_packets("scaled_dot_product_attention", "_scaled_dot_product_flash_attention_for_cpu",
                     "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention")],
    SOFTMAX: [F.softmax, torch.softmax, torch.Tensor.softmax, *_packets("softmax", "_softmax", "_safe_softmax")],
    EMBEDDING: [F.embedding, torch.embedding, *_packets("embedding")],
    SILU: [F.silu, *_packets("silu")],
    GELU: [F.gelu, torch._C._nn.gelu, *_packets("gelu")],
    RELU: [F.relu, torch.relu, *_packets("relu")],
    TANH: [torch.tanh, F.tanh, *_packets("tanh")],
    SIGMOID: [torch.sigmoid, F.sigmoid, *_packets("sigmoid")],
    ERF: [torch.erf, torch.special.erf, *_packets("erf")],
    MUL: [operator.mul, torch.mul, *_packets("mul")],
    DIV: [operator.truediv, torch.div, *_packets("div")],
    ADD: [operator.add, torch.add, *_packets("add")],
    SUB: [operator.sub, torch.sub, *_packets("sub", "rsub")],
    NEG: [operator.neg, torch.neg, *_packets("neg")],
    POW: [operator.pow, torch.pow, *_packets("pow")],
    MEAN: [torch.mean, *_packets("mean")],
    RSQRT: [torch.rsqrt, *_packets("rsqrt")],
    SQRT: [torch.sqrt, *_packets("sqrt")],
    LAYER_NORM: [F.layer_norm, torch.layer_norm, *_packets("layer_norm", "native_layer_norm")],
    RMS_NORM: [*(f for f in (getattr(F, "rms_norm", None), getattr(torch, "rms_norm", None)) if f is not None),
               *_packets("rms_norm", "_fused_rms_norm")],
    CAT: [torch.cat, torch.concat, torch.concatenate, *_packets("cat", "concat")],
    STACK: [torch.stack, *_packets("stack")],
    SPLIT: [torch.split, torch.chunk, torch.unbind, torch.tensor_split,
            *_packets("split", "split_with_sizes", "chunk", "unbind", "tensor_split")],
    GETITEM: [operator.getitem],
    SLICE: [torch.narrow, torch.select, *_packets("slice", "narrow", "select")],
    VIEW: [torch.reshape, torch.flatten, torch.squeeze, torch.unsqueeze, torch.unflatten,
           *_packets("view", "reshape", "_unsafe_view", "flatten", "squeeze", "unsqueeze", "unflatten",
                     "clone", "contiguous", "alias", "lift_fresh_copy")],
    TRANSPOSE: [torch.transpose, torch.permute, torch.t, *_packets("transpose", "permute", "t")],
    EXPAND: [torch.broadcast_to, *_packets("expand", "broadcast_to")],
    REPEAT: [torch.repeat_interleave, torch.tile, *_packets("repeat", "repeat_interleave", "tile")],
    CAST: [*_packets("to", "_to_copy", "type_as", "_assert_tensor_metadata")],
    DROPOUT: [F.dropout, torch.dropout, *_packets("dropout", "native_dropout")],
    MASKED_FILL: [torch.masked_fill, *_packets("masked_fill")],
    WHERE: [torch.where, *_packets("where")],
    COS: [torch.cos, *_packets("cos")],
    SIN: [torch.sin, *_packets("sin")],
    COMPLEX: [torch.view_as_complex, torch.polar, *_packets("view_as_complex", "polar")],
    REAL: [torch.view_as_real, *_packets("view_as_real")],
}

_METHODS: dict[str, str] = {
    "view": VIEW, "reshape": VIEW, "flatten": VIEW, "squeeze": VIEW, "unsqueeze": VIEW, "unflatten": VIEW,
    "contiguous": VIEW, "clone": VIEW, "view_as": VIEW, "reshape_as": VIEW,
    "transpose": TRANSPOSE, "permute": TRANSPOSE, "t": TRANSPOSE, "mT": TRANSPOSE,
    "expand": EXPAND, "expand_as": EXPAND, "repeat": REPEAT, "repeat_interleave": REPEAT,
    "to": CAST, "float": CAST, "half": CAST, "bfloat16": CAST, "double": CAST, "type": CAST, "type_as": CAST,
    "split": SPLIT, "chunk": SPLIT, "unbind": SPLIT, "tensor_split": SPLIT,
    "narrow": SLICE, "select": SLICE,
    "softmax": SOFTMAX, "mul": MUL, "mul_": MUL, "div": DIV, "div_": DIV, "add": ADD, "add_": ADD,
    "sub": SUB, "neg": NEG, "pow": POW, "mean": MEAN, "rsqrt": RSQRT, "sqrt": SQRT,
    "tanh": TANH, "sigmoid": SIGMOID, "relu": RELU, "masked_fill": MASKED_FILL, "masked_fill_": MASKED_FILL,
    "cos": COS, "sin": SIN, "matmul": MATMUL, "bmm": MATMUL,
}

_MODULES: list[tuple[type, str]] = [
    (torch.nn.Linear, LINEAR), (torch.nn.Embedding, EMBEDDING), (torch.nn.SiLU, SILU), (torch.nn.GELU, GELU),
    (torch.nn.ReLU, RELU), (torch.nn.Tanh, TANH), (torch.nn.Sigmoid, SIGMOID), (torch.nn.Softmax, SOFTMAX),
    (torch.nn.Dropout, DROPOUT), (torch.nn.LayerNorm, LAYER_NORM),
]
if hasattr(torch.nn, "RMSNorm"):
    _MODULES.append((torch.nn.RMSNorm, RMS_NORM))


def _build_table() -> dict[object, str]:
    table: dict[object, str] = {}
    for cls, targets in _FUNCTIONS.items():
        for target in targets:
            table[target] = cls
            # An overload packet (aten.mul) stands for all its overloads (aten.mul.Tensor, aten.mul.Scalar).
            if isinstance(target, torch._ops.OpOverloadPacket):
                for name in target.overloads():
                    table[getattr(target, name)] = cls
    return table


_TABLE = _build_table()


def op_class(node: Node, modules: dict[str, torch.nn.Module] | None = None) -> str | None:
    """The op class of ``node`` (one of the module constants), or None for anything else."""
    if node.op == "call_function":
        return _TABLE.get(node.target)
    if node.op == "call_method":
        return _METHODS.get(str(node.target))
    if node.op == "call_module" and modules is not None:
        module = modules.get(str(node.target))
        for cls, name in _MODULES:
            if isinstance(module, cls):
                return name
    return None


def is_op(node: object, *classes: str) -> bool:
    """True when ``node`` is an FX node whose op class is one of ``classes``."""
    return isinstance(node, Node) and op_class(node) in classes


def op_label(node: Node) -> str:
    """A short, stable name for the op a node calls; used when counting ops the table does not classify."""
    if node.op == "call_function":
        target = node.target
        if isinstance(target, torch._ops.OpOverload):
            return str(target.overloadpacket.__name__)
        return getattr(target, "__name__", str(target))
    return str(node.target) if node.op in ("call_method", "call_module") else node.op


def register(cls: str, target: object) -> None:
    """Teach the table a new spelling (a custom op, say) of an existing op class."""
    _TABLE[target] = cls


def targets_of(cls: str) -> list[Callable[..., object] | object]:
    """Every function target that the table files under ``cls``."""
    return [t for t, c in _TABLE.items() if c == cls]
