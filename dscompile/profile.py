"""Profiles: which rewrites to apply and how, as presets or a TOML/YAML file, validated before any work."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import tomllib

from .errors import ConfigError

SPECULATION_MODES = ("adaptive", "always")
"""``mtp.speculation``: draft only while it pays (``runtime.gate``), or at every step."""


MOE_ROUTERS = ("linear", "activation")
"""``moe.router``: how a token's experts are chosen. ``linear``: a router fitted on calibration scores the experts
from the FFN input, and only the chosen experts' gate, up and down rows are read. ``activation``: every routed
neuron's activation is computed and the experts that contribute most (``|a| * |down row|``) run their down rows: the
choice is exact, only the down projection's bytes fall (see ``passes.moe_ops``)."""


def _check_fields(cls: type, data: dict[str, Any], where: str) -> None:
    valid = [f.name for f in fields(cls)]
    unknown = sorted(set(data) - set(valid))
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {', '.join(unknown)}; valid fields: {', '.join(valid)}")


@dataclass(frozen=True)
class MLAConfig:
    """Multi-head latent attention: K/V come from one latent per token (``kv_ratio`` of the KV bytes kept)."""

    kv_ratio: float = 0.5
    rope_mode: str = "reconstruct"  # "reconstruct" or "absorb"
    refine: bool = False  # fit each layer's factors to its attention output on the calibration text
    refine_minutes: float = 5.0
    v_weight: float = 1.0  # weight of V's rows against K's in the joint factorization
    rope_dims: int | None = None  # absorb mode: rotary dims kept per KV head (None: see mla_rope.default_rope_dims)
    ranks: str = "uniform"  # "uniform": the budget split evenly; "sensitivity": by each layer's measured error
    shrinkage: float = 0.2  # pull of the whitening covariance toward its diagonal: 0 = full whitening, 1 = scales only

    def __post_init__(self) -> None:
        if self.ranks not in ("uniform", "sensitivity"):
            raise ConfigError(f"mla.ranks must be 'uniform' or 'sensitivity', got {self.ranks!r}")
        if not 0.0 < self.kv_ratio < 1.0:
            raise ConfigError(f"mla.kv_ratio must be in (0, 1) (fraction of KV bytes kept), got {self.kv_ratio}")
        if not self.refine_minutes > 0:
            raise ConfigError(f"mla.refine_minutes must be positive, got {self.refine_minutes}")
        if not self.v_weight > 0:
            raise ConfigError(f"mla.v_weight must be positive, got {self.v_weight}")
        if not 0.0 <= self.shrinkage <= 1.0:
            raise ConfigError(f"mla.shrinkage must be in [0, 1] (0: full whitening, 1: per-channel scales only), got "
                              f"{self.shrinkage}")
        if self.rope_mode not in ("reconstruct", "absorb"):
            raise ConfigError(f"mla.rope_mode must be 'reconstruct' or 'absorb', got {self.rope_mode!r}")
        if self.rope_dims is not None and (self.rope_dims < 0 or self.rope_dims % 2):
            raise ConfigError(f"mla.rope_dims must be an even number >= 0 (rotary dims come in pairs), got "
                              f"{self.rope_dims}")


@dataclass(frozen=True)
class MoEConfig:
    """Mixture of experts carved from each dense FFN: ``n_shared`` always on, ``top_k`` of the rest routed."""

    n_experts: int = 64
    n_shared: int = 8
    top_k: int = 24
    router: str = "linear"  # "linear": fitted to the FFN input; "activation": the experts' own activations choose

    def __post_init__(self) -> None:
        if self.router not in MOE_ROUTERS:
            raise ConfigError(f"moe.router must be one of {', '.join(map(repr, MOE_ROUTERS))}, got {self.router!r}")
        if self.n_experts < 2:
            raise ConfigError(f"moe.n_experts must be at least 2, got {self.n_experts}")
        if not 0 <= self.n_shared < self.n_experts:
            raise ConfigError(
                f"moe.n_shared must be in [0, n_experts) = [0, {self.n_experts}), got {self.n_shared}"
            )
        routed = self.n_experts - self.n_shared
        if not 1 <= self.top_k <= routed:
            raise ConfigError(
                f"moe.top_k must be between 1 and the routed expert count {routed} "
                f"(n_experts - n_shared), got {self.top_k}"
            )

    @property
    def active_fraction(self) -> float:
        return (self.n_shared + self.top_k) / self.n_experts


MAX_DRAFT_NODES = 63  # a draft tree verifies its nodes plus the root: at most 64 rows for a row of the batch


