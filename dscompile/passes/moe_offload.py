"""Routed experts kept in files, with a cache of the hot ones in memory: MoE for models bigger than memory.

A carved FFN's routed experts are most of its weights, and a token reads ``top_k`` of them. ``offload_plan``
writes each FFN's routed experts to a file (one expert's gate, up and down blocks contiguous, so one read brings
one expert in) and frees them; an :class:`ExpertStore` keeps ``capacity`` experts per FFN in memory slots, least
recently used out first. The carved FFN's call then goes through ``dscompile::moe_offloaded``, an op opaque to
Inductor: it routes nothing itself (the router stays in the graph), brings the chosen experts into slots with
``preadv`` and computes them there, with the native ``moe_experts`` kernel where it is built. A call that chooses
more experts than the slots hold (a prefill, a large batch) streams them through the slots a slot-full at a time,
so memory stays bounded whatever the token count.

Reads go through ``preadv`` into slots, not through a memory map of the file: a map's pages count as the process's
memory once touched and stay until the kernel needs them, so its footprint is not what the caller chose.
"""

from __future__ import annotations

import ctypes
import inspect
import itertools
import logging
import os
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.fx import GraphModule

from ..errors import ConfigError
from .moe_ops import moe_ffn, neuron_activations

if TYPE_CHECKING:
    from .moe_plan import MoEPlan

log = logging.getLogger("dscompile")

OFFLOAD = list(inspect.signature(moe_ffn).parameters).index("offload")
"""The argument of a carved FFN's call that names its store."""

_STORES: dict[int, ExpertStore] = {}
_IDS = itertools.count(1)


