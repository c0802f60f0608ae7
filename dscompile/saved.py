"""Save an optimized model to a folder and load it back, so calibration, healing and MTP training are not repeated.

The folder holds what the passes *created*, never the source model's own weights: ``manifest.json`` (the profile,
a fingerprint of the source model, and per layer where its tensors attach), ``rewrites.safetensors`` (MLA factors,
MoE experts and routers) and, when trained, ``mtp.safetensors`` (the MTP heads). Layers are named by the source
model's parameters they replace (``model.layers.0.self_attn.k_proj.weight``), which is how they are found again
in a freshly loaded copy of the same model; the fingerprint refuses any other model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .errors import ConfigError
from .lowrank import JointFactors
from .passes.mla_plan import MLAPlan
from .passes.moe_carve import CarvedFFN
from .passes.moe_plan import MoEPlan
from .profile import MLAConfig, MoEConfig, Profile

if TYPE_CHECKING:
    from .api import OptimizedModel

log = logging.getLogger("dscompile")

FORMAT = "dscompile-optimized/1"
MANIFEST, REWRITES, HEADS = "manifest.json", "rewrites.safetensors", "mtp.safetensors"


def model_fingerprint(model: torch.nn.Module) -> str:
    """Names, shapes, dtypes and a strided sample of every parameter: cheap (a 135M model takes milliseconds), and
    it changes when the weights do."""
    digest = hashlib.sha256()
    for name, p in model.named_parameters():
        flat = p.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 4096)].float().cpu().numpy().tobytes()
        digest.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode() + sample)
    return digest.hexdigest()[:24]


class _Addresses:
    """Where a tensor lives, as (parameter name, element offset) of the source model: data pointers do not survive
    a reload, names do. Offsets cover views such as one part of a fused QKV weight."""

    def __init__(self, model: torch.nn.Module):
        self.params = dict(model.named_parameters())

    def name(self, ptr: int) -> list[Any]:
        for name, p in self.params.items():
            start, size = p.data_ptr(), p.element_size()
            if start <= ptr < start + p.numel() * size:
                return [name, (ptr - start) // size]
        raise ConfigError("a rewritten layer reads a tensor that is not a parameter of the source model; this "
                          "optimized model cannot be saved")

    def pointer(self, address: list[Any]) -> int:
        name, offset = address
        if name not in self.params:
            raise ConfigError(f"the saved rewrites attach to parameter {name!r}, which this model does not have")
        p = self.params[name]
        return p.data_ptr() + int(offset) * p.element_size()


def save_optimized(optimized: OptimizedModel, path: str | Path, *, source: str | None = None) -> Path:
    """Write ``optimized``'s profile, rewrites and trained MTP heads to the folder ``path`` (created if needed).

    ``source`` names the model for :func:`load_optimized` to load when it is not given one (an embedded model name
    or a local checkpoint folder).
    """
    from safetensors.torch import save_file

    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{folder} exists and is not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    model = optimized.original
    addresses = _Addresses(model)
    tensors: dict[str, torch.Tensor] = {}
    manifest: dict[str, Any] = {
        "format": FORMAT, "source": source, "model_class": type(model).__name__,
        "model_fingerprint": model_fingerprint(model), "lower": optimized.lower,
        "profile": _profile_for_file(optimized.profile),
        "mla": _save_mla(optimized.session.mla_plan, addresses, tensors),
        "moe": _save_moe(optimized.session.moe_plan, addresses, tensors),
        "mtp": None,
    }
    if optimized.profile.mtp is not None and optimized.mtp_heads().trained:
        optimized.save_mtp(str(folder / HEADS))
        manifest["mtp"] = HEADS
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(folder / REWRITES))
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    log.info("saved %s to %s (%d tensors of rewrites%s)", optimized.profile.name, folder, len(tensors),
             ", MTP heads" if manifest["mtp"] else "")
    return folder


def load_optimized(path: str | Path, model: torch.nn.Module | None = None, *, lower: str | None = None,
                   example_inputs: Any = None, offload_experts: int | None = None,
                   expert_folder: str | Path | None = None) -> OptimizedModel:
    """The optimized model saved in ``path``, rebuilt on ``model`` (or on the saved ``source``) without calibrating.

    ``model`` must be the same model the folder was saved from (its fingerprint is checked). ``lower`` defaults
    to the saved lowering. ``offload_experts`` keeps that many routed MoE experts per FFN in memory and the rest
    in files under ``expert_folder`` (see :meth:`OptimizedModel.offload_experts`).
    """
    from .api import OptimizedModel, compile_once

    folder = Path(path)
    manifest = read_manifest(folder)
    if model is None:
        model = _load_source(manifest)
    found = model_fingerprint(model)
    if found != manifest.get("model_fingerprint"):
        raise ConfigError(f"{folder} was saved from another model (fingerprint {manifest.get('model_fingerprint')}, "
                          f"this {type(model).__name__} has {found}); optimize this model instead")
    profile = Profile.from_dict(manifest["profile"], name=manifest["profile"].get("name", "custom"))
    if manifest.get("mtp"):
        profile = dataclasses.replace(profile, mtp=dataclasses.replace(profile.mtp, heads=str(folder / HEADS)))
    optimized = OptimizedModel(model, profile, lower=lower or manifest.get("lower", "inductor"))
    tensors = _read_tensors(folder / REWRITES)
    addresses = _Addresses(model)
    if manifest.get("mla"):
        optimized.session.mla_plan = _load_mla(manifest["mla"], profile.mla, addresses, tensors)
    if manifest.get("moe"):
        optimized.session.moe_plan = _load_moe(manifest["moe"], profile.moe, addresses, tensors)
    if example_inputs is None:
        example_inputs = torch.zeros(1, 8, dtype=torch.long)
    compile_once(optimized, example_inputs)
    if offload_experts is not None:
        optimized.offload_experts(offload_experts, expert_folder)
    log.info("loaded %s from %s", profile.name, folder)
    return optimized


def read_manifest(folder: Path) -> dict[str, Any]:
    """The folder's manifest, or an error that says what is wrong with the folder."""
    file = folder / MANIFEST
    if not file.is_file():
        raise ConfigError(f"{folder} is not a saved dscompile model (no {MANIFEST}); save one with "
                          "OptimizedModel.save(folder)")
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{file} is not valid JSON: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ConfigError(f"{file} is not a {FORMAT} manifest (format {manifest.get('format')!r}); it was written by "
                          "another version of dscompile" if isinstance(manifest, dict) else f"{file} is not a manifest")
    return manifest


def _profile_for_file(profile: Profile) -> dict[str, Any]:
    data = profile.to_dict()
    if data.get("mtp"):
        data["mtp"]["heads"] = None  # the heads travel in the folder, not at the path they were loaded from
    return data


def _load_source(manifest: dict[str, Any]) -> torch.nn.Module:
    source = manifest.get("source")
    if not source:
        raise ConfigError("this folder does not name its source model: pass the model, "
                          "load_optimized(folder, model)")
    from . import models

    return models.load(source)[0]


def _read_tensors(file: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not file.is_file():
        raise ConfigError(f"{file} is missing: the folder is incomplete")
    return load_file(str(file))


def _parameter(t: torch.Tensor) -> torch.nn.Parameter:
    return torch.nn.Parameter(t.contiguous(), requires_grad=False)


def _save_mla(plan: MLAPlan | None, addresses: _Addresses, tensors: dict[str, torch.Tensor]) -> dict[str, Any] | None:
    if plan is None or not plan.factors:
        return None
    layers = []
    for i, (key, f) in enumerate(plan.factors.items()):
        prefix = f"mla.{i}"
        tensors[f"{prefix}.down"], tensors[f"{prefix}.spectrum"] = f.down, f.spectrum
        tensors.update({f"{prefix}.up.{j}": u for j, u in enumerate(f.ups)})
        rope = plan.rope_dims.get(key)
        layers.append({"layer": plan.layers[key], "k": addresses.name(key[0]), "k_shape": list(key[1]),
                       "v": addresses.name(key[2]), "v_shape": list(key[3]), "ups": len(f.ups),
                       "rope_dims": list(rope) if rope is not None else None})
    return {"calibration_tokens": plan.calibration_tokens, "skipped": plan.skipped, "layers": layers}


def _load_mla(saved: dict[str, Any], config: MLAConfig | None, addresses: _Addresses,
              tensors: dict[str, torch.Tensor]) -> MLAPlan:
    if config is None:
        raise ConfigError("the manifest holds MLA factors but its profile has no MLA")
    plan = MLAPlan(config, calibration_tokens=saved["calibration_tokens"], skipped=dict(saved["skipped"]))
    for i, layer in enumerate(saved["layers"]):
        key = (addresses.pointer(layer["k"]), tuple(layer["k_shape"]), addresses.pointer(layer["v"]),
               tuple(layer["v_shape"]))
        prefix = f"mla.{i}"
        plan.factors[key] = JointFactors(_parameter(tensors[f"{prefix}.down"]),
                                         [_parameter(tensors[f"{prefix}.up.{j}"]) for j in range(layer["ups"])],
                                         tensors[f"{prefix}.spectrum"])
        plan.layers[key] = layer["layer"]
        if layer["rope_dims"] is not None:
            plan.rope_dims[key] = tuple(layer["rope_dims"])
    return plan


def _save_moe(plan: MoEPlan | None, addresses: _Addresses, tensors: dict[str, torch.Tensor]) -> dict[str, Any] | None:
    if plan is None or not plan.layers:
        return None
    layers = []
    for i, (key, carved) in enumerate(plan.layers.items()):
        prefix = f"moe.{i}"
        carved.in_memory("save")
        # The routed down rows are a second layout of down_t (see CarvedFFN.sync_rows): saved once.
        params = {k: v for k, v in carved.params().items() if v is not None and k != "experts_down"}
        tensors.update({f"{prefix}.{k}": v for k, v in params.items()})
        tensors[f"{prefix}.order"] = carved.order
        layers.append({"layer": plan.names[key], "down": addresses.name(key[0]), "down_shape": list(key[1]),
                       "tensors": sorted(params), "shared": carved.shared is not None, "top_k": carved.top_k,
                       "activation": carved.activation, "load": carved.load, "routing": carved.routing})
    return {"calibration_tokens": plan.calibration_tokens, "skipped": plan.skipped, "layers": layers}


def _load_moe(saved: dict[str, Any], config: MoEConfig | None, addresses: _Addresses,
              tensors: dict[str, torch.Tensor]) -> MoEPlan:
    if config is None:
        raise ConfigError("the manifest holds MoE experts but its profile has no MoE")
    plan = MoEPlan(config, calibration_tokens=saved["calibration_tokens"], skipped=dict(saved["skipped"]))
    for i, layer in enumerate(saved["layers"]):
        prefix = f"moe.{i}"
        own = {name: _parameter(tensors[f"{prefix}.{name}"]) for name in layer["tensors"]}
        key = (addresses.pointer(layer["down"]), tuple(layer["down_shape"]))
        plan.layers[key] = CarvedFFN.from_params(own, shared=layer["shared"], top_k=layer["top_k"],
                                                 activation=layer["activation"], order=tensors[f"{prefix}.order"],
                                                 load=list(layer["load"]), routing=layer.get("routing", "linear"))
        plan.names[key] = layer["layer"]
    return plan