@dataclass(frozen=True)
class MTPConfig:
    """Multi-token prediction: ``depth`` extra heads draft tokens t+2 ... t+1+depth."""

    depth: int = 3
    head: str = "deepseek"  # "deepseek" (norm + concat + FFN block) or "medusa" (residual head)
    draft_vocab: int = 4096  # drafts are projected onto this many of the most predicted tokens
    heads: str | None = None  # a safetensors file of trained heads (OptimizedModel.save_mtp), loaded when set
    speculation: str = "adaptive"  # "adaptive": draft only while it pays (runtime.gate); "always": every step
    draft_nodes: int | None = None  # tokens drafted per step: None is ``depth`` (a chain), more a tree of them

    def __post_init__(self) -> None:
        if not isinstance(self.depth, int) or self.depth < 1:
            raise ConfigError(f"mtp.depth must be an integer of at least 1, got {self.depth!r}")
        if self.head not in ("deepseek", "medusa"):
            raise ConfigError(f"mtp.head must be 'deepseek' or 'medusa', got {self.head!r}")
        if not isinstance(self.draft_vocab, int) or self.draft_vocab < 16:
            raise ConfigError(f"mtp.draft_vocab must be an integer of at least 16, got {self.draft_vocab!r}")
        if self.speculation not in SPECULATION_MODES:
            raise ConfigError(f"mtp.speculation must be 'adaptive' or 'always', got {self.speculation!r}")
        if self.draft_nodes is not None and (not isinstance(self.draft_nodes, int) or
                                             not self.depth <= self.draft_nodes <= MAX_DRAFT_NODES):
            raise ConfigError(f"mtp.draft_nodes must be an integer from depth ({self.depth}) to {MAX_DRAFT_NODES}, "
                              f"got {self.draft_nodes!r}")


@dataclass(frozen=True)
class Profile:
    """Which rewrites to apply; a field is None when that rewrite is off."""

    mla: MLAConfig | None = None
    moe: MoEConfig | None = None
    mtp: MTPConfig | None = None
    name: str = field(default="custom", compare=False)

    @property
    def rewrites(self) -> list[str]:
        return [n for n in ("mla", "moe", "mtp") if getattr(self, n) is not None]

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name}
        for n in ("mla", "moe", "mtp"):
            cfg = getattr(self, n)
            out[n] = dataclasses.asdict(cfg) if cfg is not None else None
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, name: str = "custom") -> Profile:
        """Build from a mapping such as a parsed profile file; unknown keys are errors naming the valid ones."""
        if not isinstance(data, dict):
            raise ConfigError(f"a profile must be a mapping, got {type(data).__name__}")
        _check_fields(cls, data, "profile")
        parts: dict[str, Any] = {}
        for key, config_cls in (("mla", MLAConfig), ("moe", MoEConfig), ("mtp", MTPConfig)):
            sub = data.get(key)
            if sub is None or sub is False:
                continue
            if sub is True:
                sub = {}
            if not isinstance(sub, dict):
                raise ConfigError(f"profile.{key} must be a table of settings, got {type(sub).__name__}")
            _check_fields(config_cls, sub, f"profile.{key}")
            try:
                parts[key] = config_cls(**sub)
            except TypeError as exc:
                raise ConfigError(f"profile.{key}: {exc}") from exc
        return cls(**parts, name=str(data.get("name", name)))


PRESETS: dict[str, Profile] = {
    "none": Profile(name="none"),
    "mla": Profile(mla=MLAConfig(kv_ratio=0.5), name="mla"),
    "moe": Profile(moe=MoEConfig(n_experts=64, n_shared=8, top_k=24), name="moe"),
    "mtp": Profile(mtp=MTPConfig(depth=3), name="mtp"),
    "balanced": Profile(mla=MLAConfig(kv_ratio=0.5), moe=MoEConfig(64, 8, 24), mtp=MTPConfig(3), name="balanced"),
    "aggressive": Profile(mla=MLAConfig(kv_ratio=0.25), moe=MoEConfig(64, 4, 12), mtp=MTPConfig(4),
                          name="aggressive"),
}


def load_profile_file(path: str | Path) -> Profile:
    """Read a profile from TOML (``.toml``), YAML (``.yaml``/``.yml``, needs PyYAML) or JSON."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"profile file {p} does not exist")
    text = p.read_text(encoding="utf-8")
    try:
        if p.suffix == ".toml":
            data = tomllib.loads(text)
        elif p.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        elif p.suffix == ".json":
            data = json.loads(text)
        else:
            raise ConfigError(f"profile file {p}: use a .toml, .yaml, .yml or .json file")
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"profile file {p} could not be parsed: {exc}") from exc
    return Profile.from_dict(data or {}, name=p.stem)


def resolve_profile(profile: Profile | str | dict[str, Any] | None) -> Profile:
    """A Profile from a Profile, a preset name, a profile file path or a mapping."""
    if profile is None:
        return PRESETS["none"]
    if isinstance(profile, Profile):
        return profile
    if isinstance(profile, dict):
        return Profile.from_dict(profile)
    if isinstance(profile, str):
        if profile in PRESETS:
            return PRESETS[profile]
        if profile.endswith((".toml", ".yaml", ".yml", ".json")):
            return load_profile_file(profile)
        raise ConfigError(
            f"unknown profile {profile!r}; presets: {', '.join(PRESETS)} (or a path to a .toml/.yaml profile file)"
        )
    raise ConfigError(f"profile must be a Profile, a preset name or a file path, not {type(profile).__name__}")