class ExpertStore:
    """One carved FFN's routed experts in a file, ``capacity`` of them in memory (``slots``: ``[parts, capacity,
    width, hidden]``, parts gate, up, down or up, down)."""

    def __init__(self, path: Path, shape: tuple[int, int, int], parts: int, dtype: torch.dtype, capacity: int,
                 gate_bias: torch.Tensor | None, up_bias: torch.Tensor | None, activation: str):
        n_experts, width, hidden = shape
        if not 1 <= capacity <= n_experts:
            raise ConfigError(f"an expert cache holds 1 to {n_experts} experts per FFN (its routed experts), got "
                              f"{capacity}")
        self.path, self.n_experts, self.width, self.hidden, self.parts = path, n_experts, width, hidden, parts
        self.capacity, self.activation = capacity, activation
        self.slots = torch.zeros(parts, capacity, width, hidden, dtype=dtype)
        self._bytes = self.slots.view(torch.uint8).numpy()
        self.expert_bytes = parts * width * hidden * self.slots.element_size()
        self.gate_bias, self.up_bias = gate_bias, up_bias  # [experts, width], small: kept whole
        self.slot_gate_bias = None if gate_bias is None else gate_bias.new_zeros(capacity, width)
        self.slot_up_bias = None if up_bias is None else up_bias.new_zeros(capacity, width)
        self.resident: OrderedDict[int, int] = OrderedDict()  # expert -> slot, least recently used first
        self.free = list(range(capacity - 1, -1, -1))
        self.hits = self.misses = 0
        self._fd = os.open(path, os.O_RDONLY)
        self.id = next(_IDS)
        _STORES[self.id] = self

    @classmethod
    def write(cls, path: Path, experts: tuple, capacity: int, activation: str) -> ExpertStore:
        """Write ``experts`` (``(gate, up, down, gate_bias, up_bias)``, blocks ``[experts, width, hidden]``) to
        ``path``, expert by expert, and open a store over it."""
        gate, up, down, gate_bias, up_bias = experts
        blocks = [t.detach() for t in (gate, up, down) if t is not None]
        if path.exists():  # it may be another model's live store: rewriting it would change that model's experts
            raise ConfigError(f"{path} exists: offload to a folder of its own")
        with open(path, "xb") as f:
            for e in range(up.shape[0]):
                for block in blocks:
                    f.write(block[e].contiguous().view(torch.uint8).numpy().tobytes())
        copy = lambda t: None if t is None else t.detach().clone()  # noqa: E731
        return cls(path, tuple(up.shape), len(blocks), up.dtype, capacity, copy(gate_bias), copy(up_bias),
                   activation)

    @property
    def params_per_expert(self) -> int:
        biases = sum(1 for b in (self.gate_bias, self.up_bias) if b is not None)
        return (self.parts * self.hidden + biases) * self.width

    def stats(self) -> dict[str, Any]:
        looked = self.hits + self.misses
        return {"capacity": self.capacity, "experts": self.n_experts, "hits": self.hits, "misses": self.misses,
                "hit_rate": round(self.hits / looked, 4) if looked else None,
                "bytes_read": self.misses * self.expert_bytes}

    def fetch(self, experts: list[int]) -> list[int]:
        """The slots holding ``experts`` (at most ``capacity``), reading the missing ones from the file; the least
        recently used experts not asked for make room."""
        assert len(experts) <= self.capacity, "fetch at most a cache-full of experts at a time"
        for e in experts:
            if e in self.resident:
                self.resident.move_to_end(e)
        slots = []
        for e in experts:
            if e in self.resident:
                self.hits += 1
            else:
                self.misses += 1
                slot = self.free.pop() if self.free else self.resident.popitem(last=False)[1]
                self._read(e, slot)
                self.resident[e] = slot
            slots.append(self.resident[e])
        return slots

    def _read(self, expert: int, slot: int) -> None:
        views = [memoryview(self._bytes[p, slot]) for p in range(self.parts)]
        got = os.preadv(self._fd, views, expert * self.expert_bytes)
        if got != self.expert_bytes:
            raise RuntimeError(f"expert file {self.path} is truncated: expert {expert} read {got} of "
                               f"{self.expert_bytes} bytes")
        for slot_bias, bias in ((self.slot_gate_bias, self.gate_bias), (self.slot_up_bias, self.up_bias)):
            if slot_bias is not None:
                slot_bias[slot] = bias[expert]

    def routed(self, rows: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Each row's sum over its chosen experts (``idx``: ``[rows, top_k]``), as :func:`.moe_ops.moe_ffn`'s
        routed part computes it."""
        wanted = idx.unique().tolist()
        if len(wanted) <= self.capacity and self._native(rows):
            slot_of = torch.zeros(self.n_experts, dtype=torch.long)
            slot_of[wanted] = torch.tensor(self.fetch(wanted))
            gate, up, down = self._blocks()
            return torch.ops.dscompile.moe_experts(rows, slot_of[idx], gate, up, down, self.slot_gate_bias,
                                                   self.slot_up_bias, self.activation)
        chosen = torch.zeros(rows.shape[0], self.n_experts, dtype=rows.dtype).scatter_(1, idx, 1.0)
        out = torch.zeros_like(rows)
        for start in range(0, len(wanted), self.capacity):  # a slot-full of experts at a time
            part = wanted[start:start + self.capacity]
            out += self._masked(rows, torch.tensor(self.fetch(part)), chosen[:, part])
        return out

    def _blocks(self) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        return (self.slots[0] if self.parts == 3 else None), self.slots[-2], self.slots[-1]

    def _native(self, rows: torch.Tensor) -> bool:
        from ..ops import native

        return rows.dtype == torch.float32 and self.slots.dtype == torch.float32 and native.load()

    def _masked(self, rows: torch.Tensor, slots: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        """The experts in ``slots`` on every row, each expert's output kept where ``chosen`` (``[rows, len(slots)]``)
        says the row chose it."""
        gate, up, down = self._blocks()
        flat = lambda t: None if t is None else t[slots].reshape(-1, *t.shape[2:])  # noqa: E731
        a = neuron_activations(rows, flat(gate), flat(up), flat(self.slot_gate_bias), flat(self.slot_up_bias),
                               self.activation)
        a = (a.view(rows.shape[0], len(slots), self.width) * chosen.unsqueeze(-1)).view(rows.shape[0], -1)
        return a @ flat(down)

    def close(self) -> None:
        _STORES.pop(self.id, None)
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def store(store_id: int) -> ExpertStore:
    if store_id not in _STORES:
        raise RuntimeError(f"expert store {store_id} is closed: the model that offloaded it was freed")
    return _STORES[store_id]


@torch.library.custom_op("dscompile::moe_offloaded", mutates_args=())
def moe_offloaded(x: torch.Tensor, idx: torch.Tensor, store_id: int) -> torch.Tensor:
    """The routed experts' output for rows ``x`` (``[tokens, hidden]``) that chose experts ``idx``, from the
    offloaded store ``store_id``."""
    return store(store_id).routed(x, idx)


@moe_offloaded.register_fake
def _(x: torch.Tensor, idx: torch.Tensor, store_id: int) -> torch.Tensor:
    return x.new_empty(x.shape)


def expert_folder(folder: str | Path | None) -> tuple[Path, Any]:
    """The folder for expert files: ``folder`` (created), or a temporary one removed with the returned handle."""
    if folder is None:
        handle = tempfile.TemporaryDirectory(prefix="dscompile-experts-")
        return Path(handle.name), handle
    path = Path(folder)
    path.mkdir(parents=True, exist_ok=True)
    return path, None


def offload_plan(plan: MoEPlan, capacity: int, folder: Path) -> list[ExpertStore]:
    """Write every carved FFN's routed experts to a file under ``folder`` and free them from memory; the FFNs'
    stores (already offloaded ones are kept)."""
    top_k = max((c.top_k for c in plan.layers.values()), default=0)
    if capacity < top_k:
        log.warning("moe: an expert cache of %d is smaller than top_k=%d: every token reads experts from the files; "
                    "keep at least top_k experts per FFN in memory", capacity, top_k)
    for i, carved in enumerate(plan.layers.values()):
        if carved.store is not None:
            continue
        carved.store = ExpertStore.write(folder / f"ffn_{i}.experts", carved.experts, capacity, carved.activation)
        for t in (*carved.experts[:3], carved.down_t):
            if t is not None:
                t.data = torch.empty(0, dtype=t.dtype)  # every graph module registered this same Parameter
        carved.experts = (None,) * len(carved.experts)
        carved.down_t = None
    return [c.store for c in plan.layers.values() if c.store is not None]


def point_at_stores(gm: GraphModule, plan: MoEPlan) -> int:
    """Make ``gm``'s carved FFN calls read their offloaded stores (their expert attributes are dropped); returns
    how many calls changed."""
    by_router = {id(c.router): c for c in plan.layers.values() if c.store is not None}
    changed = 0
    for node in gm.graph.nodes:
        if node.target is not moe_ffn:
            continue
        carved = by_router.get(id(getattr(gm, node.args[4].target)))
        if carved is None or (len(node.args) > OFFLOAD and node.args[OFFLOAD] is not None):
            continue
        args = list(node.args) + [None] * (OFFLOAD + 1 - len(node.args))
        args[2], args[3], args[OFFLOAD] = (None,) * len(args[2]), None, carved.store.id
        node.args = tuple(args)
        changed += 1
    if changed:
        gm.graph.eliminate_dead_code()
        read = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
        for name in [n for n in gm._parameters if n not in read and n.startswith("moe_")]:
            delattr(gm, name)
        gm.recompile()
    return changed


_PAGED_OUT: list[tuple[int, int]] = []
"""Address ranges of the files :func:`page_out_dense` mapped (their tensors are not moved again)."""


def page_out_dense(tensors: list[torch.Tensor], folder: Path) -> int:
    """Move ``tensors`` (the source model's dense FFN weights, which the carved programs no longer read) into a
    file they are mapped back from, read-only and copy-on-write: they keep their values, shapes and identities, so
    the source model still runs, but their pages leave memory until something reads them. Returns the bytes
    moved."""
    unique = list({t.data_ptr(): t for t in tensors if t.numel() and not any(
        lo <= t.data_ptr() < hi for lo, hi in _PAGED_OUT)}.values())  # not moved by an earlier call
    if not unique:
        return 0
    offsets, total = [], 0
    path = folder / "dense_ffn.weights"
    if path.exists():
        raise ConfigError(f"{path} exists: offload to a folder of its own")
    with open(path, "wb") as f:
        for t in unique:
            offsets.append(total)
            data = t.detach().contiguous().view(torch.uint8).reshape(-1).numpy().tobytes()
            pad = -len(data) % 64  # keeps every tensor's start aligned for any dtype
            f.write(data + b"\0" * pad)
            total += len(data) + pad
    mapped = torch.from_file(str(path), shared=False, size=total, dtype=torch.uint8)
    _PAGED_OUT.append((mapped.data_ptr(), mapped.data_ptr() + total))
    old = []
    for t, start in zip(unique, offsets):
        nbytes = t.numel() * t.element_size()
        old.append((t.data_ptr(), nbytes))
        t.data = mapped[start:start + nbytes].view(t.dtype).view(t.shape)
    drop_file_pages(old)
    return total


def drop_paged_out() -> int:
    """Give back the pages of paged-out weights that something read since (recompiling the forward reads about a
    fifth of them, scattered); returns the bytes dropped."""
    return drop_file_pages([(lo, hi - lo) for lo, hi in _PAGED_OUT])


MADV_DONTNEED = 4


def drop_file_pages(ranges: list[tuple[int, int]]) -> int:
    """Give back the resident pages of ``ranges`` (address, bytes) that lie in a file mapping of this process and
    still hold the file's bytes.

    A checkpoint loaded with a memory map (safetensors) keeps every tensor in one mapping, so moving some tensors
    away frees nothing while the others hold it: their pages that calibration touched stay resident. Dropping a
    page of a private file mapping brings the file's bytes back on the next read, so it is done only where memory
    equals the file (a weight changed in place stays), and never for anonymous memory, where it would zero the
    bytes. Returns the bytes dropped."""
    files = _file_mappings()
    page = os.sysconf("SC_PAGE_SIZE")
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    dropped = 0
    for address, nbytes in ranges:
        start, end = -(-address // page) * page, (address + nbytes) // page * page  # whole pages inside only
        backing = next(((path, offset + start - lo) for lo, hi, path, offset in files if lo <= start and end <= hi),
                       None)
        if end > start and backing is not None and _same_as_file(start, end - start, *backing) and \
                libc.madvise(start, end - start, MADV_DONTNEED) == 0:
            dropped += end - start
    return dropped


def _same_as_file(address: int, nbytes: int, path: str, offset: int) -> bool:
    chunk = 1 << 24
    try:
        with open(path, "rb") as f:
            for at in range(0, nbytes, chunk):
                size = min(chunk, nbytes - at)
                if os.pread(f.fileno(), size, offset + at) != ctypes.string_at(address + at, size):
                    return False
    except OSError:
        return False
    return True


def _file_mappings() -> list[tuple[int, int, str, int]]:
    """This process's private file mappings as (start, end, path, file offset), from ``/proc/self/maps`` (none
    where it is absent)."""
    out = []
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].startswith("/") and fields[1][3] == "p" and fields[4] != "0":
            lo, hi = (int(v, 16) for v in fields[0].split("-"))
            out.append((lo, hi, fields[5], int(fields[2], 16)))
    return out


def owning_parameters(model: torch.nn.Module, tensors: list[torch.Tensor | None]) -> list[torch.Tensor]:
    """The parameters of ``model`` whose memory holds ``tensors`` (which may be views, such as one half of a fused
    gate/up weight)."""
    spans = [(p.data_ptr(), p.data_ptr() + p.numel() * p.element_size(), p) for p in model.parameters()]
    found: dict[int, torch.Tensor] = {}
    for t in tensors:
        if t is None:
            continue
        for start, end, p in spans:
            if start <= t.data_ptr() < end:
                found[id(p)] = p
    return list(found.values())


def release_heap() -> None:
    """Hand freed heap memory back to the system (glibc keeps large freed blocks otherwise)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass
